"""``head_sparse_attention``: the public op, the backend registry and the shared special-token path.

Every backend computes the same function (``method.md`` §2, steps 3 and 6):

- special queries attend densely to all N keys;
- a patch query of block r attends, with one softmax, over all special keys plus the patch keys of
  the blocks kept for row r by :func:`select_blocks`.

A backend is ``fn(tokens, selection) -> [B, H, N, D]`` with ``tokens`` the :class:`BlockTokens`
(q, k, v and their block-friendly copies, shared with the selection).  Those that only accelerate
the patch queries use :func:`attend_with_specials`, which runs the dense special-query SDPA and
re-interleaves the frame-major token order.
"""
from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from hess.registry import Registry

from .layout import BlockTokens, make_layout
from .selection import BlockSelection, select_from_tokens

Backend = Callable[[BlockTokens, BlockSelection], Tensor]
BACKENDS: Registry[Backend] = Registry("attention backend")

# patch_fn(tokens, selection) -> out_patch [B, H, N_p, D]
PatchFn = Callable[[BlockTokens, BlockSelection], Tensor]


def attend_with_specials(tokens: BlockTokens, selection: BlockSelection, patch_fn: PatchFn) -> Tensor:
    """Dense special queries + ``patch_fn`` for the patch queries, merged back to frame-major order.

    Args:
        tokens: q, k, v [B, H, N, D] and their block copies.
        selection: the block selection for these q, k.
        patch_fn: computes the patch-query output [B, H, N_p, D].
    Returns:
        [B, H, N, D].
    """
    out_p = patch_fn(tokens, selection)
    qs = tokens.q_special
    out_s = F.scaled_dot_product_attention(qs, tokens.k, tokens.v) if qs.shape[2] else qs
    return tokens.merge(out_p, out_s)


def needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def head_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    tokens_per_frame: int,
    num_special: int,
    blocks_per_head: Tensor,
    q_block: int = 128,
    k_block: int = 64,
    cdf_threshold: Union[None, float, Tensor] = None,
    backend: str = "auto",
    return_selection: bool = False,
) -> Union[Tensor, tuple[Tensor, BlockSelection]]:
    """Head-wise block-sparse global attention.

    Args:
        q, k, v: [B, H, N, D] post-RoPE, ``N = S·tokens_per_frame`` frame-major.
        tokens_per_frame: P, tokens per frame including the ``num_special`` special ones.
        num_special: n_s special tokens at the start of each frame; they are attended densely.
        blocks_per_head: [H] integer key-block budgets ``c_h`` in ``[1, n_k]``.
        q_block, k_block: patch query / key block sizes (128 / 64).
        cdf_threshold: None, scalar or [H] τ: keep at least the blocks covering τ of the block score.
        backend: a name in ``BACKENDS`` (``auto``, ``reference``, ``gather``, ``flex``, ``xformers``).
        return_selection: also return the :class:`BlockSelection` (realised density etc.).
    Returns:
        out [B, H, N, D], or ``(out, selection)``.

    On CPU, runs of small or memory-bound ops are executed with one intra-op thread and the gather
    chunks by ``torch.get_num_threads()`` Python workers; the process-wide thread count is changed
    for those stretches and restored (see :func:`intra_op_threads`).  Without autograd, CPU copies
    live in per-thread reusable buffers (:func:`release_workspace` frees them).
    """
    fn = BACKENDS.get(backend)  # unknown names fail before any work, listing the known ones
    tokens = BlockTokens(q, k, v, make_layout(q, k, v, tokens_per_frame, num_special, q_block, k_block))
    selection = select_from_tokens(tokens, blocks_per_head, cdf_threshold)
    out = fn(tokens, selection)
    return (out, selection) if return_selection else out


def resolve_auto(q: Tensor, k: Tensor, v: Tensor) -> str:
    """The backend ``auto`` runs: ``gather`` when gradients are needed or on CPU (fastest measured,
    faster than compiled ``flex`` in every row of README "Sparse attention speed"), ``flex`` (Triton) on CUDA."""
    if needs_grad(q, k, v) or q.device.type != "cuda":
        return "gather"
    return "flex"


@BACKENDS.register("auto")
def auto_backend(tokens: BlockTokens, selection: BlockSelection) -> Tensor:
    """Dispatches to :func:`resolve_auto`'s choice; never ``xformers`` on CPU."""
    return BACKENDS.get(resolve_auto(tokens.q, tokens.k, tokens.v))(tokens, selection)
