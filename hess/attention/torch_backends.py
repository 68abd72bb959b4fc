"""Pure-PyTorch backends: ``reference`` (the ground truth) and ``gather`` (fast, differentiable).

``gather`` computes only the kept blocks, from the :class:`BlockTokens` tables (``layout.py``).
A query-block row gathers its ``n_sink`` special-key blocks followed by its kept patch blocks in
ascending order, so its valid keys are one contiguous column range starting at ``front`` (the
padding of the sinks) of length ``S·n_s + kept patch keys`` (the padding of a kept partial last
block falls at its end).  Rows of all heads are sorted by that length and processed in cache-sized
chunks, each one ``q kᵀ → softmax → p v`` batched matmul over the contiguous gathered blocks, with
the scores of padding columns (and of the excess columns of rows shorter than their chunk's longest)
set to −inf.  Ragged per-head budgets therefore cost the same as uniform ones of the same total.
Without autograd, buffers are reused (``out=``) so a chunk stays in cache.
"""
from __future__ import annotations

import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .core import BACKENDS, attend_with_specials, needs_grad
from .layout import BlockTokens, intra_op_threads
from .selection import BlockSelection

# Elements of one chunk's score matrix [g, q_block, W]: 1 MiB of fp32 keeps q kᵀ, softmax and p v in
# cache: 5–10 % faster than 4 MiB chunks and no slower than 0.5 MiB ones on the 2-core box (N = 8192).
CHUNK_SCORES_CPU = 1 << 18
CHUNK_SCORES_CUDA = 1 << 26
CPU_WORKERS: Optional[int] = None  # Python worker threads of the CPU inference path; None → torch.get_num_threads()


@BACKENDS.register("reference")
def reference_backend(tokens: BlockTokens, selection: BlockSelection) -> Tensor:
    """Dense fp64 attention with the token-level mask implied by ``selection`` (slow; O(N²) memory).

    Args:
        tokens: q, k, v [B, H, N, D].
    Returns:
        [B, H, N, D] in q's dtype.
    """
    q, k, v, lay = tokens.q, tokens.k, tokens.v, selection.layout
    B, H, N, D = q.shape
    tok = torch.arange(N, device=q.device)
    frame, pos = tok // lay.tokens_per_frame, tok % lay.tokens_per_frame
    special = pos < lay.num_special  # [N]
    patch_index = (frame * (lay.tokens_per_frame - lay.num_special) + pos - lay.num_special).clamp(min=0)
    q_blk, k_blk = patch_index // lay.q_block, patch_index // lay.k_block  # [N] block of each token
    allowed = selection.block_mask[:, :, q_blk][:, :, :, k_blk]  # [B, H, N, N]
    allowed = allowed | special[None, None, :, None] | special[None, None, None, :]
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(D)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return (probs @ v.double()).to(q.dtype)


