"""Evaluation: metrics, harnesses, reports and plots."""
