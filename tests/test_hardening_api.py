"""Bad input to the Python API and the CLI: one LemmaError line (CLI: one `error:` line, exit 1, no
traceback), the pool back to full, the engine usable afterwards. A fuzz test over sampling parameters,
prompts and policies; hostile chat templates; broken weights; closed stdin/stdout."""

import math
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from lemma import Engine, LemmaError, RaaS, SamplingParams, make_policy
from lemma.cli import app

runner = CliRunner()
NUMBERS = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=3))


def one_line(message: str) -> bool:
    return bool(message) and "\n" not in message and "Traceback" not in message


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine(tiny_dir, kv_cache_tokens=512, max_batch=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    params=st.fixed_dictionaries({}, optional={
        "max_tokens": NUMBERS, "temperature": NUMBERS, "top_k": NUMBERS, "top_p": NUMBERS, "min_p": NUMBERS,
        "repetition_penalty": NUMBERS, "presence_penalty": NUMBERS, "seed": st.one_of(NUMBERS, st.integers(-2**70, 2**70)),
        "stop": st.one_of(st.none(), st.text(max_size=3), st.lists(st.text(max_size=2), max_size=2)),
        "ignore_eos": st.one_of(st.booleans(), st.integers(0, 2))}),
    prompt=st.one_of(
        st.text(max_size=20),
        st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
        st.lists(st.one_of(st.integers(-3, 300), st.booleans(), st.none()), max_size=8),
        st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", 3]),
                                        "content": st.one_of(st.text(max_size=10), st.none(), st.integers())}),
                 min_size=1, max_size=2),
        st.integers(), st.none()),
    policy=st.tuples(st.sampled_from(["dense", "raas", "streaming", "h2o", "quest", "nope"]),
                     st.one_of(st.none(), st.integers(-16, 200), st.sampled_from([32, 48, 64]), st.text(max_size=2))),
)
def test_fuzz_every_outcome_is_an_output_or_one_lemma_error(engine, params, prompt, policy):
    try:
        engine.policy = make_policy(*policy)
        out = engine.generate([prompt], SamplingParams(**{k: v for k, v in params.items() if v is not None}))[0]
        if out.finish_reason == "error":
            assert one_line(out.error)
        else:
            assert out.finish_reason in ("stop", "length") and out.stats.generated_tokens >= 1
    except LemmaError as exc:
        assert one_line(str(exc))
    assert engine.pages.all_free and not engine.has_unfinished()


