"""The token layout of global attention and the one rearrangement every backend shares.

Global attention sees ``q, k, v: [B, H, N, D]`` with ``N = S·P`` in frame-major order; the first
``num_special`` tokens of every frame are special (camera + registers).  The patch tokens of all
frames, concatenated in that order (``N_p = S·(P − n_s)``), are cut into query blocks of ``q_block``
and key blocks of ``k_block`` rows; the last block of each may be partial.

:class:`BlockTokens` copies q, k, v once into block-friendly tensors (everything else is a view)::

    q_rows[b, h]  = [ patch queries | 0…0 ]                                   # [n_q·q_block, D]
    k_table[b, h] = [ 0…0 | special keys | patch keys | 0…0 ]                 # [T·k_block, D]
                      └─ front ─┘└──── n_sb blocks ───┘└── n_k blocks ──┘

``n_sb = ceil(S·n_s / k_block)`` sink blocks hold the special keys, zero-padded at the *front* so
the patch blocks start on a block boundary; ``T = n_sb + n_k``.  Padding rows are never attended.

On CPU without autograd these copies live in per-thread :func:`workspace` buffers reused from call
to call: a fresh 30 MB tensor costs ~10× its copy in page faults (measured on the benchmark box).
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import torch
from torch import Tensor

_WORKSPACE = threading.local()


def workspace(name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised CPU buffer of ``shape`` reused by later calls in this thread (inference only).

    The caller must be done with it before the next call that asks for the same ``name``.
    """
    buffers = _WORKSPACE.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    buf = buffers.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != like.dtype:
        buf = buffers[name] = torch.empty(numel, dtype=like.dtype)
    return buf[:numel].view(shape)


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run the enclosed CPU ops with ``n`` intra-op threads (process-wide), restoring the count after.

    Used around long sequences of small ops (block selection, the gather chunk workers): on a shared
    machine every multi-threaded op pays a fork/join, which made them ~6× slower than one thread
    (measured under load 5 on the 2-core box).
    """
    previous = torch.get_num_threads()
    if n == previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def release_workspace() -> None:
    """Free this thread's reusable buffers (they hold ~4 copies of the largest q seen)."""
    _WORKSPACE.__dict__.pop("buffers", None)


