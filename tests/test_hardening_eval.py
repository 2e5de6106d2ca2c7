"""Hardening of the measuring commands: a file that is not a lemma results file is never rewritten and a
bad results line is never silently dropped; output paths are checked before a run; a configuration where
every problem failed reads n/a, never a perfect score; malformed eval data is one line naming the file
and the line; absurd numbers are refused up front."""

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SHARED_DATA
from test_cli import assert_one_line_error, invoke
from lemma.cli_measure import table
from lemma.errors import LemmaError
from lemma.evaluation import plots, runs
from lemma.evaluation.datasets import load_problems
from lemma.evaluation.outputs import PNG_SIGNATURE
from lemma.evaluation.results import ResultsFile, record_problem

ACC = {"kind": "accuracy", "config": "dense", "policy": "dense", "budget": None, "id": "1", "gold": "4", "pred": "4",
       "correct": True, "finish_reason": "stop", "error": None, "generated_tokens": 5, "jct_seconds": 0.5,
       "peak_kv_bytes": 4096, "text": "\\boxed{4}"}
ACC_FAILED = {**ACC, "config": "raas-32", "policy": "raas", "budget": 32, "pred": None, "correct": False,
              "finish_reason": "error", "error": "prompt does not fit", "generated_tokens": 0, "jct_seconds": 0.0}
TRACE = {"kind": "trace", "config": "dense", "id": "1", "prompt_ids": [1, 2], "tokens": [3, 4], "logprobs": [-0.1, -0.2],
         "predicted": [3, 4]}
TRACE_FAILED = {"kind": "trace", "config": "dense", "id": "2", "error": "prompt too long"}
FID = {"kind": "fidelity", "config": "raas-64", "policy": "raas", "budget": 64, "id": "1", "error": None, "n": 2,
       "nll_sum": 0.5, "agree_sum": 1.0, "n_last": 1, "nll_last_sum": 0.1, "agree_last_sum": 1.0}
FID_FAILED = {"kind": "fidelity", "config": "raas-32", "policy": "raas", "budget": 32, "id": "1", "error": "does not fit"}
RECORDS = [ACC, ACC_FAILED, TRACE, TRACE_FAILED, FID, FID_FAILED]
RECORD_START = b'{"kind": '


def jsonl(*records: dict) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


# ---- results files -----------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [
    b"# My project\n\nNotes I care about.\n",
    b"notes without a final newline",
    b"[1, 2, 3]\n",
    json.dumps(RECORDS).encode(),  # one JSON array of records is not JSONL
    b'{"question": "2+2?", "answer": "#### 4"}\n{"question": "3+3?", "answer": "#### 6"}\n',
    b"42\n", b"null\n", b'"text"\n',
    jsonl({**ACC, "correct": "yes"}), jsonl({**ACC, "kind": "accuracies"}), jsonl({k: v for k, v in FID.items() if k != "n"}),
    b"\xff\xfe\x00binary\n",
])
def test_a_file_that_is_not_a_results_file_is_refused_and_left_unchanged(tmp_path, content):
    path = tmp_path / "out.jsonl"
    path.write_bytes(content)
    with pytest.raises(LemmaError, match=r"out\.jsonl:1 is not a lemma results record"):
        ResultsFile(path)
    assert path.read_bytes() == content


def test_a_bad_line_in_the_middle_is_an_error_and_never_drops_the_lines_after_it(tmp_path):
    path = tmp_path / "r.jsonl"
    content = jsonl(ACC) + b'{"kind": "accuracy", "config": "ra\n' + jsonl(TRACE, FID)
    path.write_bytes(content)
    with pytest.raises(LemmaError, match=r"r\.jsonl:2 is not a lemma results record: not valid JSON"):
        ResultsFile(path)
    assert path.read_bytes() == content


