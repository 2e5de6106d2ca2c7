"""One decoder for Llama, Mistral, Qwen2 (q/k/v bias) and Qwen3 (q/k norm).

The model knows nothing of caches or policies: each layer hands its post-RoPE q, k, v to the
attention `attend.layer(i)` it is given and gets the output back. No layer reads its own index, so
one compiled layer serves them all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lemma.models.config import ModelConfig
from lemma.models.linear import Linear, PackedLinear, pack_linears, packs, project
from lemma.models.shard import Shard


LayerAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""One layer's attention: q [N, Hq, D], k/v [N, Hkv, D] for the step's N tokens -> output [N, Hq, D]."""


class Attend(Protocol):
    def layer(self, index: int) -> LayerAttend:
        """The attention of layer `index` (asked once per layer, in order, per forward)."""
        ...


class ByLayer:
    """An `Attend` written as one method `__call__(layer, q, k, v)`."""

    def layer(self, index: int) -> LayerAttend:
        return partial(self, index)


def call_layer(layer: "DecoderLayer", x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               attend: LayerAttend) -> torch.Tensor:
    """How a forward runs each decoder layer unless told otherwise (a compiled twin of this can be given)."""
    return layer(x, cos, sin, attend)


def call_head(model: "CausalLM", x: torch.Tensor, float_logits: bool) -> torch.Tensor:
    """How a forward runs the final norm and output projection unless told otherwise."""
    return model.head(x, float_logits)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D]; cos/sin [N, D] (the two halves repeated, as transformers does)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard | None = None):
        super().__init__()
        self.shard = shard
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        if shard is not None:  # this rank's query heads and the KV heads they read
            self.num_heads, self.num_kv_heads = shard.size(self.num_heads), shard.size(self.num_kv_heads)
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=config.o_bias)
        self.qkv_proj: nn.Module | None = None  # q, k and v in one product, where the weights allow (fuse_projections)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: LayerAttend) -> torch.Tensor:
        n = x.shape[0]
        if self.qkv_proj is not None:
            kv = self.num_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.num_heads * self.head_dim, kv, kv], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(n, self.num_heads, self.head_dim)
        k = k.reshape(n, self.num_kv_heads, self.head_dim)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(q, k, v)
        out = self.o_proj(out.reshape(n, self.num_heads * self.head_dim))
        return out if self.shard is None else self.shard.all_reduce(out)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard | None = None):
        super().__init__()
        self.shard = shard
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        inter = inter if shard is None else shard.size(inter)
        self.gate_proj = Linear(hidden, inter, bias=bias)
        self.up_proj = Linear(hidden, inter, bias=bias)
        self.down_proj = Linear(inter, hidden, bias=bias)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one product (fuse_projections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        out = self.down_proj(F.silu(gate) * up)
        return out if self.shard is None else self.shard.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard | None = None):
        super().__init__()
        self.self_attn = Attention(config, shard)
        self.mlp = MLP(config, shard)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: LayerAttend) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard | None = None):
        super().__init__()
        vocab = config.vocab_size if shard is None else shard.size(config.vocab_size)
        self.embed_tokens = nn.Embedding(vocab, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, shard) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """Parameter names match Hugging Face checkpoints (model.layers.N.self_attn.q_proj.weight, ...).
    With a Shard, the module holds one tensor-parallel rank's slices (see models/shard.py)."""

    def __init__(self, config: ModelConfig, shard: Shard | None = None):
        super().__init__()
        self.config, self.shard = config, shard
        self.model = Backbone(config, shard)
        vocab = config.vocab_size if shard is None else shard.size(config.vocab_size)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, vocab, bias=False)
        self.tied_head: nn.Module | None = None  # a packed copy of the tied embedding (see pack_weights)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def pack_weights(self) -> int:
        """Where it pays (bf16 on CPU, models/linear.py), reorder every linear weight once for oneDNN, the
        tied output head included (as a packed copy beside the embedding); returns how many were packed."""
        weight = self.model.embed_tokens.weight
        if not packs(weight.device, weight.dtype):
            return 0
        count = pack_linears(self)
        if self.lm_head is None and self.tied_head is None:
            self.tied_head = PackedLinear(self.model.embed_tokens.weight, None)
            count += 1
        return count

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.shard is None:
            return self.model.embed_tokens(input_ids)
        start, stop = self.shard.part(self.config.vocab_size)  # this rank's rows; the others add theirs
        mine = (input_ids >= start) & (input_ids < stop)
        x = self.model.embed_tokens(torch.where(mine, input_ids - start, 0)) * mine[:, None]
        return self.shard.all_reduce(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attend: Attend,
        logits_at: torch.Tensor | None = None,
        float_logits: bool = True,
        run_layer: Callable[..., torch.Tensor] = call_layer,
        run_head: Callable[..., torch.Tensor] = call_head,
    ) -> torch.Tensor:
        """input_ids/positions [N] -> logits [M, V] for the rows `logits_at` (default: all), in fp32 (or,
        float_logits=False, in the model's dtype: a caller scoring many rows upcasts them a few at a time).
        Each decoder layer runs as run_layer(layer, x, cos, sin, attend.layer(i)), the head as
        run_head(model, x, float_logits) (a compiled step passes compiled twins of both)."""
        x = self.embed(input_ids)
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = run_layer(layer, x, cos, sin, attend.layer(i))
        if logits_at is not None:
            x = x[logits_at]
        logits = run_head(self, x, float_logits)
        return logits if self.shard is None else self.shard.gather(logits, self.config.vocab_size)

    def head(self, x: torch.Tensor, float_logits: bool = True) -> torch.Tensor:
        """The final norm and the output projection: hidden states [M, D] -> logits [M, V]."""
        x = self.model.norm(x)
        head = self.lm_head if self.lm_head is not None else self.tied_head
        logits = head(x) if head is not None else project(x, self.model.embed_tokens.weight, None)
        return logits.float() if float_logits else logits
