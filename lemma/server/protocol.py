"""The OpenAI-compatible request bodies the server accepts, as pydantic models, and what it answers.

Unknown fields are ignored (clients send many); fields lemma cannot honour (logprobs, echo, best_of > 1,
tools) are rejected with a 400 that names them rather than silently dropped.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, model_validator

from lemma.engine.sampler import INT64_MAX, REPETITION_PENALTY, SamplingParams
from lemma.engine.sequence import Stats

MAX_CHOICES = 16
# JSON numbers as they are: true, "1" and 1.0 are no integer, true and "0.5" no number, NaN and Infinity
# neither; every bound is the sampler's real limit (engine/sampler.py), so nothing out of range gets a step.
Number = Annotated[float, Strict(), AllowInfNan(False)]
TokenId = Annotated[int, Strict(), Field(ge=0, le=INT64_MAX)]


class APIError(Exception):
    """Answered as {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: StrictInt | None = Field(None, ge=1, le=INT64_MAX)
    temperature: Number = Field(1.0, ge=0, le=2)  # OpenAI's range, inside SamplingParams'
    top_p: Number = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=-1, le=INT64_MAX)  # -1 or 0: off; more than the vocabulary keeps every token
    min_p: Number = Field(0.0, ge=0, le=1)
    presence_penalty: Number = Field(0.0, ge=-2, le=2)
    frequency_penalty: Number = Field(0.0, ge=-2, le=2)
    repetition_penalty: Number = Field(1.0, ge=REPETITION_PENALTY[0], le=REPETITION_PENALTY[1])
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**64 - 1)  # choice i samples with seed + i (wrapped)
    n: StrictInt = Field(1, ge=1, le=MAX_CHOICES)  # choices, sharing the prompt's pages
    logprobs: Any = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False  # lemma/vLLM extra: generate all max_tokens
    kv_policy: dict[str, Any] | str | None = None  # lemma extra: {"name": "raas", "budget": 512, ...} or "raas:budget=512"
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    response_format: Any = None

    @model_validator(mode="after")
    def _supported(self) -> "GenerationRequest":
        if self.logprobs:
            raise ValueError("logprobs: not supported")
        for name in ("tools", "tool_choice", "functions"):
            if getattr(self, name):
                raise ValueError(f"{name}: tool calling is not supported")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError("response_format: only {'type': 'text'} is supported")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, max_tokens: int, choice: int = 0) -> SamplingParams:
        """Choice `choice`'s sampling: with a seed, seed + choice, so n choices differ and repeat."""
        seed = None if self.seed is None else (self.seed + choice + 2**63) % 2**64 - 2**63  # stays in 64 bits
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=max(self.top_k, 0), min_p=self.min_p, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                              seed=seed, stop=stop, ignore_eos=self.ignore_eos)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None  # given back by clients; not rendered

    def as_template_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=INT64_MAX)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationRequest):
    prompt: str | list[TokenId] | list[str]
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _single_prompt(self) -> "CompletionRequest":
        if self.echo:
            raise ValueError("echo: not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: only 1 is supported")
        if self.suffix:
            raise ValueError("suffix: not supported")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise ValueError("prompt: one prompt per request (send one request per prompt)")
            self.prompt = self.prompt[0]
        if not self.prompt:
            raise ValueError("prompt: must not be empty")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


def usage(prompt_tokens: int, completion_tokens: int, stats: list[Stats] = ()) -> dict[str, Any]:
    """OpenAI's usage object; prompt tokens read from the prefix cache are its cached_tokens (with n
    choices, what the first found: the others read the prompt it wrote)."""
    cached = min((s.cached_tokens for s in stats), default=0)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}


def lemma_stats(stats: Stats | None) -> dict[str, Any] | None:
    """lemma's per-request stats, as the `lemma` field of a response."""
    if stats is None:
        return None
    fields = ("policy", "cached_tokens", "peak_kv_bytes", "peak_kv_pages", "pages_evicted", "preemptions", "ttft_seconds",
              "prefill_seconds", "decode_seconds", "jct_seconds")
    return {name: getattr(stats, name) for name in fields}


def now() -> int:
    return int(time.time())
