"""`lemma eval --traces`: trace files, the chat-template framing, position buckets, policy specs, the
Random and RaaS-recent rules, and the command end to end with resume."""

import json

import pytest
import torch

from lemma import Engine, LemmaError, RaaS, RandomEviction, make_policy
from lemma.engine.policies import SlotMeta, parse_policy_spec
from lemma.evaluation import runs
from lemma.evaluation.traces import ReasoningTrace, evenly_spaced, load_traces, trace_tokens
from test_cli import assert_one_line_error, invoke

TRACES = [{"problem": "What is 2+2?", "trace": "Two plus two. " * 12 + "</think>\nThe answer is 4.", "model": "m",
           "meta": {"index_in_source_file": i}} for i in range(3)]


def write_traces(path, rows=TRACES):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_traces_and_their_errors(tmp_path):
    traces = load_traces(write_traces(tmp_path / "t.jsonl"))
    assert [t.id for t in traces] == ["m:0", "m:1", "m:2"]
    assert len(load_traces(tmp_path / "t.jsonl", limit=2)) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(TRACES[0]) + "\n" + json.dumps({"problem": "x"}) + "\n")
    with pytest.raises(LemmaError, match=r"bad.jsonl:2: 'trace' must be a non-empty string"):
        load_traces(bad)
    bad.write_text("{not json\n")
    with pytest.raises(LemmaError, match=r"bad.jsonl:1"):
        load_traces(bad)


def test_trace_framing_restores_think_and_cuts(tiny_dir, monkeypatch):
    engine = Engine(tiny_dir, kv_cache_tokens=1024)
    trace = ReasoningTrace("x", "What is 2+2?", "Two plus two.</think>4")
    prompt, target = trace_tokens(engine, trace, 10_000)
    assert prompt == engine.chat_prompt([{"role": "user", "content": "What is 2+2?"}])
    assert target == engine.tokenizer.encode("<think>\nTwo plus two.</think>4")
    assert trace_tokens(engine, trace, 5)[1] == target[:5]
    monkeypatch.setattr("lemma.evaluation.traces.opens_thinking", lambda text: True)  # the template opened it
    assert trace_tokens(engine, trace, 10_000)[1] == engine.tokenizer.encode("Two plus two.</think>4")


def test_fidelity_sums_by_half_and_bucket():
    n = 600
    dense = [-1.0] * n
    policy = [-1.0] * 300 + [-3.0] * 300  # the second half loses 2 nats per token
    sums = runs.fidelity_sums([7] * n, dense, policy, [7] * 300 + [8] * 300)
    assert sums["nll_sum"] == 600 and sums["nll_half_sum"] == 600 and sums["n_half"] == 300
    assert sums["n_buckets"] == [256, 256, 88]
    assert sums["nll_buckets"] == [0, 2 * 212, 2 * 88] and sums["agree_buckets"] == [256, 44, 0]
    row = runs.summarize_fidelity([{"config": "raas-64", "policy": "raas", "budget": 64, "id": "a", "error": None,
                                    "pages_evicted": 3, "peak_kv_pages": 4, **sums}])[0]
    assert row["nll_increase_first_half"] == 0 and row["nll_increase_second_half"] == 2
    assert [round(p[2], 3) for p in row["position"]] == [0, round(424 / 256, 3), 2]
    assert runs.regroup(row["position"], 1024) == [(0, 600, 1.0, 0.5)]


def test_policy_specs_and_descriptions():
    assert parse_policy_spec("raas:dense_layers=2:refresh=mass:pin_prompt=false") == (
        "raas", {"dense_layers": 2, "refresh": "mass", "pin_prompt": False})
    assert parse_policy_spec("raas:refresh_threshold=0.5")[1] == {"refresh_threshold": 0.5}
    with pytest.raises(LemmaError, match="name=value"):
        parse_policy_spec("raas:recent")
    assert make_policy("raas", 256, dense_layers=2).describe() == "raas-256(dense_layers=2)"
    assert RaaS(budget=256).describe() == "raas-256"
    with pytest.raises(LemmaError, match="recent"):
        RaaS(budget=64, recent=-1)
    capped = make_policy("raas-capped", 128)
    assert (capped.refresh, capped.recent, capped.pin_share, capped.describe()) == ("mass", 2, 0.5, "raas-capped-128")


def slots(born, pinned=None):
    born = torch.tensor(born)[None, None]
    pin = torch.tensor(pinned)[None, None] if pinned else torch.zeros_like(born, dtype=torch.bool)
    return SlotMeta(born=born, stamp=born * 16, mass=torch.zeros(born.shape), pinned=pin,
                    valid=torch.ones_like(born, dtype=torch.bool))


