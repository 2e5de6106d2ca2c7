"""`lemma serve`: an OpenAI-compatible HTTP server (registered on the app in cli.py)."""

from __future__ import annotations

from typing import Optional

import typer

from lemma.cli import (BudgetOpt, CompileOpt, DenseLayersOpt, DeviceOpt, DtypeOpt, ModelOpt, PinOpt, PolicyOpt, PrefixCacheOpt,
                       QuantizeOpt, TpOpt,
                       _engine, _policy, check_model_option, friendly_errors)
from lemma.errors import LemmaError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    model: Optional[str] = ModelOpt,
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default; use --api-key when exposing it)."),
    port: int = typer.Option(8000, help="TCP port."),
    policy: str = PolicyOpt,
    budget: int = BudgetOpt,
    pin_prompt: bool = PinOpt,
    dense_layers: int = DenseLayersOpt,
    max_batch: int = typer.Option(32, "--max-batch", help="Most requests decoding at once."),
    kv_cache_tokens: Optional[int] = typer.Option(None, "--kv-cache-tokens",
                                                  help="KV pool size in tokens (default: 1 GiB on CPU, 85% of free memory on CUDA)."),
    prefill_chunk: int = typer.Option(512, "--prefill-chunk", help="Tokens per engine step: the decode batch plus prompt chunks."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LEMMA_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1 routes."),
    default_max_tokens: Optional[int] = typer.Option(None, "--default-max-tokens",
                                                     help="max_tokens of requests that give none (default: the rest of the context)."),
    served_name: Optional[str] = typer.Option(None, "--served-model-name", help="Model id clients send (default: the model's name)."),
    reasoning: str = typer.Option("auto", "--reasoning-parser",
                                  help="auto, think or none: put <think> text in reasoning_content (auto: when the tokenizer has <think>)."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    compile: Optional[bool] = CompileOpt,
    quantize: Optional[str] = QuantizeOpt,
    prefix_cache: bool = PrefixCacheOpt,
    tp: int = TpOpt,
    warm_policy: Optional[list[str]] = typer.Option(
        None, "--warm-policy", help="A policy clients will ask for in kv_policy (repeatable, e.g. raas:budget=512): "
                                    "compile it, and its mixes with the others, at start instead of on first use."),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (chat/completions, completions, models).

    Example: lemma serve --policy raas --budget 512 --port 8000, then point any OpenAI client at
    http://127.0.0.1:8000/v1. A request may pick its own KV policy: "kv_policy": {"name": "raas", "budget": 512}.
    """
    check_model_option(model)
    if api_key is not None and not api_key.strip():
        raise LemmaError("--api-key (or LEMMA_API_KEY) is empty; give a key, or leave it out to serve without one")
    if reasoning not in ("auto", "think", "none"):
        raise LemmaError(f"--reasoning-parser must be auto, think or none, got {reasoning!r}")
    if default_max_tokens is not None and default_max_tokens < 1:
        raise LemmaError(f"--default-max-tokens must be >= 1, got {default_max_tokens}")
    if not 0 < port < 65536:
        raise LemmaError(f"--port must be in 1..65535, got {port}")
    import uvicorn

    from lemma.engine.async_engine import AsyncEngine
    from lemma.engine.policies import policy_from_spec
    from lemma.engine.runner import MAX_POLICY_STATES
    from lemma.server.app import build_app

    served_policy = _policy(policy, budget, pin_prompt, dense_layers)
    warm = [policy_from_spec(spec) for spec in warm_policy or []]  # read exactly as a request's kv_policy is
    distinct = len(set(warm) | {served_policy})
    if distinct > MAX_POLICY_STATES:
        raise LemmaError(f"--warm-policy: at most {MAX_POLICY_STATES} policies in all stay warm, got {distinct}")
    engine = _engine(model, device, dtype, policy=served_policy, compile=compile,
                     max_batch=max_batch, kv_cache_tokens=kv_cache_tokens, prefill_chunk=prefill_chunk, tensor_parallel=tp,
                     quantize=quantize, prefix_cache=prefix_cache)
    if warm and not engine.compile:
        typer.echo("(--warm-policy: nothing to warm, the decode step is not compiled)", err=True)
    if warm and engine.compile:  # requests under different policies share a step: their mixes compile too
        seconds = engine.warm_up(policies=[engine.policy, *warm])
        typer.echo(f"(decode steps of {', '.join(p.describe() for p in warm)} and their mixes ready in {seconds:.1f} s)", err=True)
    name = served_name or engine.model_dir.name
    app = build_app(AsyncEngine(engine), name, api_key, {"auto": None, "think": True, "none": False}[reasoning],
                    default_max_tokens)
    if host not in LOOPBACK and api_key is None:
        typer.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    typer.echo(f"lemma serve: {name}, {engine.policy.describe()}, KV pool {engine.pool.capacity_tokens} tokens, "
               f"on http://{host}:{port}/v1", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def register(app: typer.Typer) -> None:
    app.command()(friendly_errors(serve))
