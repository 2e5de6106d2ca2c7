"""Accuracy and fidelity runs over a problem set, for each policy and budget, resumable from a JSONL file.

Accuracy: greedy answers, extracted and checked against the gold answer.
Fidelity: each problem's greedy Dense trace is replayed under every policy with eviction active
(teacher forcing, by exact page-chunked replay); what eviction loses shows as the increase in the trace's negative
log-likelihood and as disagreement with Dense's own top-1 prediction, free of sampling noise.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from statistics import mean
from typing import Any

from lemma.engine.engine import Engine
from lemma.engine.policies import Dense, Policy, parse_policy_spec, policy_from_spec
from lemma.engine.recording import Recording
from lemma.engine.sequence import Forced
from lemma.engine.sampler import SamplingParams
from lemma.evaluation.answers import equivalent, extract_answer
from lemma.evaluation.datasets import Problem
from lemma.evaluation.results import ResultsFile

Progress = Callable[[int], None]


def policy_grid(names: list[str], budgets: list[int], pin_prompt: bool = True, dense_layers: int = 0) -> list[Policy]:
    """Dense once (if named), every other policy at every budget. A name may carry options:
    'raas:dense_layers=2' (see policies.parse_policy_spec)."""
    grid: list[Policy] = []
    defaults = {"dense_layers": dense_layers, **({} if pin_prompt else {"pin_prompt": False})}
    for spec in names:
        if parse_policy_spec(spec)[0] == "dense":
            grid.append(policy_from_spec(spec))
            continue
        grid += [policy_from_spec(spec, budget, defaults) for budget in budgets]
    return grid


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def run_accuracy(engine: Engine, problems: list[Problem], policies: list[Policy], params: SamplingParams,
                 results: ResultsFile, batch: int = 8, progress: Progress | None = None) -> None:
    """Batch by batch of problems, every policy on a batch before the next (a run stopped early leaves
    problems answered under every config); what results already holds is skipped."""
    done = results.done("accuracy")
    for chunk in _batches(problems, batch):
        for policy in policies:
            todo = [p for p in chunk if (policy.describe(), p.id) not in done]
            if not todo:
                continue
            engine.policy = policy
            outs = engine.generate([engine.chat_prompt(p.messages()) for p in todo], params)
            records = []
            for problem, out in zip(todo, outs):
                pred = extract_answer(out.text, complete=out.finish_reason == "stop") if out.finish_reason != "error" else None
                records.append({"kind": "accuracy", "config": policy.describe(), "policy": policy.name,
                                "budget": policy.budget, "id": problem.id, "gold": problem.gold, "pred": pred,
                                "correct": equivalent(pred, problem.gold), "finish_reason": out.finish_reason,
                                "error": out.error, "generated_tokens": out.stats.generated_tokens,
                                "jct_seconds": out.stats.jct_seconds, "peak_kv_bytes": out.stats.peak_kv_bytes,
                                "text": out.text})
            results.append(records)
            if progress:
                progress(len(todo))


def answered_by_all(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the problems every config answered (a run stopped early may lack some)."""
    configs = {r["config"] for r in records}
    seen: dict[str, set[str]] = defaultdict(set)
    for r in records:
        seen[r["id"]].add(r["config"])
    return [r for r in records if seen[r["id"]] == configs]


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


BUCKET = 256  # tokens per position bucket of a fidelity record (the report sums them to 1K buckets)


def fidelity_sums(dense_predicted: list[int], dense_logprobs: list[float], logprobs: list[float],
                  predicted: list[int]) -> dict[str, Any]:
    """Per-token NLL increase and top-1 agreement against Dense, summed over the trace, its last third,
    its second half, and each BUCKET tokens of trace position."""
    n = len(dense_logprobs)
    last = n - n // 3 if n >= 3 else 0
    half = n // 2
    diff = [d - p for d, p in zip(dense_logprobs, logprobs)]  # -log p_policy - (-log p_dense)
    agree = [float(a == b) for a, b in zip(predicted, dense_predicted)]
    starts = range(0, n, BUCKET)
    return {"n": n, "nll_sum": sum(diff), "agree_sum": sum(agree),
            "n_last": n - last, "nll_last_sum": sum(diff[last:]), "agree_last_sum": sum(agree[last:]),
            "n_half": n - half, "nll_half_sum": sum(diff[half:]), "agree_half_sum": sum(agree[half:]),
            "bucket": BUCKET, "n_buckets": [min(BUCKET, n - s) for s in starts],
            "nll_buckets": [sum(diff[s : s + BUCKET]) for s in starts],
            "agree_buckets": [sum(agree[s : s + BUCKET]) for s in starts]}


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
    replay_under_policies(engine, [traces[p.id] for p in problems if p.id in traces], policies, results, batch, progress)


def replay_under_policies(engine: Engine, references: list[dict[str, Any]], policies: list[Policy],
                          results: ResultsFile, batch: int = 8, progress: Progress | None = None,
                          shared: dict[str, Recording] | None = None) -> None:
    """Teacher-force each Dense reference ("trace" record: prompt_ids, tokens, logprobs, predicted) under
    every other policy; one "fidelity" record per (policy, reference), skipping those already in results.
    Batch by batch of references, every policy on a batch before the next, each record appended as its
    replay finishes: a run stopped early loses only the replays in flight (the tables compare the traces
    every config has replayed). `shared`: Dense's recordings of references by id, which policy replays
    share where they attend what Dense does (engine/recording.py)."""
    policies = [p for p in policies if not isinstance(p, Dense)]
    done = results.done("fidelity")
    for chunk in _batches(references, batch):
        for policy in policies:
            todo = remaining(policy, chunk, done)
            if not todo:
                continue
            engine.policy = policy
            prefixes = None if shared is None else [shared.get(r["id"]) for r in todo]

            def keep(i: int, forced: Forced) -> None:  # as each replay finishes: a stop loses only those running
                results.append([fidelity_record(policy, todo[i], forced)])
                if progress:
                    progress(1)

            engine.teacher_force([r["prompt_ids"] for r in todo], [r["tokens"] for r in todo], shared=prefixes,
                                 on_finished=keep)


