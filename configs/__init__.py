"""Experiment configs: one ``get_config()`` per experiment (ml_collections). Not installed."""
