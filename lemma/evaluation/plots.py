"""PNG plots for bench, eval and trace (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from lemma.errors import LemmaError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LemmaError("plots need matplotlib: pip install 'lemma[plot]'") from None
    return plt


def _by_policy(rows: list[dict[str, Any]], x: str, y: str) -> dict[str, list[tuple[float, float]]]:
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        lines[r["policy"]].append((r[x], r[y]))
    return {k: sorted(v) for k, v in lines.items()}


def _policy_lines(ax, rows: list[dict[str, Any]], x: str, metric: str, xlabel: str, ylabel: str) -> None:
    for policy, points in _by_policy(rows, x, metric).items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=policy)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _save(plt, fig, legend_ax, title: str, out: str | Path) -> None:
    legend_ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def metric_vs_budget(rows: list[dict[str, Any]], metrics: list[tuple[str, str]], out: str | Path, title: str) -> None:
    """One panel per (metric, label); one line per policy; Dense (no budget) as a dashed level."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, (metric, label) in zip(axes[0], metrics):
        for r in rows:
            if r["budget"] is None:
                ax.axhline(r[metric], color="black", linestyle="--", label=r["config"])
        _policy_lines(ax, [r for r in rows if r["budget"] is not None], "budget", metric, "KV budget (tokens)", label)
    _save(plt, fig, axes[0][0], title, out)


def bench_plot(rows: list[dict[str, Any]], out: str | Path, title: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _policy_lines(axes[0], rows, "context", "ms_per_token", "context (tokens)", "decode ms/token")
    _policy_lines(axes[1], rows, "context", "resident_kv_mib", "context (tokens)", "resident KV MiB")
    _save(plt, fig, axes[0], title, out)


def trace_plot(steps: list[dict[int, float]], evictions: list[tuple[int, int]], prompt_pages: int,
               out: str | Path, title: str) -> None:
    import numpy as np

    plt = _pyplot()
    pages = 1 + max((p for step in steps for p in step), default=0)
    grid = np.full((pages, len(steps)), np.nan)
    for t, step in enumerate(steps):
        for page, mass in step.items():
            grid[page, t] = mass
    fig, ax = plt.subplots(figsize=(10, 6))
    from matplotlib.colors import LogNorm

    image = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                      norm=LogNorm(vmin=1e-4, vmax=1.0))
    if evictions:
        ax.scatter([t for t, _ in evictions], [p for _, p in evictions], marker="x", color="red", s=12, label="evicted")
        ax.legend(loc="upper left", fontsize=8)
    ax.axhline(prompt_pages - 0.5, color="white", linewidth=0.8, linestyle=":")
    ax.set_xlabel("decode step")
    ax.set_ylabel("logical page (16 tokens each; prompt below the dotted line)")
    fig.colorbar(image, ax=ax, label="attention mass")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