def test_engine_still_works_after_the_fuzz(engine):
    engine.policy = RaaS(budget=64)
    out = engine.generate(["hello"], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and engine.pages.all_free


@pytest.mark.parametrize("kwargs, fragment", [
    ({"device": "gpu"}, "device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    ({"device": 3.5}, "device must be"),
    ({"kv_cache_tokens": "1024"}, "kv_cache_tokens must be a positive integer, got '1024'"),
    ({"kv_cache_tokens": True}, "kv_cache_tokens must be a positive integer, got True"),
    ({"kv_cache_tokens": 0}, "kv_cache_tokens must be a positive integer, got 0"),
    ({"kv_cache_tokens": 10**13}, "of memory is free"),
    ({"max_batch": 0}, "max_batch must be an integer >= 1, got 0"),
    ({"max_batch": "2"}, "max_batch must be an integer >= 1"),
    ({"prefill_chunk": 8}, "prefill_chunk must be an integer >= 16, got 8"),
    ({"compile": 1}, "compile must be True, False or a backend name"),
    ({"dtype": "float8"}, "unknown dtype 'float8'"),
    ({"dtype": torch.int8}, "unknown dtype"),
    ({"policy": "raas"}, "policy must be a lemma policy"),
])
def test_engine_arguments(tiny_dir, kwargs, fragment):
    with pytest.raises(LemmaError) as info:
        Engine(tiny_dir, **kwargs)
    assert fragment in str(info.value) and one_line(str(info.value))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu(tiny_dir):
    with pytest.raises(LemmaError, match="this machine has no CUDA GPU"):
        Engine(tiny_dir, device="cuda")


def test_policy_assignment_targets_and_messages_are_checked(engine):
    with pytest.raises(LemmaError, match="policy must be a lemma policy"):
        engine.policy = "raas"
    with pytest.raises(LemmaError, match=r"targets\[0\] token id True is outside the vocabulary"):
        engine.teacher_force(["hi"], [[True, 3]])
    with pytest.raises(LemmaError, match=r"targets\[1\] token id 999999 is outside the vocabulary"):
        engine.teacher_force(["hi", "yo"], [[3], [999999]])
    with pytest.raises(LemmaError, match=r"targets\[0\] must be a non-empty list"):
        engine.teacher_force(["hi"], [[]])
    with pytest.raises(LemmaError, match=r"messages\[0\]: role and content must be strings"):
        engine.chat([{"role": "user", "content": 42}])
    with pytest.raises(LemmaError, match="raas has no option 'budgett'"):
        make_policy("raas", budgett=64)
    outs = engine.generate(["\udcff bad bytes", [True, 2], "fine"], SamplingParams(max_tokens=3, ignore_eos=True))
    assert "cannot be tokenized" in outs[0].error and "outside the vocabulary" in outs[1].error
    assert outs[2].finish_reason == "length" and engine.pages.all_free


def test_non_finite_weights_give_an_error_not_text(tiny_dir):
    broken = Engine(tiny_dir, kv_cache_tokens=512)
    with torch.no_grad():
        broken.model.model.layers[0].mlp.down_proj.weight.fill_(math.nan)
    out = broken.generate(["hello"], SamplingParams(max_tokens=5))[0]
    assert out.finish_reason == "error" and "non-finite logits" in out.error and out.token_ids == []
    assert broken.pages.all_free


@pytest.mark.parametrize("template, fragment", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took longer than"),
    ("{{ 'ab' * 10**9 }}", "builds a value over"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}", "over"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
])
def test_hostile_chat_templates_fail_fast(tiny_dir, template, fragment):
    engine = Engine(tiny_dir, kv_cache_tokens=256)
    engine.tokenizer.chat_template = template
    start = time.monotonic()
    with pytest.raises(LemmaError) as info:
        engine.chat([{"role": "user", "content": "hi"}])
    assert fragment in str(info.value) and one_line(str(info.value))
    assert time.monotonic() - start < 10 and engine.pages.all_free


def cli_error(*args, env=None) -> str:
    result = runner.invoke(app, [str(a) for a in args], env=env)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_cli_bad_device_seed_text_and_attention(tiny_dir):
    assert "device must be" in cli_error("run", "hi", "--model", tiny_dir, "--device", "gpu")
    assert "seed must be an integer that fits in 64 bits" in cli_error("run", "hi", "--model", tiny_dir, "--seed",
                                                                      "99999999999999999999999")
    assert "cannot be tokenized" in cli_error("run", "\udcff\udcfe", "--model", tiny_dir)
    assert "needs a CUDA GPU" in cli_error("run", "hi", "--model", tiny_dir,
                                           env={"LEMMA_ATTENTION": "triton", "TRITON_INTERPRET": "0"})


def test_ctrl_c_in_run_exits_130(tiny_dir, monkeypatch):
    import lemma.cli

    monkeypatch.setattr(lemma.cli, "_stream_reply", lambda *args: ("", None, True))
    assert runner.invoke(app, ["run", "hi", "--model", str(tiny_dir)]).exit_code == 130


def lemma_process(args: list[str], **redirect) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from lemma.cli import main; main()", *args], text=True,
                          timeout=120, **redirect)


def test_closed_stdout_and_stdin(tiny_dir):
    closed_out = lemma_process(["run", "hi", "--model", str(tiny_dir), "--max-tokens", "3"], stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, pass_fds=(), preexec_fn=lambda: __import__("os").close(1))
    assert closed_out.returncode == 1 and closed_out.stderr.strip() == "error: standard output was closed"
    closed_in = lemma_process(["chat", "--model", str(tiny_dir)], capture_output=True,
                              preexec_fn=lambda: __import__("os").close(0))
    assert closed_in.returncode == 0 and "Traceback" not in closed_in.stderr
