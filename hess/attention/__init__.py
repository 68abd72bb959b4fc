"""Head-wise block-sparse global attention (``method.md`` §2): selection, exact backends.

    out = head_sparse_attention(q, k, v, tokens_per_frame=P, num_special=5,
                                blocks_per_head=torch.tensor([...]), backend="auto")

Backends (``BACKENDS``, each ``fn(tokens, selection) -> [B, H, N, D]``): ``reference`` (dense fp64
with the block mask; ground truth), ``gather`` (pure PyTorch, only kept blocks, differentiable),
``flex`` (compiled FlexAttention; CPU inference only), ``xformers`` (CUDA only) and ``auto``.
A leaf module: imports torch and ``hess.registry`` only.
"""
from .core import BACKENDS, attend_with_specials, head_sparse_attention, resolve_auto
from .layout import BlockTokens, TokenLayout, intra_op_threads, make_layout, release_workspace
from .selection import BlockSelection, select_blocks, select_from_tokens
from . import torch_backends  # noqa: F401  (registers reference, gather)
from . import flex_backend  # noqa: F401  (registers flex)
from . import xformers_backend  # noqa: F401  (registers xformers)

__all__ = [
    "BACKENDS",
    "BlockSelection",
    "BlockTokens",
    "TokenLayout",
    "attend_with_specials",
    "head_sparse_attention",
    "intra_op_threads",
    "make_layout",
    "release_workspace",
    "resolve_auto",
    "select_blocks",
    "select_from_tokens",
]
