"""Per-head block selection (``method.md`` §2, steps 4–5) and the realised density.

Selection, per (batch, head, query-block row) of the patch tokens (see :mod:`.layout`):

1. mean-pool q over each query block and k over each key block (fp32; a partial block is the mean of
   the rows it has), ``A = softmax(q̄ k̄ᵀ / √D)`` over the ``n_k`` key blocks;
2. sort ``A`` descending (ties → lower block index) and keep the first ``c_h`` blocks;
3. with a CDF floor τ, keep at least ``#{j : cumsum_j ≤ τ + 1e-5}`` blocks (SparseVGGT's
   ``searchsorted(..., right=True)``), so τ only ever adds blocks; never fewer than 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from .layout import BlockTokens, TokenLayout, intra_op_threads, make_layout

CDF_EPS = 1e-5  # SparseVGGT's tolerance in the CDF count (method.md §2 step 5)


@dataclass
class BlockSelection:
    """Which patch key blocks every patch query block attends to, per (batch, head).

    Attributes:
        layout: token and block sizes.
        block_mask: [B, H, n_q, n_k] bool, True = key block kept.
        kv_num_blocks: [B, H, n_q] int32, kept blocks per row.
        kv_indices: [B, H, n_q, n_k] int32, per row the kept block indices in ascending order, then
            the dropped ones (ascending); row r uses ``kv_indices[..., r, :kv_num_blocks[r]]``.
        block_scores: [B, H, n_q, n_k] fp32 pooled block scores (softmax over key blocks).
        density: [H] fraction of the patch–patch score matrix computed (exact element counts,
            partial blocks weighted by their size), averaged over the batch.
        density_overall: the same over all heads.
        density_with_sinks: SparseVGGT's convention ``mean(block map)`` with the ``layout.n_sink_sparsevggt`` always-on
            special-key columns appended (its reported sparsity is ``1 − density_with_sinks``).
    """

    layout: TokenLayout
    block_mask: Tensor
    kv_num_blocks: Tensor
    kv_indices: Tensor
    block_scores: Tensor
    density: Tensor
    density_overall: float
    density_with_sinks: float

    @property
    def n_q(self) -> int:
        return self.layout.n_q

    @property
    def n_k(self) -> int:
        return self.layout.n_k


def _check_budgets(blocks_per_head: Tensor, num_heads: int, n_k: int) -> Tensor:
    if not isinstance(blocks_per_head, Tensor):
        raise TypeError(f"blocks_per_head must be an integer tensor of shape ({num_heads},), got {type(blocks_per_head).__name__}")
    if blocks_per_head.dtype.is_floating_point or blocks_per_head.dtype.is_complex or blocks_per_head.dtype == torch.bool:
        raise TypeError(f"blocks_per_head must have an integer dtype, got {blocks_per_head.dtype}")
    if tuple(blocks_per_head.shape) != (num_heads,):
        raise ValueError(f"blocks_per_head must have shape ({num_heads},) (one budget per head), got {tuple(blocks_per_head.shape)}")
    lo, hi = int(blocks_per_head.min()), int(blocks_per_head.max())
    if lo < 1 or hi > n_k:
        raise ValueError(f"blocks_per_head must lie in [1, n_k={n_k}] (key blocks of this sequence), got min {lo}, max {hi}")
    return blocks_per_head.long()


def _check_cdf(cdf_threshold: Union[None, float, Tensor], num_heads: int) -> Optional[Tensor]:
    if cdf_threshold is None:
        return None
    tau = torch.as_tensor(cdf_threshold, dtype=torch.float32)
    if tau.dim() == 0:
        tau = tau.expand(num_heads)
    if tuple(tau.shape) != (num_heads,):
        raise ValueError(f"cdf_threshold must be a scalar or have shape ({num_heads},), got {tuple(tau.shape)}")
    if not bool(((tau >= 0) & (tau <= 1)).all()):
        raise ValueError(f"cdf_threshold must lie in [0, 1], got {tau.tolist()}")
    return tau


def _block_means(padded: Tensor, length: int, block: int) -> Tensor:
    """padded: [B, H, n·block, D] with zero rows after ``length`` → [B, H, n, D] fp32 block means."""
    B, H, L, D = padded.shape
    n = L // block
    sums = padded.view(B, H, n, block, D).sum(dim=3, dtype=torch.float32)
    counts = torch.full((n,), float(block), device=padded.device)
    counts[-1] = length - (n - 1) * block  # a partial last block averages the rows it has
    return sums / counts[:, None]


def _kept_first(mask: Tensor, n_sel: Tensor) -> Tensor:
    """mask [..., n_k] → int32 [..., n_k]: kept block indices ascending, then the dropped ones ascending."""
    kept_rank = mask.cumsum(-1) - 1  # position among kept blocks
    dropped_rank = n_sel.unsqueeze(-1) + (~mask).cumsum(-1) - 1
    slot = torch.where(mask, kept_rank, dropped_rank)
    blocks = torch.arange(mask.shape[-1], device=mask.device, dtype=torch.int32).expand_as(slot)
    return torch.empty_like(blocks).scatter_(-1, slot, blocks)


def _realised_density(mask: Tensor, layout: TokenLayout) -> tuple[Tensor, float, float]:
    """mask: [B, H, n_q, n_k] → (density [H], overall, SparseVGGT density with sink columns)."""
    Np, dev = layout.num_patch, mask.device
    rows = torch.full((layout.n_q,), float(layout.q_block), device=dev)
    rows[-1] = Np - (layout.n_q - 1) * layout.q_block
    cols = torch.full((layout.n_k,), float(layout.k_block), device=dev)
    cols[-1] = Np - (layout.n_k - 1) * layout.k_block
    kept = torch.einsum("bhqk,q,k->bh", mask.double(), rows.double(), cols.double()) / float(Np) ** 2
    per_head = kept.mean(0).float()
    sinks = layout.n_sink_sparsevggt
    with_sinks = (mask.double().sum((-1, -2)) + layout.n_q * sinks) / (layout.n_q * (layout.n_k + sinks))
    return per_head, float(kept.mean()), float(with_sinks.mean())


def select_blocks(
    q: Tensor,
    k: Tensor,
    *,
    tokens_per_frame: int,
    num_special: int,
    blocks_per_head: Tensor,
    q_block: int = 128,
    k_block: int = 64,
    cdf_threshold: Union[None, float, Tensor] = None,
) -> BlockSelection:
    """Per-head top-``c_h`` selection of patch key blocks for every patch query block.

    Args:
        q, k: [B, H, N, D] post-RoPE queries and keys, ``N = S·tokens_per_frame``.
        tokens_per_frame: P, tokens per frame including the special ones.
        num_special: n_s special tokens at the start of every frame (0 <= n_s < P).
        blocks_per_head: [H] integer budgets ``c_h`` in ``[1, n_k]``.
        q_block, k_block: query / key block sizes over the patch tokens.
        cdf_threshold: None, a scalar or [H] τ in [0, 1]: a coverage floor on top of ``c_h``.
    Returns:
        :class:`BlockSelection` with ``n_q = ceil(N_p/q_block)`` rows and ``n_k = ceil(N_p/k_block)``
        key blocks.
    """
    layout = make_layout(q, k, k, tokens_per_frame, num_special, q_block, k_block)
    return select_from_tokens(BlockTokens(q, k, k, layout), blocks_per_head, cdf_threshold)


def select_from_tokens(tokens: BlockTokens, blocks_per_head: Tensor,
                       cdf_threshold: Union[None, float, Tensor] = None) -> BlockSelection:
    """:func:`select_blocks` on already rearranged tokens (shares their copies with the backend)."""
    q_rows, k_table = tokens.q_rows, tokens.k_table  # built outside no_grad: the backend reuses them
    threads = 1 if q_rows.device.type == "cpu" else torch.get_num_threads()  # small or memory-bound ops
    with torch.no_grad(), intra_op_threads(threads):
        return _select(tokens.layout, q_rows.detach(), k_table.detach(), blocks_per_head, cdf_threshold)


def _select(layout: TokenLayout, q_rows: Tensor, k_table: Tensor, blocks_per_head: Tensor,
            cdf_threshold: Union[None, float, Tensor]) -> BlockSelection:
    B, H, _, D = q_rows.shape
    dev = q_rows.device
    budgets = _check_budgets(blocks_per_head, H, layout.n_k).to(dev)
    tau = _check_cdf(cdf_threshold, H)
    start = layout.n_sink * layout.k_block
    pooled_q = _block_means(q_rows, layout.num_patch, layout.q_block)  # [B, H, n_q, D]
    pooled_k = _block_means(k_table[:, :, start:], layout.num_patch, layout.k_block)  # [B, H, n_k, D]
    return _select_pooled(layout, pooled_q, pooled_k, budgets, tau)


def _select_pooled(layout: TokenLayout, pooled_q: Tensor, pooled_k: Tensor, budgets: Tensor,
                   tau: Optional[Tensor]) -> BlockSelection:
    """pooled_q [B, H, n_q, D], pooled_k [B, H, n_k, D] fp32 → the selection (module docstring)."""
    B, H, _, D = pooled_q.shape
    dev = pooled_q.device
    logits = pooled_q @ pooled_k.transpose(-1, -2) / math.sqrt(D)
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("q or k contains NaN or Inf values: block scores are not finite")
    scores = logits.softmax(dim=-1)  # [B, H, n_q, n_k]
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True, stable=True)  # ties → lower index
    n_sel = budgets.view(1, H, 1).expand(B, H, layout.n_q)
    if tau is not None:
        cdf = sorted_scores.cumsum(dim=-1)
        bound = (tau.to(dev) + CDF_EPS).view(1, H, 1, 1).expand(B, H, layout.n_q, 1).contiguous()
        n_cdf = torch.searchsorted(cdf, bound, right=True).squeeze(-1)
        n_sel = torch.maximum(n_sel, n_cdf)
    n_sel = n_sel.clamp(1, layout.n_k)
    ranks = torch.arange(layout.n_k, device=dev)
    keep_sorted = ranks < n_sel.unsqueeze(-1)  # [B, H, n_q, n_k] in sorted order
    mask = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    kv_indices = _kept_first(mask, n_sel)
    density, overall, with_sinks = _realised_density(mask, layout)
    return BlockSelection(layout, mask, n_sel.to(torch.int32), kv_indices, scores, density, overall, with_sinks)
