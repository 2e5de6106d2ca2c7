"""Answer extraction and equivalence on real dataset answers, fidelity math, resumable results (and
files that are not results), summaries that never score failures, malformed eval data."""

import json
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SHARED_DATA
from lemma import Dense, Engine, RaaS, StreamingLLM
from lemma.evaluation.outputs import table
from lemma.errors import LemmaError
from lemma.evaluation import plots, runs
from lemma.evaluation.answers import equivalent, extract_answer, gsm8k_gold, last_boxed, normalize
from lemma.evaluation.datasets import load_problems
from lemma.evaluation.outputs import PNG_SIGNATURE
from lemma.evaluation.results import ResultsFile, record_problem

needs_data = pytest.mark.skipif(not (SHARED_DATA / "math500_test.jsonl").is_file(), reason="../shared/data not present")


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in open(SHARED_DATA / name)]


@needs_data
def test_math500_answers_survive_boxing_and_extraction():
    rows = random.Random(0).sample(_rows("math500_test.jsonl"), 40)
    for row in rows:
        gold = row["answer"]
        text = f"Working... so the final answer is $\\boxed{{{gold}}}$. Done."
        assert extract_answer(text) == gold.strip()
        assert equivalent(extract_answer(text), gold), gold


@needs_data
def test_gsm8k_gold_and_model_style_answers():
    rows = _rows("gsm8k_test.jsonl")[:20]
    for row in rows:
        gold = gsm8k_gold(row["answer"])
        assert gold.lstrip("-").replace(".", "").isdigit()
        assert equivalent(extract_answer(row["answer"]), gold)  # the reference solution itself, '#### n'
        number = int(gold) if gold.lstrip("-").isdigit() else float(gold)
        assert equivalent(extract_answer(f"She makes ${number:,} in total. The answer is {number:,}."), gold)
        assert equivalent(f"\\boxed{{{gold}.00}}".replace("\\boxed{", "").rstrip("}"), gold)
        assert not equivalent(str(number + 1), gold)


@needs_data
def test_aime_answers_with_leading_zeros():
    for name in ("aime2024.jsonl", "aime2025.jsonl"):
        for row in _rows(name)[:10]:
            gold = str(row["answer"])
            assert equivalent(f"{int(gold):03d}", gold) and equivalent(str(int(gold)), gold)
            assert not equivalent(str(int(gold) + 1), gold)


@pytest.mark.parametrize("pred, gold, same", [
    ("\\dfrac{11}{2}", "\\frac{11}{2}", True), ("5.5", "\\frac{11}{2}", True), ("11/2", "\\frac{11}{2}", True),
    ("\\frac{11}{3}", "\\frac{11}{2}", False), ("76", "76^\\circ", True), ("1,000", "1000", True),
    ("(2, 12)", "(2,12)", True), ("(2,13)", "(2,12)", False), ("-2, 1", "-2,1", True), ("x = 5", "5", True),
    ("\\text{(C)}", "(C)", True), ("10\\%", "10", True), ("\\$18.00", "18", True), ("\\frac12", "\\frac{1}{2}", True),
    ("-\\frac{1}{4}", "-0.25", True), ("\\sqrt{2}", "\\sqrt{2}", True), ("\\sqrt{3}", "\\sqrt{2}", False),
    (None, "3", False), ("6+9i", "6+9i", True), ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
])
def test_equivalence_cases(pred, gold, same):
    assert equivalent(pred, gold) is same


def test_extraction_rules():
    assert last_boxed("a \\boxed{x} b \\boxed{\\frac{1}{\\sqrt{2}}} c") == "\\frac{1}{\\sqrt{2}}"
    assert extract_answer("no box\n#### 42") == "42"
    assert extract_answer("So the answer is 17.") == "17"
    assert extract_answer("We get 3 apples and then 5 pears") == "5"
    assert extract_answer("nothing numeric") is None
    assert normalize("\\text{ 5 cm}") == "5"


