"""`lemma bench`, `lemma eval`, `lemma trace`: the measuring commands (registered on the app in cli.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from lemma.cli import (CompileOpt, DeviceOpt, DtypeOpt, ModelOpt, QuantizeOpt, _engine, check_model_option, compile_default,
                       friendly_errors)
from lemma.errors import LemmaError
from lemma.evaluation import outputs


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LemmaError(f"{flag} must be comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    """Policy specs: a name, optionally with options ('raas:dense_layers=2'), checked here."""
    from lemma.engine.policies import policy_from_spec

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise LemmaError("--policies names no policy")
    for spec in names:
        policy_from_spec(spec, 1024)  # unknown or bad options fail now
    return names


def _at_least(value: int | None, minimum: int, flag: str) -> None:
    if value is not None and value < minimum:
        raise LemmaError(f"{flag} must be at least {minimum}, got {value}")


def _progress(total: int, label: str):
    from rich.progress import Progress

    bar = Progress(transient=True)
    task = bar.add_task(label, total=total)
    return bar, lambda n: bar.advance(task, n)


def bench(
    model: Optional[str] = ModelOpt,
    policies: str = typer.Option("dense,raas,quest,h2o,streaming", help="Comma-separated policies."),
    budget: int = typer.Option(512, help="KV budget in tokens for the non-dense policies."),
    context: str = typer.Option("1024,2048,4096,8192", help="Comma-separated context lengths (prompt tokens)."),
    steps: int = typer.Option(32, help="Decode steps timed at each context."),
    vs_transformers: bool = typer.Option(False, "--vs-transformers", help="Run the same workload through transformers."),
    out: Path = typer.Option(Path("bench-results.json"), help="JSON results; a PNG plot is written next to it."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    compile: Optional[bool] = CompileOpt,
    quantize: Optional[str] = QuantizeOpt,
) -> None:
    """Decode ms/token, resident KV and achieved bandwidth per policy at each context length.

    A prompt of each context length is prefilled, then `steps` tokens are decoded and timed. Evicting
    policies cut the prompt to their budget (RaaS runs with the prompt unpinned here).
    Example: lemma bench --context 1024,4096 --policies dense,raas --vs-transformers
    """
    from lemma.evaluation import plots, speed
    from lemma.models.staging import replace_file

    check_model_option(model)
    contexts = _ints(context, "--context")
    if not contexts:
        raise LemmaError("--context names no length")
    for length in contexts:
        _at_least(length, 1, "--context")
    _at_least(steps, 3, "--steps")  # the first two steps warm caches up and are not timed
    bench_policies = {name: _bench_policy(name, budget) for name in _names(policies)}  # a bad --budget fails here
    outputs.check_replaceable(out, "--out", _is_bench_results, "a lemma bench results file")
    png = outputs.plot_next_to(out, "--out")
    from lemma import Engine
    from lemma.models.store import resolve_model

    model_dir = resolve_model(model)
    kv_tokens = speed.check_fits(model_dir, max(contexts), steps, device, dtype)
    engine = Engine(model_dir, device=device, dtype=dtype, kv_cache_tokens=kv_tokens, max_batch=1,
                    compile=compile_default(compile), quantize=quantize)
    peak = speed.copy_bandwidth(engine.device)
    rows = []
    bar, advance = _progress(len(contexts) * (len(bench_policies) + vs_transformers), "benchmarking")
    with bar:
        for ctx in contexts:
            prompt = speed.long_prompt(engine, ctx)
            theirs = None
            if vs_transformers:
                theirs = speed.bench_transformers(engine, prompt, steps)
                advance(1)
            for name, policy in bench_policies.items():
                row = speed.bench_policy(engine, policy, prompt, steps)
                row["policy_name"] = name
                if "achieved_gb_per_s" in row:
                    row["percent_of_copy_bandwidth"] = 100 * row["achieved_gb_per_s"] * 1e9 / peak
                if theirs is not None:
                    row["transformers_ms_per_token"] = theirs
                    row["speedup_vs_transformers"] = theirs / row["ms_per_token"] if "ms_per_token" in row else None
                rows.append(row)
                advance(1)
    columns = [("policy", "policy", ""), ("context", "context", "d"), ("ms_per_token", "ms/token", ".1f"),
               ("resident_kv_mib", "resident KV MiB", ".1f"), ("peak_kv_mib", "peak KV MiB", ".1f"),
               ("achieved_gb_per_s", "GB/s", ".1f"), ("percent_of_copy_bandwidth", "% of copy", ".0f")]
    if vs_transformers:
        columns += [("transformers_ms_per_token", "transformers ms/token", ".1f"), ("speedup_vs_transformers", "transformers ÷ lemma", ".2f")]
    typer.echo(f"model {engine.model_dir.name} on {engine.device} ({str(engine.dtype)[6:]}), budget {budget}, "
               f"copy bandwidth {peak / 1e9:.1f} GB/s")
    typer.echo(outputs.table(rows, columns))
    for row in rows:
        if "error" in row:
            typer.echo(f"{row['policy']} at context {row['context']} failed: {row['error']}")
    with outputs.writing(out, "--out"):  # whole or not at all: a full disk leaves the earlier results
        replace_file(out, json.dumps({"model": engine.model_dir.name, "device": str(engine.device), "budget": budget,
                                      "copy_gb_per_s": peak / 1e9, "rows": rows}, indent=2).encode())
    plots.bench_plot([dict(r, policy=r["policy_name"]) for r in rows if "ms_per_token" in r], png,
                     f"{engine.model_dir.name}: decode cost and KV memory vs context (budget {budget})")
    typer.echo(f"wrote {out} and {png}")


def _bench_policy(name: str, budget: int):
    """RaaS runs with the prompt unpinned: the bench prompts are longer than the budget."""
    from lemma.engine.policies import policy_from_spec

    return policy_from_spec(name, budget, {"pin_prompt": False})


def _is_bench_results(path: Path) -> bool:
    return outputs.is_json_object_with(path, ("copy_gb_per_s", "rows"))


def evaluate(
    data: Optional[Path] = typer.Option(None, "--data", help="GSM8K, MATH500 or AIME JSONL file."),
    traces: Optional[Path] = typer.Option(None, "--traces", help="Reasoning-trace JSONL (problem, trace): teacher-force "
                                          "each trace under every policy and report fidelity against Dense by position."),
    max_trace_tokens: int = typer.Option(4096, help="--traces: cut each trace to this many tokens."),
    model: Optional[str] = ModelOpt,
    policies: str = typer.Option("dense,raas", help="Comma-separated policies."),
    budgets: str = typer.Option("64,128,256,512", help="Comma-separated KV budgets (tokens) for non-dense policies."),
    limit: Optional[int] = typer.Option(None, help="Only the first N problems."),
    sample: Optional[int] = typer.Option(None, help="--traces: N traces spread evenly over the file (instead of the first N)."),
    shard: Optional[str] = typer.Option(None, help="--traces: K/N replays every Nth of the chosen traces from the Kth "
                                         "(0-based), so N processes can share one --out file."),
    max_tokens: int = typer.Option(512, help="Most tokens per answer (or per fidelity trace)."),
    batch: int = typer.Option(8, help="Problems decoded together (--traces: traces replayed together, from groups of "
                                      "4x as many taken longest first)."),
    fidelity: bool = typer.Option(False, "--fidelity", help="Replay Dense's greedy traces under each policy instead of grading answers."),
    pin_prompt: bool = typer.Option(True, "--pin-prompt/--no-pin-prompt", help="raas: pin the prompt (it must fit the budget)."),
    out: Path = typer.Option(Path("eval-results.jsonl"), help="Results file; an interrupted run resumes from it."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    compile: Optional[bool] = CompileOpt,
    quantize: Optional[str] = QuantizeOpt,
) -> None:
    """Accuracy (or, with --fidelity, NLL increase and top-1 agreement against Dense) per policy and budget;
    with --traces, fidelity over long reasoning traces written by other models, by trace position.
    A policy may carry options: raas:dense_layers=2.

    Example: lemma eval --data ../shared/data/gsm8k_test.jsonl --limit 50 --policies dense,raas --budgets 256,512
    Example: lemma eval --traces ../shared/data/reasoning_traces/qwq32b_gsm8k.jsonl --limit 20 --policies raas,h2o
    """
    from lemma import SamplingParams
    from lemma.evaluation import plots, runs
    from lemma.evaluation.datasets import load_problems
    from lemma.evaluation.results import ResultsFile

    check_model_option(model)
    _at_least(limit, 1, "--limit")
    _at_least(max_tokens, 1, "--max-tokens")
    _at_least(batch, 1, "--batch")
    if (data is None) == (traces is None):
        raise LemmaError("name exactly one of --data (problems) or --traces (reasoning traces)")
    if traces is not None:
        _at_least(max_trace_tokens, 1, "--max-trace-tokens")
        _at_least(sample, 1, "--sample")
        if sample is not None and limit is not None:
            raise LemmaError("name at most one of --limit (the first N traces) or --sample (N spread over the file)")
        return _evaluate_traces(traces, model, policies, budgets, limit, sample, _shard(shard), max_trace_tokens, batch,
                                pin_prompt, out, device, dtype, quantize)
    if sample is not None or shard is not None:
        raise LemmaError(f"{'--sample' if sample is not None else '--shard'} applies to --traces; with --data use --limit")
    grid = _eval_grid(_names(policies), _ints(budgets, "--budgets"), pin_prompt, fidelity)
    problems = load_problems(data, limit)
    png = outputs.plot_next_to(out, "--out")
    from lemma.models.store import DEFAULT_MODEL

    run = {"data": data.name, "model": Path(model or DEFAULT_MODEL).name, "max_tokens": max_tokens,
           "pin_prompt": pin_prompt, "dtype": dtype or "default", **({"quantize": quantize} if quantize else {})}
    results = ResultsFile(out, "--out", run)  # refuses a file that is not this run's lemma results, before the run
    engine = _engine(model, device, dtype, compile=compile, max_batch=min(batch, len(problems)), quantize=quantize)
    work = len(problems) * (len(grid) + (1 if fidelity else 0))
    bar, advance = _progress(work, "fidelity" if fidelity else "accuracy")
    try:
        with bar:
            if fidelity:
                runs.run_fidelity(engine, problems, grid, max_tokens, results, batch, advance)
            else:
                params = SamplingParams(temperature=0, max_tokens=max_tokens)
                runs.run_accuracy(engine, problems, grid, params, results, batch, advance)
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted; {out} holds every finished batch; run the same command again to resume", err=True)
        raise typer.Exit(130) from None
    ids = {p.id for p in problems}
    if fidelity:
        failed = [r for r in results.of("trace") if r["id"] in ids and "tokens" not in r]
        if failed:
            typer.echo(f"{len(failed)} of {len(problems)} Dense traces failed and are left out; first: {failed[0]['error']}")
        rows = runs.summarize_fidelity([r for r in results.of("fidelity") if r["id"] in ids])
        columns = [("config", "config", ""), ("problems", "problems", "d"), ("tokens", "tokens", "d"),
                   ("nll_increase", "NLL increase/token", ".4f"), ("agreement", "top-1 agreement", ".3f"),
                   ("nll_increase_last_third", "NLL incr. last third", ".4f"), ("agreement_last_third", "agreement last third", ".3f"),
                   ("errors", "errors", "d")]
        metrics = [("nll_increase", "NLL increase per token"), ("agreement", "top-1 agreement with Dense")]
    else:
        rows = runs.summarize_accuracy(runs.answered_by_all([r for r in results.of("accuracy") if r["id"] in ids]))
        columns = [("config", "config", ""), ("problems", "problems", "d"), ("accuracy", "accuracy", ".3f"),
                   ("mean_generated_tokens", "mean tokens", ".0f"), ("mean_jct_seconds", "mean JCT s", ".1f"),
                   ("peak_kv_mib", "peak KV MiB", ".1f"), ("errors", "errors", "d")]
        metrics = [("accuracy", "accuracy")]
    typer.echo(f"{data.name}, {len(problems)} problems, model {engine.model_dir.name}, max {max_tokens} tokens")
    typer.echo(outputs.table(rows, columns))
    plots.metric_vs_budget(rows, metrics, png, f"{engine.model_dir.name} on {data.stem}")
    typer.echo(f"results in {out}, plot in {png}")


def _shard(spec: str | None) -> tuple[int, int]:
    """--shard K/N as (K, N); (0, 1) when not given."""
    if spec is None:
        return 0, 1
    k, _, n = spec.partition("/")
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise LemmaError(f"--shard must be K/N with 0 <= K < N (e.g. 0/2), got {spec!r}")
    return int(k), int(n)


def _evaluate_traces(path: Path, model: str | None, policies: str, budgets: str, limit: int | None, sample: int | None,
                     shard: tuple[int, int], max_trace_tokens: int, batch: int, pin_prompt: bool, out: Path, device: str | None,
                     dtype: str | None, quantize: str | None = None) -> None:
    from lemma.evaluation import plots, runs
    from lemma.evaluation.results import ResultsFile
    from lemma.evaluation.traces import GROUP_PER_BATCH, evenly_spaced, load_traces, run_trace_fidelity
    from lemma.models.store import DEFAULT_MODEL

    grid = _eval_grid(_names(policies), _ints(budgets, "--budgets"), pin_prompt, True)
    traces = load_traces(path, limit)
    if sample is not None:
        traces = evenly_spaced(traces, sample)
    traces = traces[shard[0]::shard[1]]
    if not traces:
        raise LemmaError(f"--shard {shard[0]}/{shard[1]} leaves no trace of the {path.name} traces chosen")
    png = outputs.plot_next_to(out, "--out")
    position_png = png.with_name(png.stem + "-position.png")
    outputs.check_png(position_png, "--out")
    run = {"traces": path.name, "model": Path(model or DEFAULT_MODEL).name, "max_trace_tokens": max_trace_tokens,
           "pin_prompt": pin_prompt, "dtype": dtype or "default", **({"quantize": quantize} if quantize else {})}
    results = ResultsFile(out, "--out", run)
    engine = _engine(model, device, dtype, max_batch=min(batch, len(traces)), quantize=quantize)
    bar, advance = _progress(len(traces) * (1 + sum(p.budget is not None for p in grid)), "trace fidelity")
    try:
        with bar:
            run_trace_fidelity(engine, traces, grid, max_trace_tokens, results, GROUP_PER_BATCH * batch, advance)
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted; {out} holds every finished batch; run the same command again to resume", err=True)
        raise typer.Exit(130) from None
    ids = {t.id for t in traces}
    failed = [r for r in results.of("trace") if r["id"] in ids and "tokens" not in r]
    if failed:
        typer.echo(f"{len(failed)} of {len(traces)} Dense replays failed and are left out; first: {failed[0]['error']}")
    records = [r for r in results.of("fidelity") if r["id"] in ids]
    counted = [r for r in records if "shared_tokens" in r]
    if counted:
        share = sum(r["shared_tokens"] for r in counted) / max(sum(r["n"] for r in counted), 1)
        typer.echo(f"policy replays took {share:.0%} of their targets from Dense's shared prefix "
                   f"({len(counted)} records that count it)")
    records, failed = runs.comparable(records)
    for budget, bad in sorted(failed.items(), key=lambda item: item[0] or 0):
        first = next(iter(bad.values()))
        typer.echo(f"budget {budget}: {len(bad)} traces failed under some policy and are left out of every row at that "
                   f"budget (first: {first['config']} on {first['id']}: {first['error']})")
    rows = runs.summarize_fidelity(records)
    kilo = sorted({start for r in rows for start, *_ in runs.regroup(r.get("position", []), 1024)})
    for r in rows:
        for start, _, nll, _ in runs.regroup(r.get("position", []), 1024):
            r[f"nll_{start // 1024}k"] = nll
    columns = [("config", "config", ""), ("problems", "traces", "d"), ("tokens", "tokens", "d"),
               ("nll_increase", "NLL increase/token", ".4f"), ("agreement", "top-1 agreement", ".3f"),
               ("nll_increase_first_half", "NLL 1st half", ".4f"), ("nll_increase_second_half", "NLL 2nd half", ".4f"),
               ("agreement_second_half", "agree 2nd half", ".3f")]
    columns += [(f"nll_{k // 1024}k", f"NLL {k // 1024}-{k // 1024 + 1}K", ".4f") for k in kilo]
    columns += [("mean_pages_evicted", "pages evicted", ".0f"), ("mean_peak_kv_pages", "KV pages held", ".0f"),
                ("errors", "errors", "d")]
    tokens = sum(len(r["tokens"]) for r in results.of("trace") if r["id"] in ids and "tokens" in r)
    typer.echo(f"{path.name}, {len(traces)} traces ({tokens} tokens, cut at {max_trace_tokens}), "
               f"model {engine.model_dir.name}")
    typer.echo(outputs.table(rows, columns))
    title = f"{engine.model_dir.name} on {path.stem}"
    plots.metric_vs_budget(rows, [("nll_increase", "NLL increase per token"), ("agreement", "top-1 agreement with Dense")],
                           png, title)
    plots.fidelity_vs_position(rows, position_png, title)
    typer.echo(f"results in {out}, plots in {png} and {position_png}")


def _eval_grid(names: list[str], budgets: list[int], pin_prompt: bool, fidelity: bool) -> list:
    """The policies to evaluate, every budget checked before anything loads."""
    from lemma.evaluation import runs

    budgeted = [name for name in names if not name.lower().startswith("dense")]
    if budgeted and not budgets:
        raise LemmaError(f"--budgets names no budget for {', '.join(budgeted)}")
    if fidelity and not budgeted:
        raise LemmaError("--fidelity compares other policies against dense: name one besides dense in --policies")
    return runs.policy_grid(names, budgets, pin_prompt)


def trace(
    prompt: str = typer.Argument(..., help="The prompt (sent through the chat template)."),
    model: Optional[str] = ModelOpt,
    budget: int = typer.Option(256, help="RaaS budget in tokens."),
    max_tokens: int = typer.Option(512),
    layer: Optional[int] = typer.Option(None, help="Layer to show (default: average of all)."),
    head: Optional[int] = typer.Option(None, help="KV head to show (default: average of all)."),
    out: Path = typer.Option(Path("trace.png"), help="The picture."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
) -> None:
    """Per-page attention mass over decode steps under RaaS, evictions marked: milestone pages rise,
    serve and fade.

    Example: lemma trace "Prove that the square root of 2 is irrational." --budget 128 --max-tokens 400
    """
    from lemma import RaaS
    from lemma.evaluation import plots
    from lemma.evaluation.trace import record_trace

    check_model_option(model)
    _at_least(max_tokens, 1, "--max-tokens")
    outputs.check_png(out, "--out")
    engine = _engine(model, device, dtype, policy=RaaS(budget=budget))
    c = engine.config
    if layer is not None and not 0 <= layer < c.num_layers:
        raise LemmaError(f"--layer must be in [0, {c.num_layers}), got {layer}")
    if head is not None and not 0 <= head < c.num_kv_heads:
        raise LemmaError(f"--head must be in [0, {c.num_kv_heads}), got {head}")
    ids = engine.chat_prompt([{"role": "user", "content": prompt}])
    result = record_trace(engine, ids, max_tokens, layer, head)
    where = ("all layers" if layer is None else f"layer {layer}") + (", all KV heads" if head is None else f", KV head {head}")
    plots.trace_plot(result.steps, result.evictions, result.prompt_pages, out,
                     f"{engine.model_dir.name}, RaaS-{budget}, {where}: attention mass per page")
    typer.echo(f"{len(result.steps)} decode steps, {len(result.evictions)} (step, page) evictions; wrote {out}")


def register(app: typer.Typer) -> None:
    app.command()(friendly_errors(bench))
    app.command("eval")(friendly_errors(evaluate))
    app.command()(friendly_errors(trace))
