"""KV policies as tensor operations over per-slot page metadata. They know nothing of models or of
the pool's layout: the runner gathers each sequence's slots into [B, Hkv, S] tensors and applies
what the policy returns.

RaaS (arXiv 2502.11147): prompt pages pinned; the top half of the retained pages by Quest's bound get
the current step as timestamp; when a page fills at the budget, the oldest-timestamp unpinned page
is evicted and its slot takes the new tokens. Baselines at the same page granularity: StreamingLLM
(sink page + most recent), H2O (half heaviest accumulated attention mass, half most recent), Quest
(no eviction; attend the top budget/16 pages by the bound), Dense.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from lemma.engine.pool import PAGE_SIZE, SlotMeta
from lemma.errors import LemmaError

NEVER = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class Policy:
    budget: int | None = None  # tokens, prompt included; a multiple of the page size
    dense_layers: int = 0  # the first layers keep every page (Quest and RaaS's efficiency code use 2)

    name: ClassVar[str] = "policy"
    evicts: ClassVar[bool] = False  # holds at most budget/16 pages per layer and KV head
    needs_bound: ClassVar[bool] = False  # wants Quest's page bound each step
    needs_mass: ClassVar[bool] = False  # wants the step's per-page attention mass

    def __post_init__(self) -> None:
        if self.budget is not None:
            if not isinstance(self.budget, int) or self.budget < 2 * PAGE_SIZE:
                raise LemmaError(f"{self.name} budget must be at least 2 pages ({2 * PAGE_SIZE} tokens), got {self.budget!r}")
            if self.budget % PAGE_SIZE:
                lower = self.budget // PAGE_SIZE * PAGE_SIZE
                raise LemmaError(f"{self.name} budget must be a multiple of the page size {PAGE_SIZE}, got {self.budget} "
                                 f"(use {lower} or {lower + PAGE_SIZE})")
        if self.budget is not None and isinstance(self.budget, bool):
            raise LemmaError(f"{self.name} budget must be a number of tokens, got {self.budget!r}")
        if isinstance(self.dense_layers, bool) or not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise LemmaError(f"dense_layers must be an integer >= 0, got {self.dense_layers!r}")

    @property
    def budget_pages(self) -> int:
        return (self.budget or 0) // PAGE_SIZE

    def describe(self) -> str:
        """name-budget, with any option not at its default: raas-256(dense_layers=2)."""
        base = self.name if self.budget is None else f"{self.name}-{self.budget}"
        options = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                   if f.name != "budget" and getattr(self, f.name) != f.default]
        return f"{base}({','.join(options)})" if options else base

    def sparse(self, layer: int) -> bool:
        return self.budget is not None and layer >= self.dense_layers

    @property
    def least_slots(self) -> int:
        """The narrowest page table a decode step under this policy gets: its budget in pages where it has
        one, so the budget-sized choices it makes (top-k, victims) see the same width from the first
        step; never wider than the step's sequences can hold (runner.prepare), so a huge budget costs a
        short request nothing."""
        return self.budget_pages

    def capacity(self, prompt_len: int, max_tokens: int, layer: int) -> int:
        """Most pages this request holds in `layer` once past prefill."""
        whole = -(-(prompt_len + max_tokens) // PAGE_SIZE)
        return min(whole, self.budget_pages) if self.evicts and self.sparse(layer) else whole

    def check_prompt(self, prompt_len: int, max_tokens: int) -> None:
        """Raise when a prompt cannot be served under this policy."""

    def dense_prefix(self, prompt_len: int) -> int:
        """Positions before which this policy attends every token Dense attends (so its logits there are
        Dense's): an evicting policy until its first eviction (a prompt longer than that was cut at
        prefill and no chunk comes before it); a selecting one, conservatively, nowhere (Quest says
        otherwise)."""
        return self.budget_pages * PAGE_SIZE if self.evicts else 0

    def pinned_prompt_pages(self, prompt_pages: int) -> int:
        """How many of a prompt's pages are pinned (never evicted): 0 here. When fewer than all, the
        first page (the attention sink) and the last ones (the question, the turn's opening) are."""
        return 0

    def victim(self, meta: SlotMeta, new_page: torch.Tensor) -> torch.Tensor:
        """[B, Hkv] slot whose page gives way to logical page new_page [B] (evicting policies only)."""
        raise NotImplementedError

    def select(self, bound: torch.Tensor, meta: SlotMeta, write_slot: torch.Tensor) -> torch.Tensor | None:
        """[B, Hkv, K] slots to attend, or None for every retained page."""
        return None

    def update(self, meta: SlotMeta, bound: torch.Tensor | None, step_mass: torch.Tensor | None,
               position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New (stamp, mass) [B, Hkv, S] after the step's attention."""
        return meta.stamp, meta.mass


@dataclass(frozen=True)
class Dense(Policy):
    name: ClassVar[str] = "dense"

    def __post_init__(self) -> None:
        if self.budget is not None:
            raise LemmaError("dense keeps every page and takes no budget")
        super().__post_init__()

    def dense_prefix(self, prompt_len: int) -> int:
        return NEVER


def _argmin_key(key: torch.Tensor) -> torch.Tensor:
    return key.argmin(dim=-1)


def _check_pinned_prompt(policy: Policy, prompt_len: int, max_tokens: int) -> None:
    """A pinned prompt must leave at least one page of the budget for the pages that get evicted."""
    prompt_pages = -(-prompt_len // PAGE_SIZE)
    needs_eviction = -(-(prompt_len + max_tokens) // PAGE_SIZE) > policy.budget_pages
    if needs_eviction and policy.pinned_prompt_pages(prompt_pages) >= policy.budget_pages:
        raise LemmaError(
            f"prompt of {prompt_len} tokens ({prompt_pages} pages) does not fit the {policy.name} budget of "
            f"{policy.budget} tokens with the prompt pinned; use a budget of at least {(prompt_pages + 1) * PAGE_SIZE} "
            f"or pin_prompt=False (--no-pin-prompt)")


@dataclass(frozen=True)
class RaaS(Policy):
    budget: int | None = 1024
    pin_prompt: bool = True
    refresh: str = "bound"  # "bound": top half by Quest's bound; "mass": step mass above refresh_threshold;
    # "ema": no timestamps: each page keeps a decayed sum of its attention mass, the lowest is evicted
    refresh_threshold: float | None = None  # for refresh="mass"; default 1 / (retained pages)
    recent: int = 0  # pages: the most recent ones go last (the new page counts as one)
    decay: float = 0.95  # for refresh="ema": per-step decay of the mass sum
    pin_share: float = 1.0  # the pinned prompt takes at most this share of the budget (1: the whole prompt)

    name: ClassVar[str] = "raas"
    evicts: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is None:
            raise LemmaError("raas needs a budget in tokens")
        if isinstance(self.pin_share, bool) or not isinstance(self.pin_share, (int, float)) or not 0 < self.pin_share <= 1:
            raise LemmaError(f"raas pin_share must be a number in (0, 1], got {self.pin_share!r}")
        if self.refresh not in ("bound", "mass", "ema"):
            raise LemmaError(f"raas refresh must be 'bound', 'mass' or 'ema', got {self.refresh!r}")
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0 < self.decay <= 1:
            raise LemmaError(f"raas decay must be a number in (0, 1], got {self.decay!r}")
        if not isinstance(self.pin_prompt, bool):
            raise LemmaError(f"raas pin_prompt must be True or False, got {self.pin_prompt!r}")
        if isinstance(self.recent, bool) or not isinstance(self.recent, int) or self.recent < 0:
            raise LemmaError(f"raas recent must be a number of pages >= 0, got {self.recent!r}")
        threshold = self.refresh_threshold
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not 0 < threshold <= 1):
            raise LemmaError(f"raas refresh_threshold must be a number in (0, 1], got {threshold!r}")

    @property
    def needs_bound(self) -> bool:  # type: ignore[override]
        return self.refresh == "bound"

    @property
    def needs_mass(self) -> bool:  # type: ignore[override]
        return self.refresh in ("mass", "ema")

    def pinned_prompt_pages(self, prompt_pages: int) -> int:
        if not self.pin_prompt:
            return 0
        if self.pin_share >= 1:
            return prompt_pages
        return min(prompt_pages, max(1, int(self.budget_pages * self.pin_share)))

    def check_prompt(self, prompt_len: int, max_tokens: int) -> None:
        _check_pinned_prompt(self, prompt_len, max_tokens)

    def victim(self, meta: SlotMeta, new_page: torch.Tensor) -> torch.Tensor:
        # oldest timestamp first; among equal timestamps the oldest page
        recent = meta.born > new_page[:, None, None] - self.recent  # these go last, when nothing older is left
        if self.refresh == "ema":
            key = meta.mass + recent.float() * 1e30
            return key.masked_fill(~meta.valid | meta.pinned, float("inf")).argmin(dim=-1)
        key = meta.stamp * (1 << 24) + meta.born + recent.long() * (1 << 62)
        return _argmin_key(key.masked_fill(~meta.valid | meta.pinned, NEVER))

    def update(self, meta: SlotMeta, bound: torch.Tensor | None, step_mass: torch.Tensor | None,
               position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.refresh == "ema":
            return meta.stamp, torch.where(meta.valid, meta.mass * self.decay + step_mass, meta.mass)
        now = position[:, None, None].expand_as(meta.stamp)
        if self.refresh == "bound":
            top = min(max(self.budget_pages // 2, 1), bound.shape[-1])
            chosen = bound.topk(top, dim=-1).indices
            hit = torch.zeros_like(meta.valid).scatter_(-1, chosen, True) & meta.valid
        else:
            threshold = self.refresh_threshold
            if threshold is None:
                threshold = 1.0 / meta.valid.sum(-1, keepdim=True).clamp(min=1)
            hit = (step_mass > threshold) & meta.valid
        return torch.where(hit, now, meta.stamp), meta.mass


@dataclass(frozen=True)
class RaaSCapped(RaaS):
    """lemma's RaaS variant (chosen on GSM8K reasoning traces, DESIGN.md §10): the pinned prompt takes at
    most half the budget (its first page and its last pages), timestamps are refreshed by the exact
    attention mass (above a uniform share) instead of Quest's bound, and the two most recent pages go
    last. Same O(L) memory as RaaS."""

    refresh: str = "mass"
    recent: int = 2
    pin_share: float = 0.5

    name: ClassVar[str] = "raas-capped"


@dataclass(frozen=True)
class StreamingLLM(Policy):
    budget: int | None = 1024
    name: ClassVar[str] = "streaming"
    evicts: ClassVar[bool] = True

    def victim(self, meta: SlotMeta, new_page: torch.Tensor) -> torch.Tensor:
        sink = meta.born == 0
        return _argmin_key(meta.born.masked_fill(~meta.valid | sink, NEVER))


@dataclass(frozen=True)
class H2O(Policy):
    budget: int | None = 1024
    name: ClassVar[str] = "h2o"
    evicts: ClassVar[bool] = True
    needs_mass: ClassVar[bool] = True

    def victim(self, meta: SlotMeta, new_page: torch.Tensor) -> torch.Tensor:
        recent = self.budget_pages - self.budget_pages // 2  # the new page is one of them
        in_window = meta.born > (new_page[:, None, None] - recent)
        return meta.mass.masked_fill(~meta.valid | in_window, float("inf")).argmin(dim=-1)

    def update(self, meta: SlotMeta, bound: torch.Tensor | None, step_mass: torch.Tensor | None,
               position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return meta.stamp, torch.where(meta.valid, meta.mass + step_mass, meta.mass)


@dataclass(frozen=True)
class RandomEviction(Policy):
    """Evicts a uniformly random unpinned page (prompt pages pinned by default): the baseline that recent
    work finds as strong as scored evictors on reasoning. The draw is a hash of (page, new page, KV head,
    seed), so it needs no RNG state: replays, compiled steps and chunked replay draw the same pages."""

    budget: int | None = 1024
    pin_prompt: bool = True
    seed: int = 0

    name: ClassVar[str] = "random"
    evicts: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.pin_prompt, bool):
            raise LemmaError(f"random pin_prompt must be True or False, got {self.pin_prompt!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
            raise LemmaError(f"random seed must be an integer in [0, 2**31), got {self.seed!r}")

    def pinned_prompt_pages(self, prompt_pages: int) -> int:
        return prompt_pages if self.pin_prompt else 0

    def check_prompt(self, prompt_len: int, max_tokens: int) -> None:
        _check_pinned_prompt(self, prompt_len, max_tokens)

    def victim(self, meta: SlotMeta, new_page: torch.Tensor) -> torch.Tensor:
        heads = torch.arange(meta.born.shape[1], device=meta.born.device)[None, :, None]
        draw = _mix32(meta.born + _mix32(new_page[:, None, None] + _mix32(heads + _mix32(torch.full_like(heads, self.seed)))))
        return _argmin_key(draw.masked_fill(~meta.valid | meta.pinned, NEVER))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply, in int64 without overflow): a stateless uniform draw."""
    x = x & 0xFFFFFFFF
    for _ in range(2):
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (x >> 16) ^ x


@dataclass(frozen=True)
class Quest(Policy):
    budget: int | None = 1024
    name: ClassVar[str] = "quest"
    needs_bound: ClassVar[bool] = True

    def dense_prefix(self, prompt_len: int) -> int:
        return max(3, self.budget_pages) * PAGE_SIZE  # select keeps every page while it holds that many

    @property
    def least_slots(self) -> int:
        return max(3, self.budget_pages)

    def select(self, bound: torch.Tensor, meta: SlotMeta, write_slot: torch.Tensor) -> torch.Tensor:
        k = min(max(3, self.budget_pages), bound.shape[-1])
        forced = bound.scatter(-1, write_slot[..., None], float("inf"))  # the page being written
        return forced.topk(k, dim=-1).indices


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Dense, RaaS, RaaSCapped, StreamingLLM, H2O, Quest, RandomEviction)}


def check_policy(policy: object, what: str = "policy") -> None:
    """Raise unless `policy` is a lemma policy (the error names every policy class)."""
    if not isinstance(policy, Policy):
        raise LemmaError(f"{what} must be a lemma policy ({', '.join(p.__name__ for p in POLICIES.values())}), "
                         f"got {policy!r}")


def policy_key(name: object) -> str:
    """The POLICIES key of a policy name (any case; 'streamingllm' for 'streaming'), or one clear error."""
    if not isinstance(name, str):
        raise LemmaError(f"policy name must be a string, got {name!r}")
    key = name.strip().lower().replace("streamingllm", "streaming")
    if key not in POLICIES:
        raise LemmaError(f"unknown policy {name!r}; known: {policy_names()}")
    return key


def policy_options(name: str) -> list[str]:
    """The options (dataclass fields) a policy takes, budget first; generated from the class."""
    return [f.name for f in fields(POLICIES[name])]


def policy_names() -> str:
    """'dense, raas, ...': every policy lemma knows, for help texts and errors."""
    return ", ".join(POLICIES)


def policy_help() -> str:
    """Each policy with its options, for --help and error messages: 'raas (budget, dense_layers, ...)'."""
    return "; ".join(f"{name} ({', '.join(o for o in policy_options(name) if o != 'budget') or 'no options'})"
                     for name in POLICIES)


def parse_policy_spec(spec: str) -> tuple[str, dict[str, object]]:
    """'raas:dense_layers=2:refresh=mass' -> ('raas', {'dense_layers': 2, 'refresh': 'mass'}); values are
    integers, numbers, true/false or words. make_policy checks the name and the options."""
    if not isinstance(spec, str) or not spec.strip():
        raise LemmaError(f"a policy spec must be a name like 'raas' or 'raas:budget=512', got {spec!r}")
    name, *parts = spec.strip().split(":")
    options: dict[str, object] = {}
    for part in parts:
        key, eq, text = part.partition("=")
        if not eq or not key.strip() or not text.strip():
            raise LemmaError(f"policy option {part!r} in {spec!r} must be written name=value")
        text = text.strip()
        value: object = {"true": True, "false": False}.get(text.lower(), text)
        if value is text:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    continue
        options[key.strip()] = value
    return name.strip().lower(), options


def policy_from_spec(spec: "str | dict | Policy", budget: int | None = None,
                     defaults: dict[str, object] | None = None) -> Policy:
    """The one way text or JSON becomes a policy (CLI, server, eval): 'raas', 'raas:budget=512:refresh=mass',
    or {"name": "raas", "budget": 512, "refresh": "mass"}. `budget` is the budget when the spec gives none
    (Dense takes none); `defaults` are options (e.g. a CLI's --pin-prompt) applied where the policy has
    them and the spec does not set them."""
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, dict):
        options = dict(spec)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise LemmaError(f"a policy needs a name ({policy_names()}), got {name!r}")
    else:
        name, options = parse_policy_spec(spec)
    name = policy_key(name)
    known = policy_options(name)
    for key, value in (defaults or {}).items():
        if key in known:
            options.setdefault(key, value)
    given = options.pop("budget", None)
    if name == "dense":
        return make_policy(name, given, **options)
    return make_policy(name, budget if given is None else given, **options)


def make_policy(name: str, budget: int | None = None, **options) -> Policy:
    """A policy by name (any of POLICIES) with its budget and options; see policy_from_spec for text/JSON."""
    key = policy_key(name)
    known = policy_options(key)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise LemmaError(f"{key} has no option {unknown[0]!r}; its options: {', '.join(sorted(known))}")
    if key == "dense":
        return Dense(budget=budget, **options)
    return POLICIES[key](budget=budget if budget is not None else 1024, **options)
