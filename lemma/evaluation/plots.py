"""PNG plots for bench, eval and trace (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from typing import Any

from lemma.errors import LemmaError
from lemma.evaluation.outputs import writing


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LemmaError("plots need matplotlib: pip install 'lemma[plot]'") from None
    return plt


def _by_policy(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["policy"]].append(r)
    return groups


def _unmeasured(rows: list[dict[str, Any]], metric: str, x: str) -> str:
    """A legend note for the rows without a value (every problem failed), or ''."""
    failed = [r for r in rows if r[metric] is None]
    if not failed:
        return ""
    return " (n/a at " + ", ".join(f"{r[x]}: {r.get('errors', 0)} failed" for r in failed) + ")"


def _policy_lines(ax, rows: list[dict[str, Any]], x: str, metric: str, xlabel: str, ylabel: str) -> None:
    """One line per policy over the rows that have a value; rows without one are named in the legend."""
    for policy, group in _by_policy(rows).items():
        points = sorted((r[x], r[metric]) for r in group if r[metric] is not None)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                label=policy + _unmeasured(group, metric, x))
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _save(plt, fig, title: str, out: str | Path) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    from lemma.models.staging import replace_file  # (lemma.models imports the CLI's measure commands)

    out, png = Path(out), io.BytesIO()
    fig.savefig(png, dpi=120, format="png")
    plt.close(fig)
    with writing(out, "plot"):
        replace_file(out, png.getvalue())  # whole or not at all: a full disk leaves the old plot (or none)


def metric_vs_budget(rows: list[dict[str, Any]], metrics: list[tuple[str, str]], out: str | Path, title: str) -> None:
    """One panel per (metric, label); one line per policy; Dense (no budget) as a dashed level."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, (metric, label) in zip(axes[0], metrics):
        for r in [r for r in rows if r["budget"] is None]:  # Dense: a dashed level, or a legend entry saying n/a
            if r[metric] is None:
                ax.plot([], [], color="black", linestyle="--", label=f"{r['config']} (n/a: {r.get('errors', 0)} failed)")
            else:
                ax.axhline(r[metric], color="black", linestyle="--", label=r["config"])
        _policy_lines(ax, [r for r in rows if r["budget"] is not None], "budget", metric, "KV budget (tokens)", label)
    axes[0][0].legend(fontsize=8)
    _save(plt, fig, title, out)


def bench_plot(rows: list[dict[str, Any]], out: str | Path, title: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _policy_lines(axes[0], rows, "context", "ms_per_token", "context (tokens)", "decode ms/token")
    _policy_lines(axes[1], rows, "context", "resident_kv_mib", "context (tokens)", "resident KV MiB")
    axes[0].legend(fontsize=8)
    _save(plt, fig, title, out)


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
    _save(plt, fig, title, out)


def fidelity_vs_position(rows: list[dict[str, Any]], out: str | Path, title: str) -> None:
    """NLL increase per token against position in the trace: one panel per budget, one line per policy."""
    plt = _pyplot()
    budgets = sorted({r["budget"] for r in rows if r.get("position") and r["budget"] is not None})
    if not budgets:
        raise LemmaError("no per-position fidelity to plot (no policy besides dense measured)")
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.5 * len(budgets), 4), squeeze=False, sharey=True)
    for ax, budget in zip(axes[0], budgets):
        for r in sorted((r for r in rows if r["budget"] == budget and r.get("position")), key=lambda r: r["config"]):
            half = r["position_bucket"] / 2
            ax.plot([start + half for start, _, _, _ in r["position"]], [nll for _, _, nll, _ in r["position"]],
                    marker=".", label=r["config"].replace(f"-{budget}", ""))
        ax.set_title(f"budget {budget}")
        ax.set_xlabel("position in the trace (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("NLL increase per token vs Dense")
    _save(plt, fig, title, out)
