"""Fidelity over long reasoning traces written by other models: each trace is teacher-forced into the
evaluated model (problem as the user turn, trace as the assistant turn) under Dense and under every
policy and budget, by exact chunked replay; what eviction loses is the increase in the trace's NLL and
the disagreement with Dense's top-1, overall and by position in the trace.

Trace files (shared/data/reasoning_traces/): one JSON object per line with "problem" and "trace" (the
continuation only: reasoning, one "</think>", the answer); "model" and "meta" name where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lemma.engine.engine import Engine
from lemma.engine.policies import Dense, Policy
from lemma.engine.recording import Recording
from lemma.engine.sequence import Forced
from lemma.errors import LemmaError
from lemma.evaluation.datasets import json_rows
from lemma.evaluation.jsonl import json_kind
from lemma.evaluation.results import ResultsFile
from lemma.evaluation.runs import Progress, _batches, remaining, replay_under_policies
from lemma.reasoning import CLOSE, OPEN, opens_thinking


@dataclass(frozen=True)
class ReasoningTrace:
    id: str
    problem: str
    trace: str


def load_traces(path: str | Path, limit: int | None = None) -> list[ReasoningTrace]:
    """The traces in a JSONL file (the first `limit`); anything malformed raises naming file and line."""
    path = Path(path)
    traces: list[ReasoningTrace] = []
    seen: dict[str, int] = {}
    for line_no, where, row in json_rows(path):
        if not isinstance(row, dict):
            raise LemmaError(f"{where}: {json_kind(row)}, not a JSON object with 'problem' and 'trace'")
        for key in ("problem", "trace"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise LemmaError(f"{where}: {key!r} must be a non-empty string")
        meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
        index = meta.get("math500_unique_id", meta.get("index_in_source_file", line_no))
        trace_id = f"{row.get('model', path.stem)}:{index}"
        if trace_id in seen:
            trace_id = f"{trace_id}@{line_no}"
        seen[trace_id] = line_no
        traces.append(ReasoningTrace(trace_id, row["problem"], row["trace"]))
        if limit is not None and len(traces) >= limit:
            break
    if not traces:
        raise LemmaError(f"{path}: no traces in the file")
    return traces


def trace_tokens(engine: Engine, trace: ReasoningTrace, max_trace_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids): the problem as the user turn in the chat template; the trace as the
    assistant turn with its opening <think> restored (unless the template already opened it), cut to
    max_trace_tokens and to the model's context."""
    prompt = engine.chat_prompt([{"role": "user", "content": trace.problem}])
    text = trace.trace
    if CLOSE in text and OPEN not in text and not opens_thinking(engine.tokenizer.decode(prompt, skip_special_tokens=False)):
        text = f"{OPEN}\n{text}"
    room = engine.config.max_position_embeddings - len(prompt)
    target = engine.tokenizer.encode(text)[: min(max_trace_tokens, room)]
    if not target:
        raise LemmaError(f"trace {trace.id}: the prompt ({len(prompt)} tokens) leaves no room in the model's context")
    return prompt, target


def evenly_spaced(traces: list[ReasoningTrace], count: int) -> list[ReasoningTrace]:
    """`count` traces spread evenly over the list (all of them if it has no more): a file ordered by
    source model or difficulty is sampled from every part."""
    if count >= len(traces):
        return traces
    return [traces[i * len(traces) // count] for i in range(count)]


GROUP_PER_BATCH = 4  # `lemma eval --traces` groups 4x --batch traces: the batch refills within a group


def run_trace_fidelity(engine: Engine, traces: list[ReasoningTrace], policies: list[Policy], max_trace_tokens: int,
                       results: ResultsFile, group: int = 16, progress: Progress | None = None) -> None:
    """Group by group of traces: Dense's log-probs of the traces (stored: the reference), then every other
    policy on them; an interrupted run resumes from `results` and leaves whole traces behind it.
    A group goes to the engine longest trace first, so the engine's batch (its max_batch) refills as
    shorter ones finish instead of running its longest one alone. Dense's replay records its attention
    inputs up to where the policies still attend what it does, and their replays share that prefix
    (engine/recording.py); a resumed group whose policies are not all done replays Dense again to record."""
    record_until = max([p.dense_prefix(0) for p in policies if not isinstance(p, Dense)], default=0)
    record_until = record_until if engine.shares_prefixes else 0
    for chunk in _batches(traces, group):
        _run_group(engine, chunk, policies, max_trace_tokens, results, group, record_until, progress)


def _run_group(engine: Engine, chunk: list[ReasoningTrace], policies: list[Policy], max_trace_tokens: int,
               results: ResultsFile, group: int, record_until: int, progress: Progress | None) -> None:
    """One group: Dense (recording) on the traces it has not replayed, then every policy on all of them.
    The recordings live only while this runs."""
    engine.policy = Dense()
    have = {r["id"] for r in results.of("trace")}
    todo = [t for t in chunk if t.id not in have]
    shared: dict[str, Recording] = {}
    if todo:
        pairs = {t.id: trace_tokens(engine, t, max_trace_tokens) for t in todo}
        todo.sort(key=lambda t: -sum(map(len, pairs[t.id])))

        def keep(i: int, f: Forced) -> None:  # as each replay finishes: a stop loses only those running
            t = todo[i]
            results.append([{"kind": "trace", "config": "dense", "id": t.id, "prompt_ids": pairs[t.id][0],
                             "tokens": pairs[t.id][1], "logprobs": f.logprobs, "predicted": f.predicted}
                            if f.error is None else {"kind": "trace", "config": "dense", "id": t.id, "error": f.error}])
            if f.error is None and f.recording is not None:
                shared[t.id] = f.recording
            if progress:
                progress(1)

        engine.teacher_force([pairs[t.id][0] for t in todo], [pairs[t.id][1] for t in todo],
                             record_until=record_until, on_finished=keep)
    references = {r["id"]: r for r in results.of("trace") if "tokens" in r}
    refs = sorted((references[t.id] for t in chunk if t.id in references),
                  key=lambda r: -len(r["prompt_ids"]) - len(r["tokens"]))
    done = results.done("fidelity")
    others = [p for p in policies if not isinstance(p, Dense)]
    unrecorded = [r for r in refs if r["id"] not in shared and any(remaining(p, [r], done) for p in others)]
    if record_until and unrecorded:  # resumed: record Dense again up to record_until, with the stored scores
        cut = [r["tokens"][: max(1, record_until - len(r["prompt_ids"]) + 1)] for r in unrecorded]
        again = engine.teacher_force([r["prompt_ids"] for r in unrecorded], cut, record_until=record_until)
        for ref, f in zip(unrecorded, again):
            if f.error is None and f.recording is not None:
                f.recording.finish_as(ref["tokens"], ref["logprobs"], ref["predicted"])
                shared[ref["id"]] = f.recording
    replay_under_policies(engine, refs, policies, results, group, progress, shared)
