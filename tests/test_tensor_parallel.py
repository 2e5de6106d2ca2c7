"""Tensor parallelism on CPU: gloo, 2 processes, the tiny models. Logits and greedy tokens equal the
single-process engine (Dense, and RaaS with evictions), pages come back, a killed worker ends the run
with a clear error, bad sizes are refused before anything starts."""

import os
import signal
import time

import pytest
import torch

from lemma import Dense, Engine, LemmaError, Quest, RaaS, SamplingParams, StreamingLLM

DEVICE = os.environ.get("LEMMA_TP_DEVICE", "cpu")  # bench/gpu_check.sh sets cuda when 2 GPUs are lent
PROMPTS = ["story 0: once upon a time there was", "abc", "Name three primes: 2, 3, 5, 7, 11, 13."]
GREEDY = SamplingParams(temperature=0, max_tokens=70, ignore_eos=True)


@pytest.fixture(scope="class", params=["llama", "qwen2"])
def engines(request, tiny_models):
    folder = tiny_models[request.param]
    tp = Engine(folder, kv_cache_tokens=1024, tensor_parallel=2, device=DEVICE, dtype="float32")
    yield Engine(folder, kv_cache_tokens=1024, device=DEVICE, dtype="float32"), tp
    tp.close()


class TestSameAsOneProcess:  # one pair of engines per model (one tensor-parallel engine per process at a time)
    def test_logits_equal_one_process(self, engines):
        single, tp = engines
        ids = list(range(5, 70))
        ours, theirs = tp.logits(ids), single.logits(ids)
        assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5
        assert tp.pool.k[0].shape[1] == single.pool.k[0].shape[1] // 2  # rank 0 holds half the KV heads


    @pytest.mark.parametrize("policy", [Dense(), RaaS(budget=48), StreamingLLM(budget=48), Quest(budget=48)],
                             ids=lambda p: p.describe())
    def test_greedy_tokens_equal_one_process(self, engines, policy):
        single, tp = engines
        single.policy = tp.policy = policy
        expected = single.generate(PROMPTS, GREEDY)
        got = tp.generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in got] == [o.token_ids for o in expected]
        assert [o.stats.pages_evicted for o in got] == [o.stats.pages_evicted for o in expected]
        if policy.evicts:
            assert all(o.stats.pages_evicted > 0 for o in got)
        assert tp.pages.all_free

    def test_a_step_mixing_policies_equals_one_process(self, engines):
        """Requests under three policies share each step (a row slice per policy) on every rank."""
        def run(engine):
            ids = [engine.add_request(prompt, GREEDY, policy=policy) for prompt, policy in
                   zip(PROMPTS, [Dense(), RaaS(budget=48), Quest(budget=48)])]
            tokens = {i: [] for i in ids}
            while engine.has_unfinished():
                for out in engine.step():
                    tokens[out.request_id] += out.token_ids
            return [tokens[i] for i in ids]

        single, tp = engines
        assert run(tp) == run(single)
        assert tp.pages.all_free

    @pytest.mark.parametrize("policy", [RaaS(budget=48), Quest(budget=48)], ids=lambda p: p.describe())
    def test_chunked_replay_equals_one_process(self, engines, policy):
        single, tp = engines
        single.policy = tp.policy = policy
        prompts, targets = [list(range(5, 42)), [7, 8, 9]], [list(range(3, 120)), list(range(50, 90))]
        expected = single.teacher_force(prompts, targets)
        got = tp.teacher_force(prompts, targets)
        for a, b in zip(got, expected):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
            assert a.stats.pages_evicted == b.stats.pages_evicted
        assert tp.pages.all_free


def test_a_killed_worker_ends_the_run_with_a_clear_error(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=1024, tensor_parallel=2, device=DEVICE, dtype="float32")
    try:
        decode = engine.runner.decode
        calls = {"n": 0}

        def kill_on_fifth(groups):
            calls["n"] += 1
            if calls["n"] == 5:
                os.kill(engine.runner.cluster.processes[0].pid, signal.SIGKILL)
            return decode(groups)

        engine.runner.decode = kill_on_fifth
        start = time.monotonic()
        with pytest.raises(LemmaError, match="tensor-parallel worker rank 1 died"):
            engine.generate(["hello there"], SamplingParams(max_tokens=200, ignore_eos=True))
        assert time.monotonic() - start < 30
        assert engine.pages.all_free
        with pytest.raises(LemmaError, match="rank 1 died|was stopped"):
            engine.generate(["again"], SamplingParams(max_tokens=3))
    finally:
        engine.close()


@pytest.mark.parametrize("kwargs, fragment", [
    ({"tensor_parallel": 0}, "tensor_parallel must be an integer >= 1, got 0"),
    ({"tensor_parallel": True}, "tensor_parallel must be an integer >= 1"),
    ({"tensor_parallel": 3}, "does not divide the model's 2 KV heads"),
    ({"tensor_parallel": 2, "compile": True}, "compile is not supported with tensor_parallel > 1"),
])
def test_bad_sizes_are_refused_before_any_process_starts(tiny_dir, kwargs, fragment):
    with pytest.raises(LemmaError) as info:
        Engine(tiny_dir, kv_cache_tokens=256, device=DEVICE, dtype="float32", **kwargs)
    assert fragment in str(info.value)


def test_more_ranks_than_cores_is_refused(tiny_models):
    too_many = (os.cpu_count() or 1) * 2
    with pytest.raises(LemmaError, match="CPU cores visible here|does not divide"):
        Engine(tiny_models["llama-mha-untied"], kv_cache_tokens=256, tensor_parallel=too_many, device=DEVICE, dtype="float32")


def test_shard_parts_cover_everything():
    from lemma.models.shard import Shard

    for n in (7, 8, 49152, 3):
        for world in (1, 2, 3, 4):
            parts = [Shard(r, world).part(n) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))


def test_one_tensor_parallel_engine_per_process_and_none_left_behind(tiny_dir):
    with Engine(tiny_dir, kv_cache_tokens=256, tensor_parallel=2, device=DEVICE, dtype="float32"):
        with pytest.raises(LemmaError, match="another tensor-parallel engine is running"):
            Engine(tiny_dir, kv_cache_tokens=256, tensor_parallel=2, device=DEVICE, dtype="float32")
    assert not torch.distributed.is_initialized()


def test_cli_tp_flag(tiny_dir):
    from typer.testing import CliRunner

    from lemma.cli import app

    runner = CliRunner()
    args = ["run", "abc", "--model", str(tiny_dir), "--max-tokens", "8", "--ignore-eos", "--json", "--device", DEVICE,
            "--dtype", "float32"]
    one = runner.invoke(app, args)
    two = runner.invoke(app, args + ["--tp", "2"])
    assert one.exit_code == two.exit_code == 0, two.output
    import json

    assert json.loads(two.output)["token_ids"] == json.loads(one.output)["token_ids"]
    bad = runner.invoke(app, args + ["--tp", "3"])
    assert bad.exit_code == 1 and bad.output.strip().startswith("error: tensor_parallel=3 does not divide")
    assert not torch.distributed.is_initialized()