def test_datasets_load_all_formats(tmp_path):
    if (SHARED_DATA / "gsm8k_test.jsonl").is_file():
        gsm = load_problems(SHARED_DATA / "gsm8k_test.jsonl", limit=3)
        assert len(gsm) == 3 and gsm[0].gold == "18"
        assert load_problems(SHARED_DATA / "aime2025.jsonl", limit=1)[0].gold == "70"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    from lemma import LemmaError

    with pytest.raises(LemmaError, match="bad.jsonl:1: expected 'question'/'answer'"):
        load_problems(bad)


def test_fidelity_sums_on_a_constructed_case():
    sums = runs.fidelity_sums(dense_predicted=[1, 2, 3, 4, 5, 6], dense_logprobs=[-1.0, -2, -1, -1, -3, -1],
                              logprobs=[-1.5, -2, -1, -2, -3, -1], predicted=[1, 2, 9, 4, 5, 7])
    assert sums == {"n": 6, "nll_sum": 1.5, "agree_sum": 4.0, "n_last": 2, "nll_last_sum": 0.0, "agree_last_sum": 1.0,
                    "n_half": 3, "nll_half_sum": 1.0, "agree_half_sum": 2.0,
                    "bucket": 256, "n_buckets": [6], "nll_buckets": [1.5], "agree_buckets": [4.0]}


def test_a_policy_that_keeps_everything_has_perfect_fidelity(tiny_dir, tmp_path):
    engine = Engine(tiny_dir, kv_cache_tokens=2048)
    problems = [p for p in _tiny_problems()]
    results = ResultsFile(tmp_path / "fid.jsonl")
    keep_all = [Dense(), RaaS(budget=1024), StreamingLLM(budget=1024), RaaS(budget=32, pin_prompt=False)]
    runs.run_fidelity(engine, problems, keep_all, max_tokens=40, results=results, batch=2)
    rows = {r["config"]: r for r in runs.summarize_fidelity(results.of("fidelity"))}
    for config in ("raas-1024", "streaming-1024"):
        assert rows[config]["nll_increase"] == pytest.approx(0.0, abs=1e-5)
        assert rows[config]["agreement"] == 1.0 and rows[config]["agreement_last_third"] == 1.0
        assert rows[config]["tokens"] == 40 * len(problems)
    assert rows["raas-32(pin_prompt=False)"]["nll_increase"] > 1e-3  # a budget of 2 pages loses something


def _tiny_problems():
    from lemma.evaluation.datasets import Problem

    return [Problem(str(i), q, "1") for i, q in enumerate(["What is 2+2?", "Tell me a story about a fox.", "17*23?"])]


def test_accuracy_run_resumes_after_interruption(tiny_dir, tmp_path):
    from lemma import SamplingParams

    engine = Engine(tiny_dir, kv_cache_tokens=2048)
    problems = _tiny_problems()
    path = tmp_path / "acc.jsonl"
    grid = runs.policy_grid(["dense", "raas"], [64], pin_prompt=False)
    params = SamplingParams(temperature=0, max_tokens=8)
    calls = {"n": 0}
    generate = engine.generate

    def interrupted(prompts, p):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return generate(prompts, p)

    engine.generate = interrupted
    with pytest.raises(KeyboardInterrupt):
        runs.run_accuracy(engine, problems, grid, params, ResultsFile(path), batch=2)
    with open(path, "a") as f:
        f.write('{"kind": "accuracy", "config": "ra')  # a write torn by a kill
    first = ResultsFile(path)
    # problems [0, 1] under dense and raas, then the interrupt: nothing of problem 2
    assert sorted((r["config"][:4], r["id"]) for r in first.of("accuracy")) == sorted(
        (c, p.id) for c in ("dens", "raas") for p in problems[:2])
    assert len(runs.answered_by_all(first.of("accuracy") + [{"config": "dense", "id": problems[2].id}])) == 4
    engine.generate = generate
    seen = []
    runs.run_accuracy(engine, problems, grid, params, first, batch=2, progress=seen.append)
    assert seen == [1, 1]  # only problem 2 ran, under each policy
    final = ResultsFile(path).of("accuracy")
    configs = ("dense", "raas-64(pin_prompt=False)")
    assert sorted((r["config"], r["id"]) for r in final) == sorted((c, p.id) for c in configs for p in problems)
    assert all(json.loads(line) for line in path.read_text().splitlines())
    summary = runs.summarize_accuracy(final)
    assert [r["config"] for r in summary] == list(configs) and summary[0]["problems"] == 3


