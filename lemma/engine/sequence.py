"""Per-request state and what a request gives back."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from lemma.engine.recording import Recording
from lemma.engine.sampler import SamplingParams
from lemma.models.tokenizer import StreamingDetokenizer


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    jct_seconds: float = 0.0  # job completion time: submission to finish
    ttft_seconds: float = 0.0  # submission to the first generated token
    cached_tokens: int = 0  # prompt tokens read from the prefix cache instead of prefilled
    preemptions: int = 0  # times its pages were taken back and its tokens recomputed later
    peak_kv_pages: int = 0  # most pages held in any one layer
    peak_kv_bytes: int = 0  # K and V bytes held, all layers
    pages_evicted: int = 0  # pages evicted per layer and KV head
    policy: str = "dense"

    @property
    def decode_tokens_per_second(self) -> float:
        # the first token comes from prefill; the rest from decode steps
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {**self.__dict__, "decode_tokens_per_second": self.decode_tokens_per_second}


@dataclass
class Output:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string), "length" (max_tokens) or "error"
    stats: Stats
    prompt_token_ids: list[int] = field(default_factory=list)
    error: str | None = None


@dataclass
class Failed:
    """No token for a request this step, and why: that request fails, the others in the step go on."""

    reason: str

    @classmethod
    def non_finite(cls, position: int) -> "Failed":
        return cls(f"the model produced non-finite logits (NaN or inf) at position {position}; its weights may be broken")


@dataclass
class RequestOutput:
    """What one engine step gave one request: its new tokens and their releasable text. The last
    output of a request carries finish_reason ("stop", "length", "abort" or "error") and stats."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stats: Stats | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Forced:
    """A teacher-forced replay: per target token, its log-probability and the model's top-1 token."""

    logprobs: list[float]
    predicted: list[int]
    stats: Stats
    error: str | None = None
    recording: Recording | None = None  # teacher_force(record_until=...): the Recording a policy replay can share
    shared_tokens: int = 0  # targets scored from a shared Dense prefix instead of by the model


@dataclass
class Forcing:
    """A teacher-forced request's replay state (engine/forcing.py): the tokens it emits instead of
    sampling, and what the model gave them."""

    targets: list[int]
    chunked: bool = True  # a page of targets per forward (engine/replay.py), else one decode step each
    recording: Recording | None = None  # under Dense: the Recording it fills (engine/recording.py)
    shared_prefix: Recording | None = None  # a Dense Recording of the same tokens it replays from
    shared_tokens: int = 0  # targets it took from shared_prefix
    logprobs: list[float] = field(default_factory=list)  # per target: its log-probability
    predicted: list[int] = field(default_factory=list)  # per target: the model's argmax


@dataclass
class Chunk:
    """One streamed piece of a reply; the last chunk carries the finish reason and stats."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stats: Stats | None = None

    def __str__(self) -> str:
        return self.text


WAITING, PREFILL, DECODE, FINISHED = "waiting", "prefill", "decode", "finished"


class Sequence:
    _uids = itertools.count()

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 detokenizer: StreamingDetokenizer, eos_ids: list[int], policy: Any = None):
        self.uid = next(Sequence._uids)  # unique for the process: names the sequence's batch row
        self.request_id = request_id
        self.policy = policy  # its KV policy (the engine's when the request named none)
        self.status = WAITING
        self.prefilled = 0  # tokens of prompt (+ output, after a preemption) already in the pool
        self.forcing: Forcing | None = None  # teacher forcing (engine/forcing.py)
        self.prompt_ids = prompt_ids
        self.params = params
        self.seed = 0  # the sampling seed: params.seed, or drawn when the request is added
        self.detok = detokenizer
        self.eos_ids = set() if params.ignore_eos else set(eos_ids)
        self.output_ids: list[int] = []
        self.pages: list[list[int]] = []  # per layer, the page ids this sequence holds (its slots)
        self.capacity: list[int] = []  # per layer, the most pages it may hold past prefill
        self.reserved: list[int] = []  # per layer, pages reserved at admission and not taken yet
        self.uses_prefix_cache = True  # reads and fills the prefix cache (not teacher forcing, engine/pages.py)
        self.opening = None  # this step's PageOpen (engine/pages.py) where its position starts a page
        self.page_keys: list[bytes] = []  # prefix-cache keys of its full pages (engine/pages.py)
        self.page_keys_for = -1  # the token count they were computed for
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.text = ""  # text released so far (stop strings never appear in it)
        self.pending = ""  # detokenized text held back because it may start a stop string
        self.stats = Stats(prompt_tokens=len(prompt_ids))
        self.started = time.perf_counter()

    def new_uid(self) -> None:
        """A new identity for the decode state's batch rows (after a preemption)."""
        self.uid = next(Sequence._uids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def grows(self) -> bool:
        """Takes pages on demand (and may be preempted), rather than reserving its budget up front."""
        return not self.policy.evicts

    @property
    def forced(self) -> list[int] | None:
        """The tokens a teacher-forced request emits, or None."""
        return None if self.forcing is None else self.forcing.targets

    @property
    def replays(self) -> bool:
        """Decodes by chunked replay of its forced tokens rather than one token per step."""
        return self.forcing is not None and self.forcing.chunked

    def replay_span(self, page_size: int) -> tuple[int, int]:
        """Positions [start, end) the next replay feeds: from the last token to the end of its page or
        of the forced tokens still to emit, whichever comes first."""
        start = self.num_tokens - 1
        return start, min((start // page_size + 1) * page_size, start + len(self.forced) - len(self.output_ids))

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def track_peak(self, layer_page_bytes: int) -> None:
        """Record the pages held now in the peak statistics."""
        held = sum(len(p) for p in self.pages)
        self.stats.peak_kv_pages = max(self.stats.peak_kv_pages, max((len(p) for p in self.pages), default=0))
        self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, held * layer_page_bytes)

    def append(self, token_id: int) -> str:
        """Record a sampled token; return the text that can be released now."""
        self.output_ids.append(token_id)
        self.stats.generated_tokens = len(self.output_ids)
        if token_id in self.eos_ids:
            self.finish_reason = "stop"
            return self._release(self.pending + self.detok.flush(), final=True)
        piece = self.detok.add(token_id)
        if len(self.output_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
            piece += self.detok.flush()
        return self._release(self.pending + piece, final=self.finish_reason is not None)

    def _release(self, text: str, final: bool) -> str:
        # Text that could begin a stop string is held back, so a match always lies inside `text`.
        stops = self.params.stop
        hits = [at for at in (text.find(stop) for stop in stops) if at >= 0]
        if hits:
            self.finish_reason, self.pending = "stop", ""
            self.text += text[: min(hits)]
            return text[: min(hits)]
        hold = 0 if final else max((suffix_overlap(text, stop) for stop in stops), default=0)
        released, self.pending = text[: len(text) - hold], text[len(text) - hold :]
        self.text += released
        return released


def suffix_overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0