def test_random_eviction_is_uniform_over_unpinned_pages_and_stateless():
    pinned = [True, True, False, False, False, False]
    chosen = [RandomEviction(budget=96).victim(slots([0, 1, 2, 3, 4, 5], pinned), torch.tensor([page])).item()
              for page in range(6, 606)]
    counts = [chosen.count(s) for s in range(6)]
    assert counts[:2] == [0, 0] and all(110 <= c <= 190 for c in counts[2:]), counts  # ~150 each
    again = RandomEviction(budget=96).victim(slots([0, 1, 2, 3, 4, 5], pinned), torch.tensor([6])).item()
    assert again == chosen[0]
    other = [RandomEviction(budget=96, seed=1).victim(slots([0, 1, 2, 3, 4, 5], pinned), torch.tensor([p])).item()
             for p in range(6, 606)]
    assert other != chosen


def test_raas_recent_pages_go_last():
    m = slots([0, 1, 2, 3, 4], [True, False, False, False, False])
    m.stamp = torch.tensor([[[0, 900, 900, 10, 20]]])  # the recent pages 3 and 4 have the oldest stamps
    assert RaaS(budget=80).victim(m, torch.tensor([5])).item() == 3
    assert RaaS(budget=80, recent=3).victim(m, torch.tensor([5])).item() == 1  # pages 3, 4 (and 5) protected
    m.pinned = torch.tensor([[[True, True, True, False, False]]])
    assert RaaS(budget=80, recent=3).victim(m, torch.tensor([5])).item() == 3  # nothing older left


def test_eval_traces_command_and_resume(tiny_dir, tmp_path):
    data = write_traces(tmp_path / "traces.jsonl")
    out = tmp_path / "fid.jsonl"
    args = ["eval", "--traces", data, "--model", tiny_dir, "--policies", "dense,raas,random,raas:recent=1",
            "--budgets", "64,1024", "--max-trace-tokens", 100, "--batch", 2, "--out", out]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "3 traces (300 tokens, cut at 100)" in result.output
    for config in ("raas-64", "random-64", "raas-64(recent=1)"):
        assert f"| {config} | 3 | 300 |" in result.output
    assert "| raas-1024 | 3 | 300 | 0.0000 | 1.000 |" in result.output  # nothing evicted: Dense exactly
    assert "NLL 2nd half" in result.output and "NLL 0-1K" in result.output
    assert "of their targets from Dense's shared prefix" in result.output
    assert (tmp_path / "fid.png").stat().st_size > 0 and (tmp_path / "fid-position.png").stat().st_size > 0
    lines = out.read_text().splitlines()
    assert invoke(*args).exit_code == 0 and out.read_text().splitlines() == lines  # nothing ran twice
    assert_one_line_error(invoke("eval", "--traces", data, "--data", data, "--model", tiny_dir), "exactly one of --data")
    assert_one_line_error(invoke("eval", "--traces", data, "--model", tiny_dir, "--policies", "raas:recnt=2"),
                          "raas has no option 'recnt'")
    assert_one_line_error(invoke("eval", "--traces", data, "--model", tiny_dir, "--sample", 2, "--limit", 2),
                          "at most one of --limit")
    assert_one_line_error(invoke("eval", "--data", data, "--model", tiny_dir, "--sample", 2), "--sample applies to --traces")
    for bad in ("2/2", "1", "a/2", "-1/2"):
        assert_one_line_error(invoke(*args[:-2], "--out", tmp_path / "x.jsonl", "--shard", bad), "--shard must be K/N")
    kinds = [(r["kind"], r["config"], r["id"]) for r in map(json.loads, lines) if "kind" in r]
    # group by group (4 x --batch traces: all three here): Dense, then all six policy configs
    assert kinds[:3] == [("trace", "dense", f"m:{i}") for i in range(3)]
    assert len(kinds) == 21 and {k[0] for k in kinds[3:]} == {"fidelity"} and len({k[1] for k in kinds[3:]}) == 6


def test_shards_of_one_results_file_make_up_the_unsharded_run(tiny_dir, tmp_path):
    data = write_traces(tmp_path / "traces.jsonl")
    args = ["eval", "--traces", data, "--model", tiny_dir, "--policies", "dense,raas,h2o", "--budgets", "64",
            "--max-trace-tokens", 100, "--batch", 2]
    whole, sharded = tmp_path / "whole.jsonl", tmp_path / "sharded.jsonl"
    assert invoke(*args, "--out", whole).exit_code == 0
    first = invoke(*args, "--out", sharded, "--shard", "0/2")
    assert first.exit_code == 0 and "2 traces (200 tokens" in first.output
    assert invoke(*args, "--out", sharded, "--shard", "1/2").exit_code == 0
    records = lambda path: {(r["kind"], r["config"], r["id"]): r for r in map(json.loads, path.read_text().splitlines())}  # noqa: E731
    expected, got = records(whole), records(sharded)
    assert got.keys() == expected.keys()
    for key, r in got.items():
        if key[0] == "fidelity":
            assert r["n"] == expected[key]["n"] and r["nll_sum"] == pytest.approx(expected[key]["nll_sum"], abs=1e-4)