def _chunks(widths: list[int], q_block: int, target: int) -> list[tuple[int, int]]:
    """Split rows sorted by ascending key width into ranges of about ``target`` score elements."""
    out, i, R = [], 0, len(widths)
    while i < R:
        j = min(R, i + max(1, target // (q_block * widths[i])))
        while j - 1 > i and (j - i) * q_block * widths[j - 1] > 2 * target:  # a jump in width
            j = i + max(1, (j - i) // 2)
        out.append((i, j))
        i = j
    return out


def _mask_invalid_(s: Tensor, front: int, shortest: int, longest: int, valid: Tensor, cols: Tensor) -> None:
    """Set the scores of padding columns to -inf in place: s [g, QB, W]; row r's valid columns are
    ``[front, front + valid[r])``.  Uniform chunks only touch the padding slices (cheap)."""
    neg = float("-inf")
    if front:
        s[:, :, :front] = neg
    if shortest == longest:
        if front + longest < s.shape[2]:
            s[:, :, front + longest :] = neg
    else:
        s.masked_fill_((cols >= front + valid[:, None])[:, None, :], neg)


@dataclass
class _RowPlan:
    """All (b, h, r) query-block rows sorted by key length, with their table blocks."""

    order: Tensor  # [R] row index (b·H + h)·n_q + r of each sorted row
    blocks: Tensor  # [R, n_sink + n_k] flat table blocks: sinks, then kept patch blocks ascending
    valid: Tensor  # [R] valid key columns (from `front`)
    lengths: list[int]  # valid, as ints
    counts: list[int]  # kept patch blocks per sorted row


def _plan_rows(sel: BlockSelection, batch_heads: int) -> _RowPlan:
    lay = sel.layout
    n_q, n_k, n_sink, KB = lay.n_q, lay.n_k, lay.n_sink, lay.k_block
    dev, R, T, tail = sel.block_mask.device, batch_heads * n_q, n_sink + n_k, n_k * KB - lay.num_patch
    n_sel = sel.kv_num_blocks.reshape(R).long()
    partial = sel.block_mask[..., -1].reshape(R).long() if tail else torch.zeros_like(n_sel)
    valid = lay.num_special_total + n_sel * KB - tail * partial  # a kept partial block is last
    order = torch.sort(valid, stable=True).indices
    base = (torch.arange(R, device=dev) // n_q * T)[:, None]  # first table block of the row's (b, h)
    blocks = torch.cat([base + torch.arange(n_sink, device=dev), base + n_sink + sel.kv_indices.reshape(R, n_k)], 1)
    valid, n_sel = valid[order], n_sel[order]
    return _RowPlan(order, blocks[order], valid, valid.tolist(), n_sel.tolist())


def _gather_patch(tokens: BlockTokens, sel: BlockSelection) -> Tensor:
    """Patch-query output [B, H, N_p, D] computing only the kept blocks (see module docstring)."""
    lay = sel.layout
    B, H, _, D = tokens.q.shape
    QB, KB, n_sink, front = lay.q_block, lay.k_block, lay.n_sink, lay.front
    with intra_op_threads(torch.get_num_threads() if tokens.q.is_cuda else 1):  # small ops
        plan = _plan_rows(sel, B * H)
    target = CHUNK_SCORES_CUDA if tokens.q.is_cuda else CHUNK_SCORES_CPU
    spans = _chunks([front + n for n in plan.lengths], QB, target)
    chunks = [(i, j, (n_sink + plan.counts[j - 1]) * KB) for i, j in spans]  # (first, end, key columns)
    args = (tokens.q_rows.reshape(-1, QB, D), tokens.k_table.reshape(-1, KB, D),
            tokens.v_table.reshape(-1, KB, D), plan, chunks, front)
    if not needs_grad(tokens.q, tokens.k, tokens.v) and tokens.q.dtype in (torch.float32, torch.float64):
        out = _chunks_inplace(*args, out=tokens.new("out_rows", (len(plan.order), QB, D)))
    else:
        out = _chunks_autograd(*args)[torch.argsort(plan.order)]  # back to (b, h, r) order
    return out.view(B, H, -1, D)[:, :, : lay.num_patch]


def _chunks_autograd(q_rows: Tensor, kt: Tensor, vt: Tensor, plan: _RowPlan, chunks: list, front: int) -> Tensor:
    """Differentiable chunk loop → [R, QB, D] in *sorted* row order."""
    D, KB = q_rows.shape[-1], kt.shape[1]
    cols, outs = torch.arange(max(W for _, _, W in chunks), device=kt.device), []
    for i, j, W in chunks:
        g, idx = j - i, plan.blocks[i:j, : W // KB].reshape(-1)
        k_c, v_c = kt.index_select(0, idx).view(g, W, D), vt.index_select(0, idx).view(g, W, D)
        s = torch.bmm(q_rows.index_select(0, plan.order[i:j]), k_c.transpose(1, 2)) / math.sqrt(D)
        invalid = (cols[:W] < front) | (cols[:W] >= front + plan.valid[i:j, None])  # [g, W]
        s = s.masked_fill(invalid[:, None, :], float("-inf"))
        p = s.softmax(-1) if s.dtype in (torch.float32, torch.float64) else s.float().softmax(-1).to(s.dtype)
        outs.append(torch.bmm(p, v_c))
    return torch.cat(outs)


def _chunks_inplace(q_rows: Tensor, kt: Tensor, vt: Tensor, plan: _RowPlan, chunks: list, front: int,
                    out: Tensor) -> Tensor:
    """Inference chunk loop with reused buffers, writing ``out`` [R, QB, D] in (b, h, r) row order.

    On CPU with ``n = torch.get_num_threads() > 1`` (or ``CPU_WORKERS``), n Python threads pull
    chunks from a shared counter and run single-threaded ops (intra-op threads are set to 1 for the
    duration of the call and restored after): many small multi-threaded ops pay a fork/join each,
    which costs a lot on a loaded machine.  Results do not depend on the number of workers.
    """
    QB, D, KB = q_rows.shape[1], q_rows.shape[2], kt.shape[1]
    cols, scale = torch.arange(max(W for _, _, W in chunks), device=kt.device), 1.0 / math.sqrt(D)
    k_size = max((j - i) * W for i, j, W in chunks) * D
    s_size = max((j - i) * QB * W for i, j, W in chunks)

    def worker(take) -> None:
        k_buf, v_buf, s_buf = kt.new_empty(k_size), kt.new_empty(k_size), kt.new_empty(s_size)
        o_buf = kt.new_empty(max(j - i for i, j, _ in chunks), QB, D)
        for n in take:
            i, j, W = chunks[n]
            g, idx = j - i, plan.blocks[i:j, : W // KB].reshape(-1)
            q_c = q_rows.index_select(0, plan.order[i:j])  # [g, QB, D]
            k_c = torch.index_select(kt, 0, idx, out=k_buf[: g * W * D].view(-1, KB, D)).view(g, W, D)
            v_c = torch.index_select(vt, 0, idx, out=v_buf[: g * W * D].view(-1, KB, D)).view(g, W, D)
            s = s_buf[: g * QB * W].view(g, QB, W)
            torch.baddbmm(s, q_c, k_c.transpose(1, 2), beta=0.0, alpha=scale, out=s)  # [g, QB, W]
            _mask_invalid_(s, front, plan.lengths[i], plan.lengths[j - 1], plan.valid[i:j], cols[:W])
            torch.softmax(s, dim=-1, out=s)
            torch.bmm(s, v_c, out=o_buf[:g])
            out.index_copy_(0, plan.order[i:j], o_buf[:g])  # rows back to their (b, h, r) place

    workers = 1 if kt.is_cuda else min(CPU_WORKERS or torch.get_num_threads(), len(chunks))
    if workers <= 1:
        worker(range(len(chunks)))
        return out
    counter = itertools.count()  # next() on it is atomic under the GIL
    inference = torch.is_inference_mode_enabled()  # grad modes are thread-local: carry them over

    def run(take) -> None:
        with torch.inference_mode(inference), torch.no_grad():
            worker(take)

    with intra_op_threads(1), ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(run, _until(counter, len(chunks))) for _ in range(workers)]:
            future.result()
    return out


def _until(counter: "itertools.count", end: int):
    """Chunk numbers drawn from a shared counter until ``end`` (dynamic scheduling across workers)."""
    while (n := next(counter)) < end:
        yield n


@BACKENDS.register("gather")
def gather_backend(tokens: BlockTokens, selection: BlockSelection) -> Tensor:
    """Computes only kept blocks with gathered K/V and batched matmuls; any device, autograd-capable.

    Args:
        tokens: q, k, v [B, H, N, D].
    Returns:
        [B, H, N, D].
    """
    return attend_with_specials(tokens, selection, _gather_patch)
