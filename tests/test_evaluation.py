"""Answer extraction and equivalence on real dataset answers, fidelity math, resumable results, and the
measuring commands on a tiny model."""

import json
import random

import pytest

from conftest import SHARED_DATA
from lemma import Dense, Engine, RaaS, StreamingLLM
from lemma.evaluation import runs
from lemma.evaluation.answers import equivalent, extract_answer, gsm8k_gold, last_boxed, normalize
from lemma.evaluation.datasets import load_problems
from lemma.evaluation.results import ResultsFile

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
