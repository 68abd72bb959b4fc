"""``flex`` backend: compiled ``torch.nn.attention.flex_attention`` with a per-head ``BlockMask``.

It runs on the :class:`BlockTokens` layout: queries ``q_rows`` (patch queries padded to
``n_q·q_block``), keys/values ``k_table``/``v_table`` (``n_sink`` special-key blocks, then the patch
key blocks), so the special keys never share a tile with patch keys (SparseVGGT's tile quirk, where a
dropped partial patch tile also drops specials, cannot happen).  Per row the sink blocks and the kept
patch blocks are *full* blocks (no ``mask_mod`` inside them), except the two blocks holding padding
rows: the first sink block (zero rows in front of the specials) and a kept partial last patch block,
which are *partial* blocks where ``mask_mod`` hides the padding.  ``mask_mod`` encodes the whole
block table, so eager mode (which ignores the block lists) computes the same function
(``vggt-architecture.md`` §17).

Compilation (``dynamic=False``) costs seconds per new sequence length; dynamo caches one graph per
shape.  Compiled flex has no backward pass on CPU, so gradients there must use ``gather``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .core import BACKENDS, attend_with_specials, needs_grad
from .layout import BlockTokens, intra_op_threads
from .selection import BlockSelection

_COMPILED: dict[str, Callable] = {}
MIN_RECOMPILE_LIMIT = 64  # one compiled graph per (length, dtype); dynamo's default of 8 is too few


def _flex_fn(compiled: bool) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if "fn" not in _COMPILED:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, MIN_RECOMPILE_LIMIT)
        _COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["fn"]


def _ordered(mask: Tensor) -> tuple[Tensor, Tensor]:
    """mask [B, H, n_q, n_cols] bool → (num_blocks [B, H, n_q] int32, indices [B, H, n_q, n_cols] int32)."""
    idx = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    return mask.sum(-1, dtype=torch.int32), idx


def build_block_mask(sel: BlockSelection, need_q_blocks: bool = False):
    """The FlexAttention ``BlockMask`` of ``sel`` over (``q_rows``) × (``k_table``) of :class:`BlockTokens`.

    Args:
        sel: block selection; its ``block_mask`` is [B, H, n_q, n_k].
        need_q_blocks: also build the transposed (q) block lists, needed for a backward pass.
    Returns:
        ``BlockMask`` with ``BLOCK_SIZE=(q_block, k_block)``, seq lengths ``(n_q·q_block, T·k_block)``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    lay = sel.layout
    QB, KB, n_sink, front = lay.q_block, lay.k_block, lay.n_sink, lay.front
    B, H, n_q, n_k = sel.block_mask.shape
    table = torch.cat([sel.block_mask.new_ones(B, H, n_q, n_sink), sel.block_mask], dim=-1)  # [B, H, n_q, T]
    padded = torch.zeros(n_sink + n_k, dtype=torch.bool, device=table.device)  # blocks with padding rows
    padded[0] = front > 0
    padded[-1] = n_k * KB != lay.num_patch
    partial, full = table & padded, table & ~padded
    first, end = front, n_sink * KB + lay.num_patch  # valid key rows: [first, end)

    def mask_mod(b, h, q_idx, kv_idx):
        return table[b, h, q_idx // QB, kv_idx // KB] & (kv_idx >= first) & (kv_idx < end)

    part_num, part_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)  # distinct tensors: aliasing crashes CPU codegen
    return BlockMask.from_kv_blocks(
        part_num, part_idx, full_num, full_idx, BLOCK_SIZE=(QB, KB), mask_mod=mask_mod,
        seq_lengths=(n_q * QB, (n_sink + n_k) * KB), compute_q_blocks=need_q_blocks,
    )


def flex_patch_attention(tokens: BlockTokens, sel: BlockSelection, compiled: bool = True) -> Tensor:
    """Patch-query output [B, H, N_p, D] from one flex_attention call (``compiled=False``: eager, tests only)."""
    grad = needs_grad(tokens.q, tokens.k, tokens.v)
    if grad and tokens.q.device.type == "cpu":
        raise NotImplementedError("backend 'flex' has no backward pass on CPU; use backend='gather' for gradients")
    with intra_op_threads(1 if tokens.q.device.type == "cpu" else torch.get_num_threads()):  # small ops
        block_mask = build_block_mask(sel, need_q_blocks=grad)
    out = _flex_fn(compiled)(tokens.q_rows, tokens.k_table, tokens.v_table, block_mask=block_mask)
    return out[:, :, : sel.layout.num_patch]


@BACKENDS.register("flex")
def flex_backend(tokens: BlockTokens, selection: BlockSelection) -> Tensor:
    """Compiled FlexAttention over the kept blocks (CPU: inference only; CUDA: Triton, differentiable).

    Args:
        tokens: q, k, v [B, H, N, D].
    Returns:
        [B, H, N, D].
    """
    return attend_with_specials(tokens, selection, flex_patch_attention)

