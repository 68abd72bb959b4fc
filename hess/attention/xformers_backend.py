"""``xformers`` backend (CUDA only): variable-length block-diagonal attention over gathered keys.

Each query-block row (b, h, r) becomes one packed "sequence": its ≤ q_block patch queries against
its own keys, the S·n_s special keys followed by the patch tokens of its kept blocks (gathered
row by row from the ``k_table`` of :class:`BlockTokens`).  All rows of
all heads are packed into one ``[1, Σ, 1, D]`` call of ``xformers.ops.memory_efficient_attention``
with a ``BlockDiagonalMask`` built from the per-row query/key lengths, so ragged per-head budgets
need no padding.  xformers has no CPU operator (``ecosystem.md`` §4): on CPU this backend raises,
and ``auto`` never picks it there.  ``xformers`` is imported lazily.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from .core import BACKENDS, attend_with_specials
from .layout import BlockTokens
from .selection import BlockSelection


def pack_rows(tokens: BlockTokens, sel: BlockSelection):
    """Pack every query-block row with exactly its keys.

    Args:
        tokens: q, k, v [B, H, N, D] and their block tables.
    Returns:
        q [Σq, D], k [Σk, D], v [Σk, D], q_seqlens, kv_seqlens (lists of ints, one per row,
        rows ordered (b, h, r)).
    """
    lay = sel.layout
    B, H, _, D = tokens.q.shape
    KB, n_q, width = lay.k_block, lay.n_q, (lay.n_sink + lay.n_k) * lay.k_block
    R, start = B * H * n_q, lay.n_sink * KB
    keep = sel.block_mask.new_zeros(R, width)  # [R, table rows]: which key rows each row attends
    keep[:, lay.front : start] = True
    keep[:, start:] = sel.block_mask.reshape(R, lay.n_k).repeat_interleave(KB, dim=1)
    keep[:, start + lay.num_patch :] = False
    rows, cols = keep.nonzero(as_tuple=True)  # row-major, so packed keys follow the row order
    flat = rows // n_q * width + cols  # index into the flattened (b, h) tables
    q_lens = [lay.q_block] * (n_q - 1) + [lay.num_patch - (n_q - 1) * lay.q_block]
    return (tokens.q_patch.reshape(B * H * lay.num_patch, D),
            tokens.k_table.reshape(B * H * width, D).index_select(0, flat),
            tokens.v_table.reshape(B * H * width, D).index_select(0, flat),
            q_lens * (B * H), keep.sum(1).tolist())


def _xformers_patch(tokens: BlockTokens, sel: BlockSelection) -> Tensor:
    if tokens.q.device.type != "cuda":
        raise RuntimeError(
            f"backend 'xformers' needs CUDA tensors (xformers has no CPU attention operator), got device "
            f"{tokens.q.device}; use backend='gather' or 'flex' on CPU"
        )
    logging.getLogger("xformers").setLevel(logging.ERROR)
    try:
        import xformers.ops as xops
        from xformers.ops import fmha
    except ImportError as err:
        raise RuntimeError("backend 'xformers' needs the xformers package (pip install xformers)") from err
    B, H, _, D = tokens.q.shape
    q, k, v, q_lens, kv_lens = pack_rows(tokens, sel)
    bias = fmha.BlockDiagonalMask.from_seqlens(q_seqlen=q_lens, kv_seqlen=kv_lens)
    out = xops.memory_efficient_attention(q[None, :, None], k[None, :, None], v[None, :, None],
                                          attn_bias=bias, scale=1.0 / math.sqrt(D))  # BMHK, H = 1
    return out.view(B, H, sel.layout.num_patch, D)


@BACKENDS.register("xformers")
def xformers_backend(tokens: BlockTokens, selection: BlockSelection) -> Tensor:
    """xformers memory-efficient attention with a variable-length block-diagonal bias (CUDA only).

    Args:
        tokens: q, k, v [B, H, N, D] on CUDA.
    Returns:
        [B, H, N, D].
    """
    return attend_with_specials(tokens, selection, _xformers_patch)