def test_only_a_torn_last_line_is_dropped_and_appending_resumes_after_it(tmp_path):
    path = tmp_path / "r.jsonl"
    good = jsonl(ACC, TRACE_FAILED)
    path.write_bytes(good + b'{"kind": "fidelity", "con')
    results = ResultsFile(path)
    assert results.records == [ACC, TRACE_FAILED] and path.read_bytes() == good
    results.append([FID_FAILED])
    assert path.read_bytes() == good + jsonl(FID_FAILED)


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(jsonl(ACC) + json.dumps(FID).encode())
    results = ResultsFile(path)
    assert results.records == [ACC, FID]
    results.append([TRACE])
    assert ResultsFile(path).records == [ACC, FID, TRACE]


@pytest.mark.parametrize("content", [b"", b"\n\n", b"  "])
def test_an_empty_file_is_an_empty_results_file(tmp_path, content):
    path = tmp_path / "r.jsonl"
    path.write_bytes(content)
    results = ResultsFile(path)
    results.append([ACC])
    assert ResultsFile(path).records == [ACC]


def test_a_results_path_that_cannot_be_written_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(LemmaError, match="is a folder"):
        ResultsFile(tmp_path)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(LemmaError, match=r"cannot be created: .*file is not a folder"):
        ResultsFile(tmp_path / "file" / "sub" / "r.jsonl")
    assert (tmp_path / "file").read_text() == "mine"
    assert ResultsFile(tmp_path / "new" / "r.jsonl").records == [] and not (tmp_path / "new").exists()


def test_a_fifo_is_refused_rather_than_waited_on(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for open_it in (ResultsFile, load_problems):
        with pytest.raises(LemmaError, match="is not a regular file"):
            open_it(fifo)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_a_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(LemmaError, match="is not writable"):
        ResultsFile(folder / "r.jsonl")


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=6)


@st.composite
def mutated_records(draw) -> bytes:
    """A record with one field removed or replaced by any JSON value."""
    record = dict(draw(st.sampled_from(RECORDS)))
    key = draw(st.sampled_from(sorted(record)))
    if draw(st.booleans()):
        del record[key]
    else:
        record[key] = draw(JSON_VALUES)
    return json.dumps(record).encode()


RESULT_LINES = st.one_of(st.sampled_from([json.dumps(r).encode() for r in RECORDS]), mutated_records(),
                         JSON_VALUES.map(lambda v: json.dumps(v).encode()), st.text(max_size=30).map(str.encode),
                         st.binary(max_size=30))


@st.composite
def results_files(draw) -> bytes:
    content = b"".join(line + b"\n" for line in draw(st.lists(RESULT_LINES, max_size=6)))
    ending = draw(st.sampled_from(["newline", "torn record", "unterminated line"]))
    if ending == "torn record":
        whole = json.dumps(draw(st.sampled_from(RECORDS))).encode()
        content += whole[: draw(st.integers(1, len(whole) - 1))]
    elif ending == "unterminated line":
        content += draw(RESULT_LINES)
    return content


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=results_files())
def test_any_results_file_is_read_whole_or_refused_unchanged(tmp_path, content):
    path = tmp_path / "r.jsonl"
    path.write_bytes(content)
    try:
        results = ResultsFile(path)
    except LemmaError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        assert path.read_bytes() == content
        return
    kept = path.read_bytes()
    dropped = content[len(kept):]
    assert content.startswith(kept)
    assert not dropped or (b"\n" not in dropped and (dropped.startswith(RECORD_START) or RECORD_START.startswith(dropped)))
    assert all(record_problem(r) is None for r in results.records)
    runs.summarize_accuracy(results.of("accuracy"))
    runs.summarize_fidelity(results.of("fidelity"))
    results.append([ACC])
    assert [json.dumps(r) for r in ResultsFile(path).records] == [json.dumps(r) for r in results.records]


# ---- summaries: no perfect score from failures ----------------------------------------------------------

