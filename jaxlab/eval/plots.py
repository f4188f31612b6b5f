"""Matplotlib plots saved as PNG next to the metrics.

Figures are made with ``matplotlib.figure.Figure`` directly, not through pyplot, so drawing them
needs no display and never changes the process's matplotlib backend (importing this module in a
notebook leaves its inline plots working).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure


def figure(figsize, nrows: int = 1, ncols: int = 1, **subplots) -> tuple[Figure, Any]:
    """A figure and its axes (``Figure.subplots``), outside pyplot: ``savefig`` renders it with
    Agg and the process's backend is left alone. Experiments draw their own plots with it."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **subplots)


def scatter_agreement(
    x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str, title: str, path: str
) -> None:
    """Scatter of two implementations' values against each other, with the diagonal."""
    fig, ax = figure((5, 5))
    ax.scatter(x, y, s=2, alpha=0.4)
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_loss_curve(records: list[dict], path: str) -> None:
    """Training loss per step and held-out loss at each evaluation, from metrics records."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = figure((6, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_dwa_weights(
    matrix: np.ndarray, title: str, path: str, blocks: list[int] | None = None
) -> None:
    """Heatmap of DenseFormer weights: row = the DWA after block ``blocks[row]``, column =
    representation j (0 = embedding); blank where a DWA does not read that representation."""
    fig, ax = figure((1 + 0.6 * matrix.shape[1], 1 + 0.6 * matrix.shape[0]))
    limit = float(np.nanmax(np.abs(matrix)))
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="RdBu_r", vmin=-limit, vmax=limit)
    for (r, c), v in np.ndenumerate(matrix):
        if not np.isnan(v):
            color = "white" if abs(v) > 0.6 * limit else "black"
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("representation j (0 = embedding)")
    ax.set_ylabel("DWA after block")
    ax.set_xticks(range(matrix.shape[1]))
    ax.set_yticks(range(matrix.shape[0]), blocks or range(1, matrix.shape[0] + 1))
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_loss_curves(runs: dict[str, list[dict]], path: str, title: str = "") -> None:
    """Training loss (thin) and held-out loss (markers) of several runs on shared axes."""
    fig, ax = figure((6.5, 4))
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i}"
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        if train:
            ax.plot(*zip(*train, strict=True), color=color, linewidth=0.8, alpha=0.6)
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", color=color, label=f"{name} (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