def fidelity_record(policy: Policy, reference: dict[str, Any], forced: Forced) -> dict[str, Any]:
    """The "fidelity" record of one replay of a Dense reference under `policy`."""
    record = {"kind": "fidelity", "config": policy.describe(), "policy": policy.name,
              "budget": policy.budget, "id": reference["id"], "error": forced.error}
    if forced.error is None:
        record.update(fidelity_sums(reference["predicted"], reference["logprobs"], forced.logprobs, forced.predicted))
        record.update(pages_evicted=forced.stats.pages_evicted, peak_kv_pages=forced.stats.peak_kv_pages,
                      shared_tokens=forced.shared_tokens)
    return record


def remaining(policy: Policy, references: list[dict[str, Any]], done: set) -> list[dict[str, Any]]:
    """The references `policy` has no fidelity record of yet."""
    return [r for r in references if (policy.describe(), r["id"]) not in done]


def summarize_fidelity(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per config: NLL increase and top-1 agreement per token overall, in the last third, in each half
    and per position bucket (`position`: [(first token, tokens, NLL increase, agreement)], records
    that carry buckets only), with mean pages evicted and held."""
    rows = []
    for config, rs in _by_config(records).items():
        ok = [r for r in rs if r.get("error") is None]
        n, n_last = sum(r["n"] for r in ok), sum(r["n_last"] for r in ok)
        row = {"config": config, "policy": rs[0]["policy"], "budget": rs[0]["budget"], "problems": len(ok),
               "errors": len(rs) - len(ok), "tokens": n,
               "nll_increase": _per_token(ok, "nll_sum", n), "agreement": _per_token(ok, "agree_sum", n),
               "nll_increase_last_third": _per_token(ok, "nll_last_sum", n_last),
               "agreement_last_third": _per_token(ok, "agree_last_sum", n_last)}
        halves = [r for r in ok if "n_half" in r]
        if halves and len(halves) == len(ok):
            second = sum(r["n_half"] for r in ok)
            row.update(nll_increase_second_half=_per_token(ok, "nll_half_sum", second),
                       agreement_second_half=_per_token(ok, "agree_half_sum", second))
            first = n - second
            row["nll_increase_first_half"] = (sum(r["nll_sum"] - r["nll_half_sum"] for r in ok) / first) if first else None
            row["agreement_first_half"] = (sum(r["agree_sum"] - r["agree_half_sum"] for r in ok) / first) if first else None
            row["position"], row["position_bucket"] = _by_position(ok), ok[0]["bucket"]
        if ok and all("pages_evicted" in r for r in ok):
            row["mean_pages_evicted"] = mean(r["pages_evicted"] for r in ok)
            row["mean_peak_kv_pages"] = mean(r["peak_kv_pages"] for r in ok)
        rows.append(row)
    return sorted(rows, key=lambda r: (r["policy"], r["budget"] or 0))


def comparable(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[Any, dict[str, dict[str, Any]]]]:
    """The fidelity records whose rows compare like with like: at each budget, only the traces every
    config at that budget replayed without error (a run stopped early may lack some). Also
    {budget: {trace id: a failed record}} for the failures left out."""
    failed: dict[Any, dict[str, dict[str, Any]]] = {}
    for r in records:
        if r.get("error") is not None:
            failed.setdefault(r["budget"], {})[r["id"]] = r
    by_budget: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["id"] not in failed.get(r["budget"], {}):
            by_budget[r["budget"]].append(r)
    return [r for group in by_budget.values() for r in answered_by_all(group)], failed


def _by_position(records: list[dict[str, Any]]) -> list[tuple[int, int, float, float]]:
    """(first token, tokens, NLL increase per token, agreement) per position bucket, over all records."""
    size = records[0]["bucket"]
    tokens: dict[int, float] = defaultdict(float)
    nll: dict[int, float] = defaultdict(float)
    agree: dict[int, float] = defaultdict(float)
    for r in records:
        for i, (count, diff, same) in enumerate(zip(r["n_buckets"], r["nll_buckets"], r["agree_buckets"])):
            tokens[i] += count
            nll[i] += diff
            agree[i] += same
    return [(i * size, int(tokens[i]), nll[i] / tokens[i], agree[i] / tokens[i]) for i in sorted(tokens) if tokens[i]]


def regroup(position: list[tuple[int, int, float, float]], size: int) -> list[tuple[int, int, float, float]]:
    """Position buckets merged into buckets of `size` tokens (a multiple of theirs)."""
    merged: dict[int, list[float]] = {}
    for start, count, nll, agree in position:
        key = start // size * size
        acc = merged.setdefault(key, [0.0, 0.0, 0.0])
        acc[0] += count
        acc[1] += nll * count
        acc[2] += agree * count
    return [(k, int(c), s / c, a / c) for k, (c, s, a) in sorted(merged.items())]


def _per_token(records: list[dict[str, Any]], key: str, tokens: int) -> float | None:
    """The mean of `key` per token, or None (n/a) where no token was measured: every problem failed."""
    return sum(r[key] for r in records) / tokens if tokens else None