def test_a_configuration_where_every_problem_failed_reads_na_with_its_error_count(tmp_path, monkeypatch):
    accuracy = {r["config"]: r for r in runs.summarize_accuracy(
        [ACC, {**ACC_FAILED, "id": "1"}, {**ACC_FAILED, "id": "2"}, {**ACC, "config": "raas-64", "policy": "raas", "budget": 64}])}
    assert accuracy["raas-32"]["accuracy"] is None and accuracy["raas-32"]["errors"] == 2
    assert accuracy["raas-32"]["mean_generated_tokens"] is None and accuracy["raas-32"]["peak_kv_mib"] is None
    assert accuracy["dense"]["accuracy"] == 1.0
    partial = runs.summarize_accuracy([ACC, {**ACC_FAILED, "config": "dense", "policy": "dense", "budget": None, "id": "2"}])
    assert partial[0]["accuracy"] == 0.5 and partial[0]["errors"] == 1  # a failure counts as wrong
    fidelity = {r["config"]: r for r in runs.summarize_fidelity([FID, FID_FAILED, {**FID_FAILED, "id": "2"}])}
    failed = fidelity["raas-32"]
    assert failed["errors"] == 2 and failed["problems"] == 0
    assert all(failed[k] is None for k in ("nll_increase", "agreement", "nll_increase_last_third", "agreement_last_third"))
    assert fidelity["raas-64"]["nll_increase"] == 0.25
    shown = table(list(fidelity.values()), [("config", "config", ""), ("nll_increase", "NLL", ".4f"), ("errors", "errors", "d")])
    assert "| raas-32 | n/a | 2 |" in shown and "0.0000" not in shown

    drawn = {}

    def capture(plt, fig, title, out):
        ax = fig.axes[0]
        drawn["labels"] = [t.get_text() for t in ax.get_legend().get_texts()]
        drawn["lines"] = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
        plt.close(fig)

    monkeypatch.setattr(plots, "_save", capture)
    plots.metric_vs_budget(list(fidelity.values()), [("nll_increase", "NLL increase")], tmp_path / "p.png", "t")
    assert drawn["labels"] == ["raas (n/a at 32: 2 failed)"]
    assert drawn["lines"]["raas (n/a at 32: 2 failed)"] == [0.25]  # only the measured budget is drawn


def test_a_dense_row_without_a_value_is_named_in_the_legend_not_drawn_at_zero(tmp_path):
    rows = runs.summarize_accuracy([{**ACC_FAILED, "config": "dense", "policy": "dense", "budget": None}, ACC_FAILED])
    out = tmp_path / "p.png"
    plots.metric_vs_budget(rows, [("accuracy", "accuracy")], out, "all failed")
    assert out.read_bytes().startswith(PNG_SIGNATURE)


# ---- eval data -----------------------------------------------------------------------------------------

GOOD_ROW = '{"problem": "What is 2+2?", "answer": "4"}'


@pytest.mark.parametrize("line, fragment", [
    ("42", "expected a JSON object with 'question'/'answer' or 'problem'/'answer', got a number"),
    ("null", "got null"), ("[1, 2]", "got an array"), ('"2+2"', "got a string"),
    ('{"question": 5, "answer": "#### 4"}', "'question' must be a non-empty string, got a number"),
    ('{"question": "2+2?", "answer": null}', "GSM8K 'answer' must be a string ending in '#### <answer>', got null"),
    ('{"question": "2+2?", "answer": "4"}', "GSM8K 'answer' must be a string ending in '#### <answer>'"),
    ('{"question": "2+2?", "answer": "#### "}', "'answer' has nothing after '####'"),
    ('{"problem": "2+2?", "answer": null}', "'answer' must be a non-empty string or a number, got null"),
    ('{"problem": "2+2?", "answer": true}', "got a boolean"),
    ('{"problem": "  ", "answer": "4"}', "'problem' must be a non-empty string, got a blank string"),
    ('{"problem": "2+2?", "answer": "4", "id": {"a": 1}}', "'id' must be a non-empty string or an integer, got an object"),
    ('{"text": "2+2?"}', "expected 'question'/'answer' (GSM8K) or 'problem'/'answer' fields"),
    ('{"problem": "2+2?", "answer": "4"', "not valid JSON"),
    ('{"problem": "x", "answer": "1", "id": "1"}', "id '1' is already used on line 1"),
])
def test_a_malformed_data_line_is_one_error_naming_file_and_line(tmp_path, line, fragment):
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD_ROW.replace("}", ', "id": "1"}') + "\n" + line + "\n")
    with pytest.raises(LemmaError) as info:
        load_problems(path)
    message = str(info.value)
    assert message.startswith(f"{path}:2: ") and fragment in message and "\n" not in message


