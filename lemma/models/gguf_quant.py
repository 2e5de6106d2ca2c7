"""GGUF blocks repacked into lemma's quantized layouts (models/quantized.py) without a round trip through
float: every format below is exact (the dequantized weight equals the gguf package's dequantization, up
to the last bit of a float32 multiply-add):

    Q8_0   int8, group 32, fp16 scales (d)                      as stored
    Q5_0   int8, group 32, fp16 scales: the 5-bit q - 16         exact, 8 bits for 5.5 (no 5-bit kernel)
    Q4_0   int4, group 32, fp16 scale d and offset -8 d          as stored
    Q4_1   int4, group 32, fp16 scale d and offset m             as stored
    Q4_K   int4, group 32, fp32 scale d * sc and offset -dmin * m (the 6-bit sub-block scales applied once)

Other types (Q6_K, Q5_1, Q2_K..Q5_K, IQ*) are dequantized to float as before; --quantize then quantizes
them at load.
"""

from __future__ import annotations

import numpy as np
import torch

from lemma.kernels.quant import pack_int4

KEPT = ("Q8_0", "Q5_0", "Q4_0", "Q4_1", "Q4_K")


def _blocks(data: np.ndarray, rows: int, block_bytes: int) -> np.ndarray:
    return np.ascontiguousarray(data).view(np.uint8).reshape(rows, -1, block_bytes)


def _halves(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] values: the low nibbles, then the high ones (GGUF's Q4_0 order)."""
    return np.concatenate((qs & 0x0F, qs >> 4), axis=-1)


def repack(qtype: str, data: np.ndarray, rows: int, cols: int) -> dict[str, torch.Tensor] | None:
    """The tensors of one weight [rows, cols] in type `qtype` as {"qweight", "scales"[, "offsets"]}, or None
    when the type is not kept quantized."""
    if qtype == "Q8_0":
        b = _blocks(data, rows, 34)
        d = b[..., :2].copy().view(np.float16)[..., 0]
        q = b[..., 2:].copy().view(np.int8).reshape(rows, cols)
        return {"qweight": torch.from_numpy(q), "scales": torch.from_numpy(d.copy())}
    if qtype == "Q5_0":
        b = _blocks(data, rows, 22)
        d = b[..., :2].copy().view(np.float16)[..., 0]
        high = b[..., 2:6].copy().view(np.uint32)  # [rows, blocks, 1]: bit j is value j's fifth bit
        bits = ((high >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        q = (_halves(b[..., 6:]) | (bits << 4)).astype(np.int8) - np.int8(16)
        return {"qweight": torch.from_numpy(q.reshape(rows, cols)), "scales": torch.from_numpy(d.copy())}
    if qtype in ("Q4_0", "Q4_1"):
        size = 18 if qtype == "Q4_0" else 20
        b = _blocks(data, rows, size)
        d = b[..., :2].copy().view(np.float16)[..., 0]
        m = -8 * d if qtype == "Q4_0" else b[..., 2:4].copy().view(np.float16)[..., 0]
        packed = np.ascontiguousarray(b[..., size - 16:]).reshape(rows, cols // 2)  # already lemma's order
        return {"qweight": torch.from_numpy(packed), "scales": torch.from_numpy(d.copy()),
                "offsets": torch.from_numpy(m.astype(np.float16))}
    if qtype == "Q4_K":
        from gguf.quants import Q4_K

        b = _blocks(data, rows, 144)
        d = b[..., 0:2].copy().view(np.float16).astype(np.float32)  # [rows, supers, 1]
        dmin = b[..., 2:4].copy().view(np.float16).astype(np.float32)
        sc, mins = Q4_K.get_scale_min(b[..., 4:16].reshape(-1, 12).copy())
        sc = sc.reshape(rows, -1, 8).astype(np.float32)
        mins = mins.reshape(rows, -1, 8).astype(np.float32)
        # qs: per 64 values, 32 bytes: low nibbles are values 0..31, high nibbles 32..63
        qs = b[..., 16:].reshape(rows, -1, 4, 1, 32)
        values = np.concatenate((qs & 0x0F, qs >> 4), axis=-2).reshape(rows, cols)
        packed = pack_int4(torch.from_numpy(values.astype(np.uint8)), 32)
        return {"qweight": packed, "scales": torch.from_numpy((d * sc).reshape(rows, -1)),
                "offsets": torch.from_numpy((-(dmin * mins)).reshape(rows, -1))}
    return None