@pytest.mark.parametrize("pred, gold", [
    ("(-\\infty,3]", "(-\\infty,3)"), ("[1,2)", "(1,2]"), ("(1,2)", "[1,2]"), ("1000001", "1000000"),
    ("0.333334", "\\frac13"),
])
def test_near_misses_are_not_equivalent(pred, gold):
    assert not equivalent(pred, gold)


def test_a_cut_off_output_needs_an_explicit_answer():
    assert extract_answer("so far we have 3 apples and 12", complete=False) is None
    assert extract_answer("thus \\boxed{12} and then", complete=False) == "12"


def test_page_tables_are_not_reused_across_sequences(tiny_dir):
    """Two sequences with the same page-list history must not share a cached page table."""
    from lemma import SamplingParams

    engine = Engine(tiny_dir, policy=StreamingLLM(budget=32), kv_cache_tokens=512)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompt = list(range(3, 3 + 40))
    first = engine.generate([prompt], params)[0]
    for _ in range(5):  # the same prompt again: identical page counts, different page ids after the cut
        assert engine.generate([prompt], params)[0].token_ids == first.token_ids
    assert engine.pages.all_free


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


# ---- results files: a file that is not lemma's is never rewritten, a bad line never dropped -----------------------------------------------------------------------------------

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


@pytest.mark.parametrize("fails", ["write", "fsync"])
def test_an_append_the_disk_cuts_short_leaves_the_file_as_it_was(tmp_path, monkeypatch, fails):
    """A full disk mid-append (part of the records written, then ENOSPC from the write or the fsync):
    one line naming the file, the file as before (no torn record that the next append would bury
    mid-file, nothing written later when the file closes), and the next append lands whole."""
    import errno

    path = tmp_path / "r.jsonl"
    good = jsonl(ACC) + json.dumps(TRACE).encode()  # a last record without its newline: the append adds one
    path.write_bytes(good)
    results = ResultsFile(path)
    real = getattr(os, fails)
    calls = []

    def disk_full(fd: int, *data) -> int:
        calls.append(fd)
        if fails == "write" and len(calls) == 1:
            return real(fd, data[0][:9])  # only part of the records reached the disk
        if fails == "fsync":
            os.ftruncate(fd, os.fstat(fd).st_size - 7)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, fails, disk_full)
    with pytest.raises(LemmaError, match=r"cannot write results file .*r\.jsonl: No space left on device"):
        results.append([FID, FID_FAILED])
    monkeypatch.setattr(os, fails, real)
    assert path.read_bytes() == good and results.records == [ACC, TRACE]
    results.append([FID])
    assert ResultsFile(path).records == [ACC, TRACE, FID]


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


def test_a_full_disk_while_plotting_is_one_line_and_keeps_the_old_plot(tmp_path, monkeypatch):
    import errno
    import os

    rows = runs.summarize_accuracy([{**ACC_FAILED, "config": "dense", "policy": "dense", "budget": None}, ACC_FAILED])
    out = tmp_path / "p.png"
    out.write_bytes(b"the old plot")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(LemmaError, match=r"cannot write plot .*p\.png: No space left on device"):
        plots.metric_vs_budget(rows, [("accuracy", "accuracy")], out, "all failed")
    assert out.read_bytes() == b"the old plot" and [p.name for p in tmp_path.iterdir()] == ["p.png"]


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