def test_a_stopped_trace_run_keeps_every_replay_that_finished(tiny_dir, tmp_path):
    """Records land as each replay finishes, so a run stopped mid-batch loses only the replays in flight,
    and resuming it gives the records of an uninterrupted run."""
    from lemma.evaluation.results import ResultsFile
    from lemma.evaluation.traces import run_trace_fidelity

    rows = [dict(r, trace="Step by step, carefully. " * (6 + 9 * i)) for i, r in enumerate(TRACES)]
    traces = load_traces(write_traces(tmp_path / "traces.jsonl", rows))
    policies = [make_policy("dense"), make_policy("raas", 64), make_policy("h2o", 64)]
    engine = Engine(tiny_dir, kv_cache_tokens=4096, dtype="float32")
    whole = ResultsFile(tmp_path / "whole.jsonl")
    run_trace_fidelity(engine, traces, policies, 400, whole, group=4)

    class Stop(Exception):
        pass

    finished = []

    def stop_after_five(n: int) -> None:  # three Dense traces, then two of raas-64's three replays
        finished.append(n)
        if len(finished) == 5:
            raise Stop

    stopped = ResultsFile(tmp_path / "stopped.jsonl")
    with pytest.raises(Stop):
        run_trace_fidelity(engine, traces, policies, 400, stopped, group=4, progress=stop_after_five)
    kept = [(r["kind"], r["config"]) for r in ResultsFile(stopped.path).records]
    assert kept == [("trace", "dense")] * 3 + [("fidelity", "raas-64")] * 2
    resumed = ResultsFile(stopped.path)
    run_trace_fidelity(engine, traces, policies, 400, resumed, group=4)
    expected = {(r["config"], r["id"]): r for r in whole.of("fidelity")}
    got = {(r["config"], r["id"]): r for r in resumed.of("fidelity")}
    assert got.keys() == expected.keys() and len(got) == 6
    assert all(got[k]["nll_sum"] == pytest.approx(expected[k]["nll_sum"], abs=1e-4) for k in got)


def test_results_file_reads_and_appends_wait_for_another_writers_lock(tmp_path):
    import fcntl
    import threading

    from lemma.evaluation.results import ResultsFile

    path = tmp_path / "shared.jsonl"
    results = ResultsFile(path)
    record = {"kind": "trace", "config": "dense", "id": "a", "error": "x"}
    results.append([record])
    with open(path, "rb") as other_writer:  # another process's open file holding the lock mid-append
        fcntl.flock(other_writer, fcntl.LOCK_EX)
        opened: list = []
        appending = threading.Thread(target=lambda: results.append([{**record, "id": "b"}]))
        opening = threading.Thread(target=lambda: opened.append(ResultsFile(path)))
        for t in (appending, opening):
            t.start()
            t.join(0.5)
            assert t.is_alive()
        assert [r["id"] for r in map(json.loads, path.read_text().splitlines())] == ["a"]
    for t in (appending, opening):
        t.join(10)
    assert [r["id"] for r in ResultsFile(path).records] == ["a", "b"] and len(opened) == 1


def test_sampled_traces_and_comparable_rows():
    traces = [ReasoningTrace(str(i), "p", "t") for i in range(10)]
    assert [t.id for t in evenly_spaced(traces, 4)] == ["0", "2", "5", "7"]
    assert evenly_spaced(traces, 20) == traces
    record = lambda config, budget, trace, error=None: {"config": config, "budget": budget, "id": trace, "error": error}  # noqa: E731
    records = [record("raas-64", 64, "a"), record("h2o-64", 64, "a"), record("raas-64", 64, "b"),  # h2o-64 missing b
               record("raas-64", 64, "c"), record("h2o-64", 64, "c", "boom"), record("raas-128", 128, "b")]
    kept, failed = runs.comparable(records)
    assert [(r["config"], r["id"]) for r in kept] == [("raas-64", "a"), ("h2o-64", "a"), ("raas-128", "b")]
    assert list(failed) == [64] and list(failed[64]) == ["c"]