def test_data_files_that_cannot_be_read_as_problems(tmp_path):
    cases = {"missing.jsonl": (None, "data file not found"), "empty.jsonl": (b"", "no problems in the file"),
             "blank.jsonl": (b"\n  \n", "no problems in the file"),
             "latin1.jsonl": (GOOD_ROW.encode() + b"\n" + b'{"problem": "caf\xe9", "answer": "1"}\n', ":2: not UTF-8 text (byte 0xe9")}
    for name, (content, fragment) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(LemmaError, match=fragment.replace("(", r"\(")):
            load_problems(tmp_path / name)
    with pytest.raises(LemmaError, match="is a folder"):
        load_problems(tmp_path)
    for limit in (0, -1):
        with pytest.raises(LemmaError, match="limit must be at least 1"):
            load_problems(tmp_path / "latin1.jsonl", limit)


def test_unicode_line_separators_and_a_byte_order_mark_are_fine(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"problem": "a\u2028b\u0085c", "answer": 7}, ensure_ascii=False).encode() + b"\n")
    [problem] = load_problems(path)
    assert problem.question == "a\u2028b\u0085c" and problem.gold == "7" and problem.id == "1"


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k_test.jsonl").is_file(), reason="../shared/data not present")
def test_the_shared_data_sets_load_whole():
    sizes = {name: len(load_problems(SHARED_DATA / name)) for name in
             ("gsm8k_test.jsonl", "math500_test.jsonl", "aime2024.jsonl", "aime2025.jsonl")}
    assert sizes == {"gsm8k_test.jsonl": 1319, "math500_test.jsonl": 500, "aime2024.jsonl": 30, "aime2025.jsonl": 30}


DATA_LINES = st.one_of(
    st.sampled_from([GOOD_ROW, '{"question": "q?", "answer": "so #### 12"}', '{"problem": "p", "answer": 3, "id": 9}']),
    st.fixed_dictionaries({}, optional={"question": JSON_VALUES, "problem": JSON_VALUES, "answer": JSON_VALUES,
                                        "id": JSON_VALUES, "unique_id": JSON_VALUES}).map(json.dumps),
    JSON_VALUES.map(json.dumps), st.text(max_size=30),
).map(str.encode) | st.binary(max_size=30)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(DATA_LINES, max_size=6), final_newline=st.booleans(), limit=st.none() | st.integers(-1, 4))
def test_any_data_file_gives_problems_or_one_error_line(tmp_path, lines, final_newline, limit):
    path = tmp_path / "d.jsonl"
    content = b"\n".join(lines) + (b"\n" if final_newline else b"")
    path.write_bytes(content)
    try:
        problems = load_problems(path, limit)
    except LemmaError as exc:
        assert "\n" not in str(exc) and (str(path) in str(exc) or "limit" in str(exc))
    else:
        assert 0 < len(problems) <= (limit or len(problems))
        assert all(p.question.strip() and p.gold.strip() and p.id for p in problems)
        assert len({p.id for p in problems}) == len(problems)
    assert path.read_bytes() == content


# ---- the commands --------------------------------------------------------------------------------------

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
    result = invoke("bench", "--model", tiny_dir, "--context", 32, "--steps", 3, "--policies", "dense", "--out", ours)
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


def test_results_of_another_run_are_refused(tmp_path):
    """Resume never mixes runs: a file written with other settings (data, model, max_tokens, ...) is
    refused with one line and left unchanged; the same settings resume from it."""
    path = tmp_path / "r.jsonl"
    ResultsFile(path, run={"data": "gsm8k.jsonl", "max_tokens": 8}).append([ACC])
    before = path.read_bytes()
    with pytest.raises(LemmaError, match="holds results of another run") as info:
        ResultsFile(path, run={"data": "aime2024.jsonl", "max_tokens": 8})
    assert "\n" not in str(info.value) and path.read_bytes() == before
    again = ResultsFile(path, run={"data": "gsm8k.jsonl", "max_tokens": 8})
    assert again.records[0]["run"] == {"data": "gsm8k.jsonl", "max_tokens": 8}
