"""Accuracy and fidelity runs over a problem set, for each policy and budget, resumable from a JSONL file.

Accuracy: greedy answers, extracted and checked against the gold answer.
Fidelity: each problem's greedy Dense trace is replayed token by token under every policy with eviction
active (teacher forcing); what eviction loses shows as the increase in the trace's negative
log-likelihood and as disagreement with Dense's own top-1 prediction, free of sampling noise.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from statistics import mean
from typing import Any

from lemma.engine.engine import Engine
from lemma.engine.policies import Dense, Policy, make_policy
from lemma.engine.sampler import SamplingParams
from lemma.evaluation.answers import equivalent, extract_answer
from lemma.evaluation.datasets import Problem
from lemma.evaluation.results import ResultsFile

Progress = Callable[[int], None]


def policy_grid(names: list[str], budgets: list[int], pin_prompt: bool = True, dense_layers: int = 0) -> list[Policy]:
    """Dense once (if named), every other policy at every budget."""
    grid: list[Policy] = []
    for name in names:
        if name == "dense":
            grid.append(Dense())
            continue
        options = {"pin_prompt": pin_prompt} if name == "raas" else {}
        grid += [make_policy(name, budget, dense_layers=dense_layers, **options) for budget in budgets]
    return grid


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def run_accuracy(engine: Engine, problems: list[Problem], policies: list[Policy], params: SamplingParams,
                 results: ResultsFile, batch: int = 8, progress: Progress | None = None) -> None:
    for policy in policies:
        engine.policy = policy
        done = results.done("accuracy")
        todo = [p for p in problems if (policy.describe(), p.id) not in done]
        for chunk in _batches(todo, batch):
            outs = engine.generate([engine.chat_prompt(p.messages()) for p in chunk], params)
            records = []
            for problem, out in zip(chunk, outs):
                pred = extract_answer(out.text, complete=out.finish_reason == "stop") if out.finish_reason != "error" else None
                records.append({"kind": "accuracy", "config": policy.describe(), "policy": policy.name,
                                "budget": policy.budget, "id": problem.id, "gold": problem.gold, "pred": pred,
                                "correct": equivalent(pred, problem.gold), "finish_reason": out.finish_reason,
                                "error": out.error, "generated_tokens": out.stats.generated_tokens,
                                "jct_seconds": out.stats.jct_seconds, "peak_kv_bytes": out.stats.peak_kv_bytes,
                                "text": out.text})
            results.append(records)
            if progress:
                progress(len(chunk))


def _by_config(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[r["config"]].append(r)
    return groups


def summarize_accuracy(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for config, rs in _by_config(records).items():
        ok = [r for r in rs if r["finish_reason"] != "error"]
        # a failed problem counts as wrong; where every one failed there is no accuracy to report (None: n/a)
        rows.append({"config": config, "policy": rs[0]["policy"], "budget": rs[0]["budget"], "problems": len(rs),
                     "errors": len(rs) - len(ok),
                     "accuracy": sum(r["correct"] for r in rs) / len(rs) if ok else None,
                     "mean_generated_tokens": mean(r["generated_tokens"] for r in ok) if ok else None,
                     "mean_jct_seconds": mean(r["jct_seconds"] for r in ok) if ok else None,
                     "peak_kv_mib": max(r["peak_kv_bytes"] for r in ok) / 2**20 if ok else None})
    return sorted(rows, key=lambda r: (r["policy"] != "dense", r["policy"], r["budget"] or 0))


def fidelity_sums(dense_predicted: list[int], dense_logprobs: list[float], logprobs: list[float],
                  predicted: list[int]) -> dict[str, float]:
    """Per-token NLL increase and top-1 agreement against Dense, summed over the trace and over its last third."""
    n = len(dense_logprobs)
    last = n - n // 3 if n >= 3 else 0
    diff = [d - p for d, p in zip(dense_logprobs, logprobs)]  # -log p_policy - (-log p_dense)
    agree = [float(a == b) for a, b in zip(predicted, dense_predicted)]
    return {"n": n, "nll_sum": sum(diff), "agree_sum": sum(agree),
            "n_last": n - last, "nll_last_sum": sum(diff[last:]), "agree_last_sum": sum(agree[last:])}


def run_fidelity(engine: Engine, problems: list[Problem], policies: list[Policy], max_tokens: int,
                 results: ResultsFile, batch: int = 8, progress: Progress | None = None) -> None:
    engine.policy = Dense()
    have = {r["id"] for r in results.of("trace")}
    for chunk in _batches([p for p in problems if p.id not in have], batch):
        prompts = [engine.chat_prompt(p.messages()) for p in chunk]
        outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens))
        ok = [i for i, o in enumerate(outs) if o.token_ids]  # a failed request has no trace to replay
        forced = dict(zip(ok, engine.teacher_force([prompts[i] for i in ok], [outs[i].token_ids for i in ok])))
        results.append([{"kind": "trace", "config": "dense", "id": p.id, "prompt_ids": prompts[i], "tokens": o.token_ids,
                         "logprobs": forced[i].logprobs, "predicted": forced[i].predicted}
                        if i in forced else {"kind": "trace", "config": "dense", "id": p.id, "error": o.error}
                        for i, (p, o) in enumerate(zip(chunk, outs))])
        if progress:
            progress(len(chunk))
    traces = {r["id"]: r for r in results.of("trace") if "tokens" in r}
    wanted = [traces[p.id] for p in problems if p.id in traces]
    for policy in policies:
        if isinstance(policy, Dense):
            continue
        engine.policy = policy
        done = results.done("fidelity")
        todo = [t for t in wanted if (policy.describe(), t["id"]) not in done]
        for chunk in _batches(todo, batch):
            forced = engine.teacher_force([t["prompt_ids"] for t in chunk], [t["tokens"] for t in chunk])
            records = []
            for trace, f in zip(chunk, forced):
                record = {"kind": "fidelity", "config": policy.describe(), "policy": policy.name,
                          "budget": policy.budget, "id": trace["id"], "error": f.error}
                if f.error is None:
                    record.update(fidelity_sums(trace["predicted"], trace["logprobs"], f.logprobs, f.predicted))
                records.append(record)
            results.append(records)
            if progress:
                progress(len(chunk))


def summarize_fidelity(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for config, rs in _by_config(records).items():
        ok = [r for r in rs if r.get("error") is None]
        n, n_last = sum(r["n"] for r in ok), sum(r["n_last"] for r in ok)
        rows.append({"config": config, "policy": rs[0]["policy"], "budget": rs[0]["budget"], "problems": len(ok),
                     "errors": len(rs) - len(ok), "tokens": n,
                     "nll_increase": _per_token(ok, "nll_sum", n), "agreement": _per_token(ok, "agree_sum", n),
                     "nll_increase_last_third": _per_token(ok, "nll_last_sum", n_last),
                     "agreement_last_third": _per_token(ok, "agree_last_sum", n_last)})
    return sorted(rows, key=lambda r: (r["policy"], r["budget"] or 0))


def _per_token(records: list[dict[str, Any]], key: str, tokens: int) -> float | None:
    """The mean of `key` per token, or None (n/a) where no token was measured: every problem failed."""
    return sum(r[key] for r in records) / tokens if tokens else None
