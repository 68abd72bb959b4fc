"""``xformers`` backend (CUDA): variable-length block-diagonal attention over gathered keys, in chunks.

The patch query rows of :class:`BlockTokens` (``q_rows``, ``[R, q_block, D]`` with ``R = B·H·n_q``) are
cut into *chunks* of consecutive (b, h, r) rows whose packed keys fit ``chunk_bytes``.  For one chunk,
each row becomes one packed "sequence": its ``q_block`` query rows (padding rows of a partial last block
included; their outputs are dropped) against its own keys, the S·n_s special keys followed by the valid
patch rows of its kept blocks in ascending order, gathered from the ``k_table``/``v_table``.  The chunk
is one ``xformers.ops.memory_efficient_attention`` call with a ``BlockDiagonalMask`` built from those
lengths, so ragged per-head budgets need no padding.

Memory: the index is built from the block lists (O(kept blocks) of the chunk, expanded to its keys) and
the packed K/V of one chunk at a time, so the extra memory is bounded by ``chunk_bytes`` (default
``CHUNK_BYTES``) whatever the sequence length; the earlier version packed every row at once:
O(rows × kept keys), ~40 GB of K alone at VGGT-1B, 100 frames, 25 % kept.  The copy *traffic* is still
O(rows × kept keys) (as in ``gather``): xformers' fMHA has no per-row block-sparse key lists
(``vggt-architecture.md`` §18), and its paged-KV masks need pages of ≥ 256 keys on the kernels that take
them, against our 64-key blocks.

The packing (:func:`row_chunks`, :func:`pack_chunk`) is separated from the kernel (``KERNELS``):
``"xformers"`` (CUDA only; xformers has no CPU operator, ``ecosystem.md`` §4) and ``"torch"``, dense
SDPA with the same block-diagonal mask (O(Σq·Σk) memory: tests only), so the layout is tested on CPU
against ``reference``.  ``xformers`` is imported lazily.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from hess.registry import Registry

from .core import BACKENDS, attend_with_specials
from .layout import BlockTokens
from .selection import BlockSelection

CHUNK_BYTES = 256 << 20  # packed K + V + key index of one call
# kernel(q [Σq, D], k [Σk, D], v [Σk, D], q_lens, kv_lens, scale) -> [Σq, D]
KERNELS: Registry[Callable[..., Tensor]] = Registry("xformers packed kernel")


@dataclass
class PackedChunk:
    """Rows ``[start, end)`` of the (b, h, r) query-block rows and their packed keys.

    Attributes:
        start, end: row range.
        key_index: [Σk] int64 rows of the flattened ``k_table`` [B·H·T·k_block, D], row by row.
        kv_lens: keys of every row (``S·n_s`` + its kept valid patch rows), ``end − start`` ints.
    """

    start: int
    end: int
    key_index: Tensor
    kv_lens: list[int]


def row_key_lengths(sel: BlockSelection) -> Tensor:
    """[R] int64 keys of every (b, h, r) row: special keys + valid patch rows of its kept blocks."""
    lay = sel.layout
    R, tail = sel.block_mask.numel() // lay.n_k, lay.n_k * lay.k_block - lay.num_patch
    n_sel = sel.kv_num_blocks.reshape(R).long()
    partial = sel.block_mask[..., -1].reshape(R).long() if tail else torch.zeros_like(n_sel)
    return lay.num_special_total + n_sel * lay.k_block - tail * partial


def row_chunks(lengths: Tensor, max_keys: int) -> list[tuple[int, int]]:
    """Consecutive row ranges whose key totals stay ≤ ``max_keys`` (a longer single row is a chunk alone)."""
    cum_t = torch.cumsum(lengths.cpu(), 0)
    cum = cum_t.tolist()
    out, start, done = [], 0, 0
    R = len(cum)
    while start < R:
        end = int(torch.searchsorted(cum_t, done + max_keys, right=True))
        end = max(end, start + 1)
        out.append((start, end))
        done, start = cum[end - 1], end
    return out


def pack_chunk(sel: BlockSelection, start: int, end: int) -> PackedChunk:
    """Key index of rows ``[start, end)``: per row its special keys, then its kept patch rows ascending."""
    lay = sel.layout
    KB, n_q, n_k, T = lay.k_block, lay.n_q, lay.n_k, lay.n_sink + lay.n_k
    dev, g, n_spec = sel.block_mask.device, end - start, lay.num_special_total
    rows = torch.arange(start, end, device=dev)
    base = rows // n_q * (T * KB)  # first k_table row of the row's (b, h)
    special = base[:, None] + lay.front + torch.arange(n_spec, device=dev)  # [g, S·n_s]
    r_i, blk = sel.block_mask.reshape(-1, n_k)[start:end].nonzero(as_tuple=True)  # ascending per row
    offs = torch.arange(KB, device=dev)
    patch_pos = blk[:, None] * KB + offs  # [pairs, KB] position among the patch rows
    patch = base[r_i][:, None] + lay.n_sink * KB + patch_pos
    valid = patch_pos < lay.num_patch  # the tail of a partial last block is padding
    owner = torch.cat([torch.arange(g, device=dev).repeat_interleave(n_spec), r_i[:, None].expand_as(patch)[valid]])
    index = torch.cat([special.reshape(-1), patch[valid]])
    index = index[torch.sort(owner, stable=True).indices]  # row by row, specials first
    lengths = torch.bincount(owner, minlength=g)
    return PackedChunk(start, end, index, lengths.tolist())


def iter_packed(sel: BlockSelection, head_dim: int, elem_size: int,
                chunk_bytes: Optional[int] = None) -> Iterator[PackedChunk]:
    """Every row in chunks of ≤ ``chunk_bytes`` packed K + V + index (module docstring)."""
    per_key = 2 * head_dim * elem_size + 8
    max_keys = max(1, (chunk_bytes or CHUNK_BYTES) // per_key)
    for start, end in row_chunks(row_key_lengths(sel), max_keys):
        yield pack_chunk(sel, start, end)


@KERNELS.register("torch")
def torch_kernel(q: Tensor, k: Tensor, v: Tensor, q_lens: list[int], kv_lens: list[int], scale: float) -> Tensor:
    """Dense SDPA with the block-diagonal mask of the packed rows (any device; O(Σq·Σk): tests only)."""
    dev = q.device
    q_seq = torch.repeat_interleave(torch.arange(len(q_lens), device=dev), torch.tensor(q_lens, device=dev))
    kv_seq = torch.repeat_interleave(torch.arange(len(kv_lens), device=dev), torch.tensor(kv_lens, device=dev))
    mask = q_seq[:, None] == kv_seq[None]
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale)[0]


def _import_xformers():
    logging.getLogger("xformers").setLevel(logging.ERROR)
    try:
        import xformers.ops as xops
        from xformers.ops import fmha
    except ImportError as err:
        raise RuntimeError("backend 'xformers' needs the xformers package (pip install xformers)") from err
    return xops, fmha


@KERNELS.register("xformers")
def xformers_kernel(q: Tensor, k: Tensor, v: Tensor, q_lens: list[int], kv_lens: list[int], scale: float) -> Tensor:
    """One ``memory_efficient_attention`` call over the packed rows (CUDA)."""
    if q.device.type != "cuda":
        raise RuntimeError(
            f"backend 'xformers' needs CUDA tensors (xformers has no CPU attention operator), got device "
            f"{q.device}; use backend='gather' or 'flex' on CPU"
        )
    xops, fmha = _import_xformers()
    bias = fmha.BlockDiagonalMask.from_seqlens(q_seqlen=q_lens, kv_seqlen=kv_lens)
    out = xops.memory_efficient_attention(q[None, :, None], k[None, :, None], v[None, :, None],
                                          attn_bias=bias, scale=scale)  # BMHK with H = 1
    return out[0, :, 0]


def xformers_patch_attention(tokens: BlockTokens, sel: BlockSelection, kernel: str = "xformers",
                             chunk_bytes: Optional[int] = None) -> Tensor:
    """Patch-query output [B, H, N_p, D], chunk by chunk (module docstring)."""
    fn = KERNELS.get(kernel)
    if kernel == "xformers" and tokens.q.device.type != "cuda":
        fn(tokens.q, tokens.k, tokens.v, [], [], 1.0)  # raises the clear CUDA error before any work
    lay = sel.layout
    B, H, _, D = tokens.q.shape
    QB = lay.q_block
    q_rows = tokens.q_rows.reshape(-1, QB, D)  # [R, QB, D]
    kt, vt = tokens.k_table.reshape(-1, D), tokens.v_table.reshape(-1, D)
    out = torch.empty_like(q_rows)
    for chunk in iter_packed(sel, D, tokens.q.element_size(), chunk_bytes):
        g = chunk.end - chunk.start
        res = fn(q_rows[chunk.start : chunk.end].reshape(g * QB, D), kt.index_select(0, chunk.key_index),
                 vt.index_select(0, chunk.key_index), [QB] * g, chunk.kv_lens, 1.0 / math.sqrt(D))
        out[chunk.start : chunk.end] = res.view(g, QB, D)
    return out.view(B, H, lay.n_q * QB, D)[:, :, : lay.num_patch]


@BACKENDS.register("xformers")
def xformers_backend(tokens: BlockTokens, selection: BlockSelection) -> Tensor:
    """xformers memory-efficient attention with a variable-length block-diagonal bias, chunked (CUDA only).

    Args:
        tokens: q, k, v [B, H, N, D] on CUDA.
    Returns:
        [B, H, N, D].
    """
    return attend_with_specials(tokens, selection, xformers_patch_attention)
