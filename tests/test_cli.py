"""The command line through typer's runner: every command, and every bad input as one line + exit 1."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from typer.testing import CliRunner

from ggufs import write_gguf
from lemma.cli import _stream_reply, app
from lemma.evaluation.outputs import PNG_SIGNATURE
from lemma.reasoning import ThinkSplitter
from test_evaluation import ACC, GOOD_ROW, TRACE, jsonl

runner = CliRunner()
PAGE_TOKENS = 16


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("command", ["run", "chat", "pull", "convert", "info", "serve"])
def test_every_command_has_help_with_an_example(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "Example: lemma" in result.output


def test_run_streams_and_prints_stats(tiny_dir):
    result = invoke("run", "Tell me a story", "--model", tiny_dir, "--max-tokens", 6, "--temperature", 0)
    assert result.exit_code == 0, result.output
    assert "prompt " in result.output and "generated 6 tok" in result.output and "peak KV" in result.output


def test_run_json(tiny_dir):
    result = invoke("run", "hi", "--model", tiny_dir, "--max-tokens", 5, "--json", "--seed", 3, "--temperature", 0.7)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["finish_reason"] in ("length", "stop") and len(data["token_ids"]) <= 5
    assert data["stats"]["generated_tokens"] == len(data["token_ids"])


def test_run_compiled_equals_eager(tiny_dir):
    """--compile compiles the decode step (inductor here) and gives the eager run's greedy text."""
    args = ("run", "Tell me a story", "--model", tiny_dir, "--max-tokens", 12, "--temperature", 0, "--json", "--ignore-eos")
    eager, compiled = invoke(*args), invoke(*args, "--compile")
    assert eager.exit_code == 0 and compiled.exit_code == 0, compiled.output
    assert json.loads(compiled.output)["token_ids"] == json.loads(eager.output)["token_ids"]


def test_run_compiles_by_default_and_says_how_long_it_took(tiny_dir):
    """Without a flag the CLI compiles (the suite runs with LEMMA_COMPILE=0, conftest.py), warms up at
    start and reports it on stderr; LEMMA_COMPILE=0 or --no-compile runs eager."""
    args = [str(a) for a in ("run", "Tell me a story", "--model", tiny_dir, "--max-tokens", 4, "--temperature", 0)]
    compiled = runner.invoke(app, args, env={"LEMMA_COMPILE": None})
    assert compiled.exit_code == 0, compiled.output
    assert "decode step ready in" in compiled.stderr and "1 batch bucket," in compiled.stderr
    for eager in (runner.invoke(app, args, env={"LEMMA_COMPILE": "0"}), runner.invoke(app, args + ["--no-compile"], env={"LEMMA_COMPILE": None})):
        assert eager.exit_code == 0 and "decode step ready" not in eager.stderr
        assert eager.stdout.split("\n")[0] == compiled.stdout.split("\n")[0]  # the same greedy reply


@pytest.mark.parametrize("command", ["run", "chat", "bench", "eval"])
def test_compile_flag_is_offered(command):
    assert "--compile" in invoke(command, "--help").output


def test_info(tiny_dir):
    result = invoke("info", "--model", tiny_dir)
    assert result.exit_code == 0, result.output
    assert "architecture        llama" in result.output and "KV bytes per token" in result.output
    assert "head dim            16" in result.output