def test_pin_share_pins_the_sink_and_the_last_prompt_pages(tiny_dir):
    from lemma.engine.pages import prompt_pins

    policy = RaaS(budget=128, pin_share=0.5)  # 8 pages: at most 4 pinned
    assert policy.pinned_prompt_pages(7) == 4 and policy.pinned_prompt_pages(3) == 3
    assert prompt_pins(policy, 7 * 16 - 5, 16, 0, 7 * 16 + 40).tolist() == [True, False, False, False, True, True, True,
                                                                             False, False, False]
    assert prompt_pins(policy, 7 * 16, 16, 64, 112).tolist() == [True, True, True]  # a later chunk: pages 4-6
    assert prompt_pins(RaaS(budget=128), 7 * 16, 16, 0, 112).all()
    engine = Engine(tiny_dir, policy=policy, kv_cache_tokens=2048)
    prompt = list(range(5, 5 + 150))  # 10 pages: more than the budget, fine with half pinned
    out = engine.teacher_force([prompt], [list(range(7, 100))])[0]
    assert out.error is None and out.stats.pages_evicted > 0
    assert out.stats.peak_kv_pages == 10  # the whole prompt until prefill ends, then 8 (sink + most recent)
    with pytest.raises(LemmaError, match="does not fit the raas budget"):
        engine.add_request(prompt, policy=RaaS(budget=128))


def test_eval_traces_shares_dense_prefix_with_the_same_records(tiny_dir, tmp_path, monkeypatch):
    """run_trace_fidelity replays each policy from Dense's recorded prefix where it may; its records
    equal those of full replays."""
    from lemma.engine.forcing import ChunkedReplay
    from lemma.evaluation.results import ResultsFile
    from lemma.evaluation.traces import run_trace_fidelity

    rows = [dict(r, trace="Step by step, carefully. " * (20 + 9 * i)) for i, r in enumerate(TRACES)]
    traces = load_traces(write_traces(tmp_path / "traces.jsonl", rows))
    policies = [make_policy("dense")] + [make_policy(n, b) for n in ("raas", "h2o", "quest") for b in (64, 128)]
    runs_by_mode = {}
    for mode in ("shared", "full"):
        engine = Engine(tiny_dir, kv_cache_tokens=4096, dtype="float32")
        calls = []
        recorded = engine.forcing._recorded
        engine.forcing._recorded = lambda seqs, spans, p: calls.append(len(seqs)) or recorded(seqs, spans, p)
        if mode == "full":
            monkeypatch.setattr(ChunkedReplay, "_shares", lambda *args: False)
        results = ResultsFile(tmp_path / f"{mode}.jsonl")
        run_trace_fidelity(engine, traces, policies, 400, results, group=2)
        runs_by_mode[mode] = ({(r["config"], r["id"]): r for r in results.of("fidelity")}, calls)
        kinds = [(r["kind"], r["id"]) for r in results.records]
        # groups of two (m:0, m:1 then m:2): Dense, then every policy on the group; records as replays finish
        assert set(kinds[:2]) == {("trace", "m:0"), ("trace", "m:1")}
        assert set(kinds[2:4]) == {("fidelity", "m:0"), ("fidelity", "m:1")} and kinds[14] == ("trace", "m:2")
    (shared, calls), (full, none) = runs_by_mode["shared"], runs_by_mode["full"]
    assert calls and not none
    assert sum(r["shared_tokens"] for r in shared.values()) > 0 == sum(r["shared_tokens"] for r in full.values())
    assert all(r["shared_tokens"] < r["n"] for r in shared.values() if r["pages_evicted"])
    assert shared.keys() == full.keys() and len(shared) == 18
    for key, record in full.items():
        assert record["error"] is None and record["pages_evicted"] == shared[key]["pages_evicted"], key
        assert shared[key]["nll_sum"] == pytest.approx(record["nll_sum"], abs=1e-3), key
        assert shared[key]["agree_sum"] == record["agree_sum"], key
    assert any(r["pages_evicted"] for r in full.values())
    # a resumed group whose policies are not all done records Dense again and shares it
    monkeypatch.undo()
    path = tmp_path / "shared.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-3]) + "\n")  # the last three records of group 2 are gone
    engine = Engine(tiny_dir, kv_cache_tokens=4096, dtype="float32")
    calls = []
    recorded = engine.forcing._recorded
    engine.forcing._recorded = lambda seqs, spans, p: calls.append(len(seqs)) or recorded(seqs, spans, p)
    forced, fed = engine.teacher_force, []

    def recording_lengths(prompts, targets, **options):  # the Dense re-recording: how much it replays
        if options.get("record_until"):
            fed.extend(len(p) + len(t) for p, t in zip(prompts, targets))
        return forced(prompts, targets, **options)

    engine.teacher_force = recording_lengths
    results = ResultsFile(path)
    run_trace_fidelity(engine, traces, policies, 400, results, group=2)
    assert calls and results.path.read_text().splitlines()[:-3] == lines[:-3]
    full = [len(r["prompt_ids"]) + len(r["tokens"]) for r in results.of("trace")][-2:]
    assert fed and max(fed) <= 128 + 1 < max(full)  # up to record_until (budget 128), not the whole trace
    again = {(r["config"], r["id"]): r for r in results.of("fidelity")}
    assert again.keys() == shared.keys() and all(again[k]["nll_sum"] == pytest.approx(shared[k]["nll_sum"], abs=1e-3) for k in again)