@dataclass(frozen=True)
class TokenLayout:
    """Sizes of the frame-major global sequence and of its patch blocks."""

    num_frames: int  # S
    tokens_per_frame: int  # P
    num_special: int  # n_s per frame
    q_block: int
    k_block: int

    @property
    def num_patch(self) -> int:  # N_p
        return self.num_frames * (self.tokens_per_frame - self.num_special)

    @property
    def num_special_total(self) -> int:  # S·n_s
        return self.num_frames * self.num_special

    @property
    def n_q(self) -> int:
        return -(-self.num_patch // self.q_block)

    @property
    def n_k(self) -> int:
        return -(-self.num_patch // self.k_block)

    @property
    def n_sink(self) -> int:
        """Blocks of the ``k_table`` holding the special keys: ``ceil(S·n_s / k_block)``."""
        return -(-self.num_special_total // self.k_block)

    @property
    def front(self) -> int:
        """Zero rows in front of the special keys in ``k_table``."""
        return self.n_sink * self.k_block - self.num_special_total

    @property
    def n_sink_sparsevggt(self) -> int:
        """Always-on key columns of SparseVGGT's map: ``ceil((N_p + S·n_s)/k_block) − n_k`` (its tiles
        put the first specials into the last partial patch tile)."""
        return -(-(self.num_patch + self.num_special_total) // self.k_block) - self.n_k


def make_layout(q: Tensor, k: Tensor, v: Tensor, tokens_per_frame: int, num_special: int,
                q_block: int, k_block: int) -> TokenLayout:
    """Validate q, k, v [B, H, N, D] and the layout hints; return the :class:`TokenLayout`."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, N, D], got {getattr(t, 'shape', type(t))}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v shapes must match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise TypeError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    for name, val in (("tokens_per_frame", tokens_per_frame), ("num_special", num_special),
                      ("q_block", q_block), ("k_block", k_block)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{name} must be an int, got {val!r}")
    N = q.shape[2]
    if tokens_per_frame <= 0 or N % tokens_per_frame:
        raise ValueError(f"tokens_per_frame={tokens_per_frame} does not divide the sequence length N={N}")
    if not 0 <= num_special < tokens_per_frame:
        raise ValueError(f"num_special={num_special} must be in [0, tokens_per_frame={tokens_per_frame})")
    if q_block <= 0 or k_block <= 0:
        raise ValueError(f"block sizes must be positive, got q_block={q_block}, k_block={k_block}")
    return TokenLayout(N // tokens_per_frame, tokens_per_frame, num_special, q_block, k_block)


class BlockTokens:
    """q, k, v [B, H, N, D] with their block-friendly copies, made lazily, once (module docstring).

    Differentiable: the copies are slice assignments that autograd tracks.
    """

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout) -> None:
        self.q, self.k, self.v, self.layout = q, k, v, layout
        tracked = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        self.reuse = q.device.type == "cpu" and not tracked  # copies may live in the workspace

    def _serial(self):
        """Memory-bound copies: one thread on CPU is as fast and robust to a loaded machine."""
        return intra_op_threads(1 if self.q.device.type == "cpu" else torch.get_num_threads())

    def new(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """An uninitialised tensor like q: a workspace buffer when :attr:`reuse`, else fresh."""
        return workspace(name, shape, self.q) if self.reuse else self.q.new_empty(shape)

    def _frames(self, x: Tensor) -> Tensor:
        B, H, _, D = x.shape
        return x.view(B, H, self.layout.num_frames, self.layout.tokens_per_frame, D)  # [B, H, S, P, D]

    def _patch_into(self, dst: Tensor, x: Tensor) -> None:
        """dst [B, H, N_p, D] ← the patch tokens of x, frame-major."""
        lay = self.layout
        dst.view(*dst.shape[:2], lay.num_frames, lay.tokens_per_frame - lay.num_special, -1).copy_(
            self._frames(x)[:, :, :, lay.num_special :])

    @cached_property
    def q_rows(self) -> Tensor:
        """[B, H, n_q·q_block, D] patch queries followed by zero rows."""
        lay = self.layout
        B, H, _, D = self.q.shape
        rows = self.new("q_rows", (B, H, lay.n_q * lay.q_block, D))
        with self._serial():
            self._patch_into(rows[:, :, : lay.num_patch], self.q)
            rows[:, :, lay.num_patch :] = 0
        return rows

    def _table(self, x: Tensor, name: str) -> Tensor:
        lay = self.layout
        B, H, _, D = x.shape
        start = lay.n_sink * lay.k_block  # first patch row
        table = self.new(name, (B, H, (lay.n_sink + lay.n_k) * lay.k_block, D))
        with self._serial():
            table[:, :, : lay.front] = 0
            table[:, :, lay.front : start].view(B, H, lay.num_frames, lay.num_special, D).copy_(
                self._frames(x)[:, :, :, : lay.num_special])
            self._patch_into(table[:, :, start : start + lay.num_patch], x)
            table[:, :, start + lay.num_patch :] = 0
        return table

    @cached_property
    def k_table(self) -> Tensor:
        """[B, H, (n_sink + n_k)·k_block, D] (module docstring)."""
        return self._table(self.k, "k_table")

    @cached_property
    def v_table(self) -> Tensor:
        """[B, H, (n_sink + n_k)·k_block, D], the values laid out as ``k_table``."""
        return self._table(self.v, "v_table")

    def _patch_view(self, table: Tensor) -> Tensor:
        start = self.layout.n_sink * self.layout.k_block
        return table[:, :, start : start + self.layout.num_patch]

    @property
    def q_patch(self) -> Tensor:
        """[B, H, N_p, D] (a view)."""
        return self.q_rows[:, :, : self.layout.num_patch]

    @property
    def k_patch(self) -> Tensor:
        """[B, H, N_p, D] (a view)."""
        return self._patch_view(self.k_table)

    @property
    def v_patch(self) -> Tensor:
        return self._patch_view(self.v_table)

    @property
    def k_special(self) -> Tensor:
        """[B, H, S·n_s, D] (a view)."""
        return self.k_table[:, :, self.layout.front : self.layout.n_sink * self.layout.k_block]

    @property
    def v_special(self) -> Tensor:
        return self.v_table[:, :, self.layout.front : self.layout.n_sink * self.layout.k_block]

    @cached_property
    def q_special(self) -> Tensor:
        """[B, H, S·n_s, D] special queries."""
        B, H, _, D = self.q.shape
        return self._frames(self.q)[:, :, :, : self.layout.num_special].reshape(B, H, -1, D)

    def merge(self, out_patch: Tensor, out_special: Tensor) -> Tensor:
        """out_patch [B, H, N_p, D], out_special [B, H, S·n_s, D] → [B, H, N, D] frame-major."""
        lay = self.layout
        B, H, _, D = out_patch.shape
        S = lay.num_frames
        with self._serial():
            out = torch.cat([out_special.reshape(B, H, S, lay.num_special, D), out_patch.reshape(B, H, S, -1, D)], 3)
        return out.view(B, H, S * lay.tokens_per_frame, D)