def test_convert(tiny_dir, tmp_path):
    gguf_file = write_gguf(tiny_dir, tmp_path / "m.gguf")
    result = invoke("convert", gguf_file, tmp_path / "out", "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = invoke("convert", gguf_file, tmp_path / "out")
    assert_one_line_error(again, "already exists and is not empty")


def test_convert_unsupported_arch_writes_nothing(tiny_dir, tmp_path):
    gguf_file = write_gguf(tiny_dir, tmp_path / "m.gguf", arch="falcon")
    result = invoke("convert", gguf_file, tmp_path / "out")
    assert_one_line_error(result, "GGUF architecture 'falcon' is not supported")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_convert_missing_file(tmp_path):
    assert_one_line_error(invoke("convert", tmp_path / "none.gguf", tmp_path / "out"), "GGUF file not found")


def test_pull_list_and_unknown():
    listing = invoke("pull", "--list")
    assert listing.exit_code == 0 and "smollm2-135m-instruct" in listing.output and "qwen2.5-coder-0.5b-instruct" in listing.output
    assert_one_line_error(invoke("pull", "nope"), "unknown model 'nope'", "smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")


def test_run_bad_inputs(tiny_dir, tmp_path):
    assert_one_line_error(invoke("run", "hi", "--model", "nope"), "unknown model 'nope'", "smollm2-135m-instruct")
    assert_one_line_error(invoke("run", "", "--model", tiny_dir), "prompt is empty")
    assert_one_line_error(invoke("run", "hi", "--model", tiny_dir, "--max-tokens", 0), "max_tokens must be a positive integer")
    assert_one_line_error(invoke("run", "hi", "--model", tiny_dir, "--top-p", 2), "top_p must be in (0, 1]")
    assert_one_line_error(invoke("run", "hi", "--model", tiny_dir, "--dtype", "int3"), "unknown dtype 'int3'")
    bare = tmp_path / "bare"
    bare.mkdir()
    assert_one_line_error(invoke("run", "hi", "--model", bare), "tokenizer.json is missing")


@pytest.mark.parametrize("command", [["run", "hi"], ["chat"], ["info"], ["serve"], ["bench"], ["eval", "--data", "d.jsonl"],
                                     ["trace", "hi"]])
def test_an_empty_model_is_an_error_not_the_default_model(command, monkeypatch):
    from lemma.models import store

    monkeypatch.setattr(store, "pull", lambda *a, **k: pytest.fail("the default model was asked for"))
    for empty in ("", "  "):
        assert_one_line_error(invoke(*command, "--model", empty), "--model is empty")


def test_an_empty_api_key_is_an_error(tiny_dir):
    assert_one_line_error(invoke("serve", "--model", tiny_dir, "--api-key", ""), "--api-key (or LEMMA_API_KEY) is empty")


LONG = " ".join(str(i) for i in range(600))  # 1783 tokens of the tiny model, whose context is 1024


def test_a_prompt_longer_than_the_context_fails_fast_before_any_prefill(tiny_dir, monkeypatch):
    from lemma.engine.runner import ModelRunner
    from lemma.models import tokenizer

    monkeypatch.setattr(ModelRunner, "prefill", lambda *a, **k: pytest.fail("a prompt that cannot fit was prefilled"))
    monkeypatch.setattr(tokenizer, "TEMPLATE_CHARS", 2000)  # the message alone is longer than a template may write
    for extra in ([], ["--json", "--system", "Be brief."]):
        assert_one_line_error(invoke("run", LONG, "--model", tiny_dir, *extra), "the message is 17", "exceeds the model's "
                              "context of 1024 tokens", "--max-tokens")
    fits_alone = " ".join(str(i) for i in range(200))
    assert_one_line_error(invoke("run", fits_alone, "--model", tiny_dir, "--max-tokens", 1000),
                          "with max_tokens 1000 that exceeds the model's context of 1024 tokens")
    result = invoke("chat", "--model", tiny_dir, input=LONG + "\n/exit\n")
    assert result.exit_code == 0 and "error: the message is 17" in result.output and "chat template" not in result.output


def test_chat_session(tiny_dir):
    script = "hello\n/stats\n/system Be brief.\nsecond turn\n/bogus\n/reset\n/stats\n/exit\n"
    result = invoke("chat", "--model", tiny_dir, "--max-tokens", 4, "--temperature", 0, input=script)
    assert result.exit_code == 0, result.output
    assert result.output.count("prompt ") >= 1  # /stats printed a stats line after the first reply
    assert "(system message set)" in result.output and "(conversation cleared)" in result.output
    assert "unknown command /bogus" in result.output


def test_chat_ends_on_ctrl_d(tiny_dir):
    result = invoke("chat", "--model", tiny_dir, "--max-tokens", 2, input="hi\n")
    assert result.exit_code == 0, result.output


def test_ctrl_c_stops_the_reply_and_returns_its_pages(tiny_dir):
    from lemma import Engine, SamplingParams

    engine = Engine(tiny_dir, kv_cache_tokens=256)
    real_stream = engine.stream

    def interrupted(prompt, params):
        stream = real_stream(prompt, params)
        for i, chunk in enumerate(stream):
            if i == 3:
                stream.close()
                raise KeyboardInterrupt
            yield chunk

    engine.stream = interrupted
    ids = engine.chat_prompt([{"role": "user", "content": "hi"}])
    text, _, stopped = _stream_reply(engine, ids, SamplingParams(max_tokens=50, ignore_eos=True, temperature=0), True)
    assert stopped and text
    assert engine.pages.all_free


def test_think_splitter_handles_markers_split_across_pieces():
    splitter = ThinkSplitter()
    pieces = ["<thi", "nk>plan ", "a b</th", "ink>", "answer <", "b>"]
    runs = [run for p in pieces for run in splitter.feed(p)] + splitter.feed("", final=True)
    thinking = "".join(t for t, th in runs if th)
    answer = "".join(t for t, th in runs if not th)
    assert thinking == "plan a b" and answer == "answer <b>"


def test_run_with_a_policy(tiny_dir):
    result = invoke("run", "Tell me a story", "--model", tiny_dir, "--max-tokens", 80, "--ignore-eos",
                    "--policy", "raas", "--budget", 64, "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)["stats"]
    assert stats["policy"] == "raas-64" and stats["peak_kv_pages"] == 4 and stats["pages_evicted"] > 0
    too_small = invoke("run", "Tell me a story", "--model", tiny_dir, "--policy", "raas", "--budget", 32, "--json")
    assert_one_line_error(too_small, "does not fit the raas budget of 32 tokens", "pin_prompt=False")


def test_policy_bad_inputs(tiny_dir):
    assert_one_line_error(invoke("run", "hi", "--model", tiny_dir, "--policy", "lru"), "unknown policy 'lru'")
    assert_one_line_error(invoke("run", "hi", "--model", tiny_dir, "--policy", "raas", "--budget", 100),
                          "raas budget must be a multiple of the page size 16, got 100 (use 96 or 112)")
    assert_one_line_error(invoke("run", "hi", "--model", tiny_dir, "--policy", "h2o", "--budget", 16),
                          "h2o budget must be at least 2 pages")


def test_chat_policy_command(tiny_dir):
    script = "/policy raas 64\nhello\n/stats\n/policy lru 64\n/policy quest x\n/exit\n"
    result = invoke("chat", "--model", tiny_dir, "--max-tokens", 4, "--temperature", 0, input=script)
    assert result.exit_code == 0, result.output
    assert "(policy raas-64)" in result.output and "raas-64, 0 pages evicted" in result.output
    assert "unknown policy 'lru'" in result.output and "budget must be an integer" in result.output


def test_run_without_pinning_fits_a_long_prompt(tiny_dir):
    result = invoke("run", "Tell me a story", "--model", tiny_dir, "--max-tokens", 40, "--ignore-eos", "--policy", "raas",
                    "--budget", 32, "--no-pin-prompt", "--dense-layers", 1, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["stats"]["policy"] == "raas-32(dense_layers=1,pin_prompt=False)"


def test_bench_command(tiny_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = invoke("bench", "--model", tiny_dir, "--context", "64,128", "--steps", 4, "--budget", 32,
                    "--policies", "dense,raas,quest", "--vs-transformers", "--out", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 6 and out.with_suffix(".png").stat().st_size > 0
    raas = [r for r in data["rows"] if r["policy"] == "raas-32(pin_prompt=False)"]
    page_bytes = 2 * 2 * PAGE_TOKENS * 16 * 4  # K and V, 2 KV heads, head dim 16, fp32: one page of one layer
    assert all(r["resident_kv_mib"] == 2 * 2 * page_bytes / 2**20 for r in raas)  # 2 pages in each of 2 layers
    assert all(r["speedup_vs_transformers"] > 0 for r in data["rows"])
    assert "transformers ÷ lemma" in result.output


def test_eval_command_and_resume(tiny_dir, tmp_path):
    data = tmp_path / "mini.jsonl"
    data.write_text("\n".join(json.dumps({"problem": q, "answer": "4"}) for q in ["2+2?", "What is 8/2?", "4"]) + "\n")
    out = tmp_path / "eval.jsonl"
    args = ["eval", "--data", data, "--model", tiny_dir, "--policies", "dense,raas", "--budgets", "64",
            "--max-tokens", 6, "--batch", 2, "--no-pin-prompt", "--out", out]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "| dense | 3 |" in result.output and "| raas-64(pin_prompt=False) | 3 |" in result.output
    lines = out.read_text().splitlines()
    again = invoke(*args)
    assert again.exit_code == 0 and out.read_text().splitlines() == lines  # nothing ran twice
    fid = invoke("eval", "--data", data, "--model", tiny_dir, "--policies", "raas,streaming", "--budgets", "32,1024",
                 "--max-tokens", 20, "--fidelity", "--no-pin-prompt", "--out", tmp_path / "fid.jsonl")
    assert fid.exit_code == 0, fid.output
    assert "| raas-1024(pin_prompt=False) | 3 | 60 | 0.0000 | 1.000 |" in fid.output
    assert (tmp_path / "fid.png").stat().st_size > 0


def test_eval_bad_inputs(tiny_dir, tmp_path):
    assert_one_line_error(invoke("eval", "--data", tmp_path / "none.jsonl", "--model", tiny_dir), "data file not found")
    data = tmp_path / "d.jsonl"
    data.write_text('{"problem": "x", "answer": "1"}\n')
    assert_one_line_error(invoke("eval", "--data", data, "--model", tiny_dir, "--budgets", "a,b"), "--budgets must be comma-separated integers")
    assert_one_line_error(invoke("eval", "--data", data, "--model", tiny_dir, "--policies", "lru"), "unknown policy 'lru'")


def test_trace_command(tiny_dir, tmp_path):
    out = tmp_path / "trace.png"
    result = invoke("trace", "Tell me a story", "--model", tiny_dir, "--budget", 64, "--max-tokens", 60, "--out", out)
    assert result.exit_code == 0, result.output
    assert "60 decode steps" not in result.output and "59 decode steps" in result.output
    assert out.stat().st_size > 0
    assert_one_line_error(invoke("trace", "x", "--model", tiny_dir, "--layer", 9), "--layer must be in [0, 2), got 9")


def test_serve_bad_inputs(tiny_dir):
    assert_one_line_error(invoke("serve", "--model", tiny_dir, "--reasoning-parser", "maybe"), "--reasoning-parser")
    assert_one_line_error(invoke("serve", "--model", tiny_dir, "--port", "70000"), "--port")
    assert_one_line_error(invoke("serve", "--model", tiny_dir, "--policy", "raas", "--budget", "20"), "budget")
    assert_one_line_error(invoke("serve", "--model", tiny_dir, "--warm-policy", "lru:budget=64"), "unknown policy 'lru'")
    many = [arg for budget in range(64, 64 + 16 * 8, 16) for arg in ("--warm-policy", f"raas:budget={budget}")]
    assert_one_line_error(invoke("serve", "--model", tiny_dir, *many), "at most 8 policies in all stay warm, got 9")


def test_serve_starts_answers_and_stops(tiny_dir):
    import subprocess
    import sys
    import time
    import urllib.request

    from serving import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", "from lemma.cli import main; main()", "serve", "--model",
                               str(tiny_dir), "--port", str(port), "--kv-cache-tokens", "1024", "--api-key", "k"],
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while True:
            assert server.poll() is None and time.time() < deadline, "lemma serve did not come up"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                         data=json.dumps({"prompt": "abc", "max_tokens": 5, "ignore_eos": True}).encode(),
                                         headers={"content-type": "application/json", "authorization": "Bearer k"})
        body = json.loads(urllib.request.urlopen(request, timeout=30).read())
        assert body["usage"]["completion_tokens"] == 5 and body["choices"][0]["finish_reason"] == "length"
    finally:
        server.terminate()
        server.wait(30)
    assert "on http://127.0.0.1:" in server.stderr.read()


# ---- hostile input: devices, seeds, undecodable text, Ctrl-C, closed stdin/stdout ---------------------

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


# ---- the measuring commands: paths and numbers checked before a run, n/a for what all failed --------------------------------------------------------------------------------------

@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "mini.jsonl"
    path.write_text("".join(json.dumps({"problem": q, "answer": "4"}) + "\n" for q in ["2+2?", "What is 8/2?", "4"]))
    return path


@pytest.mark.parametrize("content", [b"# Notes\n\nkeep me\n", json.dumps([ACC]).encode(),
                                     b'{"question": "2+2?", "answer": "#### 4"}\n', jsonl(ACC) + b"oops\n" + jsonl(TRACE)])
def test_eval_out_that_is_not_a_results_file_is_refused_before_the_run(tmp_path, data, content):
    out = tmp_path / "mine.txt"
    out.write_bytes(content)
    line = 2 if content.startswith(b'{"kind"') else 1
    # a missing model would be the error if the run had started
    assert_one_line_error(invoke("eval", "--data", data, "--model", tmp_path / "no-model", "--out", out),
                          f"mine.txt:{line} is not a lemma results record")
    assert out.read_bytes() == content


def test_eval_out_is_the_data_file(tmp_path, data):
    before = data.read_bytes()
    assert_one_line_error(invoke("eval", "--data", data, "--model", tmp_path / "no-model", "--out", data), "mini.jsonl:1")
    assert data.read_bytes() == before


def _out_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("mine")
    (tmp_path / "taken.png").write_text("my notes, not a picture")
    return {"folder": (tmp_path / "folder", "is a folder"),
            "under a file": (tmp_path / "file" / "sub" / "r.jsonl", "file is not a folder"),
            "plot is a user file": (tmp_path / "taken.jsonl", "taken.png exists and is not a PNG image"),
            "ends in .png": (tmp_path / "r.png", "ends in .png")}


@pytest.mark.parametrize("case", ["folder", "under a file", "plot is a user file", "ends in .png"])
def test_eval_and_bench_out_paths_are_checked_before_the_run(tmp_path, data, case):
    out, fragment = _out_paths(tmp_path)[case]
    no_model = tmp_path / "no-model"
    assert_one_line_error(invoke("eval", "--data", data, "--model", no_model, "--out", out), "--out", fragment)
    assert_one_line_error(invoke("bench", "--model", no_model, "--context", 64, "--out", out), fragment)
    assert (tmp_path / "file").read_text() == "mine" and (tmp_path / "taken.png").read_text().startswith("my notes")


@pytest.mark.parametrize("args, fragment", [
    (["--limit", 0], "--limit must be at least 1, got 0"), (["--limit=-3"], "--limit must be at least 1, got -3"),
    (["--batch", 0], "--batch must be at least 1, got 0"), (["--batch=-2"], "--batch must be at least 1"),
    (["--max-tokens", 0], "--max-tokens must be at least 1, got 0"),
    (["--budgets", "0"], "raas budget must be at least 2 pages"), (["--budgets", ""], "--budgets names no budget for raas"),
    (["--policies", " , "], "--policies names no policy"),
    (["--policies", "dense", "--fidelity"], "--fidelity compares"),
])
def test_eval_numbers_out_of_range(tmp_path, data, args, fragment):
    assert_one_line_error(invoke("eval", "--data", data, "--model", tmp_path / "no-model", *args), fragment)


@pytest.mark.parametrize("content, fragment", [
    (GOOD_ROW + "\n42\n", "d.jsonl:2: expected a JSON object"), (GOOD_ROW + "\nnull\n", "d.jsonl:2: expected a JSON object"),
    ('{"problem": 5, "answer": "1"}\n', "d.jsonl:1: 'problem' must be a non-empty string, got a number"),
    ('{"problem": "p", "answer": null}\n', "d.jsonl:1: 'answer' must be"), ("{oops\n", "d.jsonl:1: not valid JSON"),
    ("", "d.jsonl: no problems in the file"),
])
def test_eval_malformed_data_is_one_line(tmp_path, content, fragment):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    assert_one_line_error(invoke("eval", "--data", path, "--model", tmp_path / "no-model"), fragment)
    assert_one_line_error(invoke("eval", "--data", tmp_path, "--model", tmp_path / "no-model"), "is a folder")


def _row(output: str, config: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(f"| {config} |"))


def test_eval_where_every_problem_fails_reports_na(tiny_dir, tmp_path, data):
    out = tmp_path / "acc.jsonl"
    result = invoke("eval", "--data", data, "--model", tiny_dir, "--policies", "dense,raas", "--budgets", 32,
                    "--pin-prompt", "--max-tokens", 3, "--batch", 3, "--out", out)
    assert result.exit_code == 0, result.output
    assert _row(result.output, "raas-32") == "| raas-32 | 3 | n/a | n/a | n/a | n/a | 3 |"
    assert "n/a" not in _row(result.output, "dense")
    fid = invoke("eval", "--data", data, "--model", tiny_dir, "--policies", "raas,streaming", "--budgets", 32,
                 "--pin-prompt", "--max-tokens", 4, "--fidelity", "--out", tmp_path / "fid.jsonl")
    assert fid.exit_code == 0, fid.output
    assert _row(fid.output, "raas-32") == "| raas-32 | 0 | 0 | n/a | n/a | n/a | n/a | 3 |"
    assert "n/a" not in _row(fid.output, "streaming-32")
    assert (tmp_path / "fid.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("args, fragment", [
    (["--context", 0], "--context must be at least 1, got 0"), (["--context=-5"], "--context must be at least 1, got -5"),
    (["--context", ""], "--context names no length"), (["--context", "64,x"], "--context must be comma-separated integers"),
    (["--context", 100000], "needs 100033 positions but llama has 1024 (max_position_embeddings)"),
    (["--context", 64, "--steps", 2], "--steps must be at least 3, got 2"),
    (["--context", 64, "--steps", 5000], "--steps 5000 needs 5065 positions"),
    (["--context", 64, "--budget", 7], "budget must be at least 2 pages"),
])
def test_bench_numbers_out_of_range(tiny_dir, tmp_path, args, fragment):
    out = tmp_path / "b.json"
    assert_one_line_error(invoke("bench", "--model", tiny_dir, "--out", out, *args), fragment)
    assert not out.exists()


def test_bench_refuses_a_context_that_memory_cannot_hold(tiny_dir, tmp_path, monkeypatch):
    from lemma.evaluation import speed

    monkeypatch.setattr(speed, "free_memory_bytes", lambda device: 1 << 10)
    assert_one_line_error(invoke("bench", "--model", tiny_dir, "--context", 512, "--out", tmp_path / "b.json"),
                          "--context 512 plus --steps 32 needs", "MiB of KV cache but cpu has 0.0 MiB free")


def test_bench_replaces_its_own_results_but_not_other_json(tiny_dir, tmp_path):
    other = tmp_path / "package.json"
    other.write_text('{"name": "mine"}')
    assert_one_line_error(invoke("bench", "--model", tiny_dir, "--context", 32, "--out", other),
                          "package.json exists and is not a lemma bench results file")
    assert other.read_text() == '{"name": "mine"}'
    ours = tmp_path / "bench.json"
    ours.write_text('{"copy_gb_per_s": 1.0, "rows": []}')
    args = ("bench", "--model", tiny_dir, "--context", 32, "--steps", 3, "--policies", "dense", "--out", ours)

    def disk_full(fd):  # what a full disk reports when the written data has to go down
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with mock.patch("os.fsync", disk_full):
        failed = invoke(*args)  # the table is printed, then the results file cannot be written
    assert failed.exit_code == 1 and (failed.exception is None or isinstance(failed.exception, SystemExit))
    assert failed.output.strip().splitlines()[-1] == f"error: cannot write --out {ours}: No space left on device"
    assert ours.read_text() == '{"copy_gb_per_s": 1.0, "rows": []}'  # the earlier results, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "package.json"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert len(json.loads(ours.read_text())["rows"]) == 1
    assert (tmp_path / "bench.png").read_bytes().startswith(PNG_SIGNATURE)


def test_trace_out_is_checked_before_the_run_and_written_where_reported(tiny_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    no_model = tmp_path / "no-model"
    assert_one_line_error(invoke("trace", "x", "--model", no_model, "--out", tmp_path), "--out", "is a folder")
    assert_one_line_error(invoke("trace", "x", "--model", no_model, "--out", notes), "notes.txt exists and is not a PNG image")
    assert notes.read_text() == "mine"
    assert_one_line_error(invoke("trace", "x", "--model", no_model, "--max-tokens", 0), "--max-tokens must be at least 1")
    picture = tmp_path / "picture"  # no suffix: written under exactly this name
    result = invoke("trace", "Tell me a story", "--model", tiny_dir, "--budget", 64, "--max-tokens", 8, "--out", picture)
    assert result.exit_code == 0, result.output
    assert f"wrote {picture}" in result.output and picture.read_bytes().startswith(PNG_SIGNATURE)
    assert not (tmp_path / "picture.png").exists()
