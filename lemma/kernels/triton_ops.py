"""The Triton kernels as torch custom ops (lemma::store_decode, lemma::page_scores,
lemma::paged_decode_attention), so torch.compile traces a decode step that calls them as single
opaque ops (with their mutations declared) instead of breaking the graph, and a CUDA graph captures
their launches. Same contracts as the torch twins in reference.py."""

from __future__ import annotations

import torch

from lemma.kernels import attention, scores, store


@torch.library.custom_op("lemma::store_decode", mutates_args=("k_cache", "v_cache", "key_max", "key_min", "fill"))
def _store_decode(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  page_ids: torch.Tensor, offsets: torch.Tensor, key_max: torch.Tensor, key_min: torch.Tensor,
                  fill: torch.Tensor, bounds: bool) -> None:
    store.store_decode(k_cache, v_cache, k, v, page_ids, offsets, key_max if bounds else None,
                       key_min if bounds else None, fill)


@_store_decode.register_fake
def _(k_cache, v_cache, k, v, page_ids, offsets, key_max, key_min, fill, bounds) -> None:
    return None


def store_decode(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 page_ids: torch.Tensor, offsets: torch.Tensor, key_max: torch.Tensor | None,
                 key_min: torch.Tensor | None, fill: torch.Tensor) -> None:
    bounds = key_max is not None
    if not bounds:  # not read by the kernel; the op's schema wants tensors
        key_max = key_min = torch.empty(1, 1, 1, dtype=torch.float32, device=k.device)
    _store_decode(k_cache, v_cache, k, v, page_ids, offsets, key_max, key_min, fill, bounds)


@torch.library.custom_op("lemma::page_scores", mutates_args=())
def page_scores(q: torch.Tensor, key_max: torch.Tensor, key_min: torch.Tensor, page_ids: torch.Tensor) -> torch.Tensor:
    return scores.page_scores(q, key_max, key_min, page_ids)


@page_scores.register_fake
def _(q, key_max, key_min, page_ids):
    return torch.empty(page_ids.shape, dtype=torch.float32, device=q.device)


@torch.library.custom_op("lemma::paged_decode_attention", mutates_args=())
def _paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_ids: torch.Tensor,
                            fill: torch.Tensor, scale: float, return_mass: bool,
                            listed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    result = attention.paged_decode_attention(q, k_cache, v_cache, page_ids, fill, scale, return_mass=return_mass,
                                              listed=listed)
    if return_mass:
        return result
    return result, torch.empty(0, dtype=torch.float32, device=q.device)


@_paged_decode_attention.register_fake
def _(q, k_cache, v_cache, page_ids, fill, scale, return_mass, listed):
    mass = torch.empty(page_ids.shape if return_mass else (0,), dtype=torch.float32, device=q.device)
    return torch.empty_like(q), mass


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_ids: torch.Tensor,
                           fill: torch.Tensor, scale: float, return_mass: bool = False,
                           listed: torch.Tensor | None = None):
    out, mass = _paged_decode_attention(q, k_cache, v_cache, page_ids, fill, scale, return_mass, listed)
    return (out, mass) if return_mass else out
