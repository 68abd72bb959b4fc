"""Retrofit head-wise block-sparse attention into a model's global layers, and undo it.

    plan  = SparsePlan(keep_ratio=torch.full((24, 16), 0.25))    # or blocks_per_head=[L, H] ints
    model = sparsify(model, plan)      # every global Attention.core → HeadSparseCore
    out   = model(images)
    realized_density(model).overall    # what the last forward actually computed
    model = densify(model)             # back to DenseCore

Only ``Attention.core`` is swapped (the seam of ``hess.models.layers``): cores hold no parameters or
persistent buffers, so ``state_dict`` keys never change.  The model must expose
``global_attention_layers() -> list[Attention]``; its global blocks pass the core kwargs
``tokens_per_frame`` and ``num_special``.

Keep ratios become block counts at run time, for the sequence actually seen:
``c_h = clamp(floor(keep_ratio_h · n_k + 1e-9), 1, n_k)`` with ``n_k = ceil(N_p / k_block)`` — the
same floor-with-minimum-1 rule as ``hess.budget.base_blocks``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from hess.attention import BACKENDS, head_sparse_attention
from hess.models.layers import Attention, DenseCore

_FLOOR_EPS = 1e-9  # floor(n_k * keep_ratio) with slack, so 100 * 0.29 gives 29 (as hess.budget)

Budget = Union[None, float, Tensor]


@dataclass
class SparsePlan:
    """Per-(global layer, head) budgets and the options of the sparse op.

    Attributes:
        blocks_per_head: [L, H] integer key-block budgets ``c_h >= 1`` (fixed counts; a sequence with
            fewer key blocks than a budget raises at run time), or None.
        keep_ratio: a float, or [L, H] floats, in (0, 1]: fraction of the n_k key blocks kept,
            turned into counts per sequence (module docstring).  Exactly one of the two is given.
        q_block, k_block: patch query / key block sizes.
        cdf_threshold: None, a float or [L, H] τ in [0, 1] (SparseVGGT's coverage floor).
        backend: a name in ``hess.attention.BACKENDS``.
    """

    blocks_per_head: Optional[Tensor] = None
    keep_ratio: Budget = None
    q_block: int = 128
    k_block: int = 64
    cdf_threshold: Budget = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        if (self.blocks_per_head is None) == (self.keep_ratio is None):
            raise ValueError("SparsePlan needs exactly one of blocks_per_head ([L, H] ints) or keep_ratio")
        if self.blocks_per_head is not None:
            b = self.blocks_per_head
            if not isinstance(b, Tensor) or b.dtype.is_floating_point or b.dtype == torch.bool or b.dim() != 2:
                raise TypeError(f"blocks_per_head must be an [L, H] integer tensor, got {_describe(b)}")
            if int(b.min()) < 1:
                raise ValueError(f"blocks_per_head must be >= 1, got min {int(b.min())}")
        else:
            r = torch.as_tensor(self.keep_ratio, dtype=torch.float64)
            if r.dim() not in (0, 2) or not bool(((r > 0) & (r <= 1)).all()):
                raise ValueError(f"keep_ratio must be a float or an [L, H] tensor in (0, 1], got {_describe(self.keep_ratio)}")
        if self.cdf_threshold is not None:
            t = torch.as_tensor(self.cdf_threshold, dtype=torch.float64)
            if t.dim() not in (0, 2) or not bool(((t >= 0) & (t <= 1)).all()):
                raise ValueError(f"cdf_threshold must be None, a float or an [L, H] tensor in [0, 1], got {_describe(self.cdf_threshold)}")
        BACKENDS.get(self.backend)  # unknown backend: error listing the known ones

    def check(self, num_layers: int, num_heads: list[int]) -> None:
        """Raise unless every [L, H] field matches the model's global layers and heads."""
        for name in ("blocks_per_head", "keep_ratio", "cdf_threshold"):
            value = getattr(self, name)
            if isinstance(value, Tensor) and value.dim() == 2:
                if value.shape[0] != num_layers or any(value.shape[1] != h for h in num_heads):
                    raise ValueError(f"SparsePlan.{name} has shape {tuple(value.shape)}, but the model has "
                                     f"{num_layers} global layers with {sorted(set(num_heads))} heads")

    def layer(self, index: int) -> dict:
        """HeadSparseCore kwargs of global layer ``index``."""
        def row(value: Budget) -> Budget:
            return value[index].clone() if isinstance(value, Tensor) and value.dim() == 2 else value

        return dict(blocks_per_head=row(self.blocks_per_head), keep_ratio=row(self.keep_ratio),
                    q_block=self.q_block, k_block=self.k_block, cdf_threshold=row(self.cdf_threshold),
                    backend=self.backend)


def _describe(value: object) -> str:
    return f"tensor {tuple(value.shape)} {value.dtype}" if isinstance(value, Tensor) else repr(value)


class HeadSparseCore(nn.Module):
    """Attention core running ``head_sparse_attention`` with one layer's per-head budgets.

    No parameters or buffers.  After each forward, ``last_density`` ([H]), ``last_density_overall``
    and ``last_density_with_sinks`` hold the realised density of that call.

    Args (forward):
        q, k, v: [B, H, N, D].
        tokens_per_frame, num_special: layout core kwargs from the global block (required).
    Returns:
        [B, H, N, D].
    """

    def __init__(self, blocks_per_head: Optional[Tensor] = None, keep_ratio: Budget = None, q_block: int = 128,
                 k_block: int = 64, cdf_threshold: Budget = None, backend: str = "auto") -> None:
        super().__init__()
        if (blocks_per_head is None) == (keep_ratio is None):
            raise ValueError("HeadSparseCore needs exactly one of blocks_per_head or keep_ratio")
        self.blocks_per_head, self.keep_ratio = blocks_per_head, keep_ratio  # plain attributes, not buffers
        self.q_block, self.k_block, self.cdf_threshold, self.backend = q_block, k_block, cdf_threshold, backend
        self.last_density: Optional[Tensor] = None
        self.last_density_overall: Optional[float] = None
        self.last_density_with_sinks: Optional[float] = None

    def budgets(self, num_heads: int, n_k: int) -> Tensor:
        """[H] int64 block counts for a sequence with ``n_k`` patch key blocks."""
        if self.blocks_per_head is not None:
            return self.blocks_per_head.to(torch.int64)
        ratio = torch.as_tensor(self.keep_ratio, dtype=torch.float64).expand(num_heads)
        return torch.floor(ratio * n_k + _FLOOR_EPS).to(torch.int64).clamp(1, n_k)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, **core_kwargs) -> Tensor:
        missing = [key for key in ("tokens_per_frame", "num_special") if core_kwargs.get(key) is None]
        if missing:
            raise ValueError(f"HeadSparseCore needs the core kwargs {missing} (only global attention layers, "
                             f"called by the aggregator, can be sparsified); got {sorted(core_kwargs)}")
        P, n_s = int(core_kwargs["tokens_per_frame"]), int(core_kwargs["num_special"])
        if P <= 0 or n_s >= P:
            raise ValueError(f"bad layout core kwargs: tokens_per_frame={P}, num_special={n_s}")
        n_k = math.ceil((q.shape[2] // P) * (P - n_s) / self.k_block)
        out, sel = head_sparse_attention(
            q, k, v, tokens_per_frame=P, num_special=n_s, blocks_per_head=self.budgets(q.shape[1], n_k).to(q.device),
            q_block=self.q_block, k_block=self.k_block, cdf_threshold=self.cdf_threshold, backend=self.backend,
            return_selection=True,
        )
        self.last_density = sel.density.detach().cpu()
        self.last_density_overall, self.last_density_with_sinks = sel.density_overall, sel.density_with_sinks
        return out

    def extra_repr(self) -> str:
        def fmt(value: Budget) -> str:
            return str(value.tolist()) if isinstance(value, Tensor) else repr(value)

        budget = (f"blocks_per_head={fmt(self.blocks_per_head)}" if self.blocks_per_head is not None
                  else f"keep_ratio={fmt(self.keep_ratio)}")
        return (f"{budget}, q_block={self.q_block}, k_block={self.k_block}, "
                f"cdf_threshold={fmt(self.cdf_threshold)}, backend={self.backend!r}")


def _global_layers(model: nn.Module) -> list[Attention]:
    if not hasattr(model, "global_attention_layers"):
        raise TypeError(f"{type(model).__name__} has no global_attention_layers(); cannot (de)sparsify it")
    layers = list(model.global_attention_layers())
    bad = [type(m).__name__ for m in layers if not isinstance(m, Attention)]
    if not layers or bad:
        raise TypeError(f"global_attention_layers() must return hess.models.layers.Attention modules, got {bad or 'none'}")
    return layers


def sparsify(model: nn.Module, plan: SparsePlan) -> nn.Module:
    """Swap the core of every global attention layer for a :class:`HeadSparseCore` (in place).

    Args:
        model: a module with ``global_attention_layers()``.
        plan: per-(layer, head) budgets; its [L, H] fields must match the model.
    Returns:
        the same ``model``.
    """
    if not isinstance(plan, SparsePlan):
        raise TypeError(f"plan must be a SparsePlan, got {type(plan).__name__}")
    layers = _global_layers(model)
    plan.check(len(layers), [m.num_heads for m in layers])
    for index, attn in enumerate(layers):
        budgets = plan.layer(index)
        for name in ("blocks_per_head", "keep_ratio", "cdf_threshold"):
            value = budgets[name]
            if isinstance(value, Tensor) and value.dim() == 1 and value.shape[0] != attn.num_heads:
                raise ValueError(f"SparsePlan.{name} gives {value.shape[0]} heads, layer {index} has {attn.num_heads}")
        attn.core = HeadSparseCore(**budgets)
    return model


def densify(model: nn.Module) -> nn.Module:
    """Restore :class:`DenseCore` wherever :func:`sparsify` put a :class:`HeadSparseCore` (in place)."""
    for attn in _global_layers(model):
        if isinstance(attn.core, HeadSparseCore):
            attn.core = DenseCore()
    return model


@dataclass
class RealizedDensity:
    """Realised density of the last forward of every sparsified global layer.

    Attributes:
        per_head: [L, H] kept fraction of each head's patch–patch score matrix.
        per_layer: [L] mean over heads.
        overall: mean over layers (each layer's matrix has the same size).
        with_sinks: the same in SparseVGGT's convention (block map incl. special-key columns).
    """

    per_head: Tensor
    per_layer: Tensor
    overall: float
    with_sinks: float


def realized_density(model: nn.Module) -> RealizedDensity:
    """Aggregate the per-layer records of the last forward; raises if nothing was recorded."""
    cores = [attn.core for attn in _global_layers(model)]
    if not all(isinstance(c, HeadSparseCore) for c in cores):
        raise ValueError("realized_density needs a sparsified model: call hess.sparsify(model, plan) first")
    if any(c.last_density is None for c in cores):
        raise ValueError("no realised density recorded yet: run a forward pass of the sparsified model first")
    per_head = torch.stack([c.last_density for c in cores])
    with_sinks = sum(c.last_density_with_sinks for c in cores) / len(cores)
    return RealizedDensity(per_head, per_head.mean(1), float(per_head.mean()), float(with_sinks))
