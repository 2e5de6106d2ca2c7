"""Markdown tables from a `lemma eval --traces` results file: NLL increase / top-1 agreement per policy
(rows) and budget (columns), then the same by trace half and by 1K-token position bucket; with
--plots, the two plots `lemma eval --traces` draws, from the finished traces only (a run stopped for
time draws none).

    python -m bench.fidelity_tables bench/results/fidelity_traces_math500_smollm2.jsonl [--plots]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from lemma.evaluation import plots, runs
from lemma.evaluation.results import ResultsFile


def main(path: str, draw: bool = False) -> None:
    everything = ResultsFile(path).of("fidelity")
    records, failed = runs.comparable(everything)
    rows = runs.summarize_fidelity(records)
    if draw:
        title = Path(path).stem
        plots.metric_vs_budget(rows, [("nll_increase", "NLL increase per token"),
                                      ("agreement", "top-1 agreement with Dense")], Path(path).with_suffix(".png"), title)
        plots.fidelity_vs_position(rows, Path(path).with_name(Path(path).stem + "-position.png"), title)
    budgets = sorted({r["budget"] for r in rows})
    by_policy: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in rows:
        name = r["config"].replace(f"-{r['budget']}", "", 1)
        by_policy[name][r["budget"]] = r
    traces = {b: max(r["problems"] for r in rows if r["budget"] == b) for b in budgets}
    print("| policy | " + " | ".join(f"{b} ({traces[b]} traces)" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for name, cells in sorted(by_policy.items()):
        print(f"| {name} | " + " | ".join(f"{cells[b]['nll_increase']:.3f} / {cells[b]['agreement']:.3f}"
                                          if b in cells else "–" for b in budgets) + " |")
    print("\nNLL increase, first half / second half of each trace:\n")
    print("| policy | " + " | ".join(str(b) for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for name, cells in sorted(by_policy.items()):
        print(f"| {name} | " + " | ".join(f"{cells[b]['nll_increase_first_half']:.3f} / {cells[b]['nll_increase_second_half']:.3f}"
                                          if b in cells else "–" for b in budgets) + " |")
    print("\nNLL increase per 1K-token bucket of trace position (tokens in the bucket):")
    for b in budgets:
        kilo = [runs.regroup(cells[b]["position"], 1024) for cells in by_policy.values() if b in cells]
        starts = [start for start, *_ in kilo[0]]
        print(f"\nbudget {b}:\n\n| policy | " + " | ".join(f"{s // 1024}-{s // 1024 + 1}K ({n} tokens)"
                                                      for s, n, *_ in kilo[0]) + " |")
        print("|---|" + "---|" * len(starts))
        for name, cells in sorted(by_policy.items()):
            if b in cells:
                print(f"| {name} | " + " | ".join(f"{nll:.3f}" for _, _, nll, _ in runs.regroup(cells[b]["position"], 1024)) + " |")
    for budget, bad in sorted(failed.items()):
        replayed = {r["id"] for r in everything if r["budget"] == budget}
        refusers = sorted({r["config"] for r in everything if r["budget"] == budget and r.get("error") is not None})
        print(f"\nbudget {budget}: {len(bad)} of the {len(replayed)} traces replayed so far at this budget are left out of "
              f"every row above because {', '.join(refusers)} could not replay them (first: {next(iter(bad.values()))['error']})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a `lemma eval --traces` results file (JSONL)")
    parser.add_argument("--plots", action="store_true", help="also draw the two plots next to it")
    args = parser.parse_args()
    if not args.results.is_file():
        sys.exit(f"error: results file {args.results} does not exist")
    main(str(args.results), args.plots)
