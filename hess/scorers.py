"""Model-based head scorers: head importance (Michel et al. 2019), attention entropy, and the oracle.

Each wraps ``Attention.core`` of every global layer (the seam of ``hess.models.layers``) for the duration
of the measurement and restores the original cores afterwards, even on error.  They are registered in
``hess.scoring.SCORERS``; this module holds the measurements themselves and imports no other scorer code.

All three take ``error_fn(model, scene) -> Tensor []``: the scalar calibration error of one scene
(``hess.calibrate.calibration_error_fn`` builds the HeSS one), so they measure the same objective as HeSS.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from hess.models.layers import Attention

ErrorFn = Callable[[nn.Module, Any], Tensor]
ForwardFn = Callable[[nn.Module, Any], Any]


def default_forward(model: nn.Module, scene: Any) -> Any:
    """Dense forward of one scene: ``model(scene.images[None])`` on the model's device."""
    device = next(model.parameters()).device
    return model(scene.images[None].to(device))


@contextmanager
def wrapped_cores(layers: Sequence[Attention], make: Callable[[int, nn.Module], nn.Module]) -> Iterator[list[nn.Module]]:
    """Temporarily replace ``layers[l].core`` by ``make(l, original_core)``; restores them on exit."""
    originals = [attn.core for attn in layers]
    try:
        for l, attn in enumerate(layers):
            attn.core = make(l, attn.core)
        yield [attn.core for attn in layers]
    finally:
        for attn, core in zip(layers, originals):
            attn.core = core


@contextmanager
def grad_only_for(model: nn.Module, params: Sequence[Tensor] = ()) -> Iterator[None]:
    """Within the block only ``params`` require grad, and the model is in eval mode; both restored after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    keep = {id(p) for p in params}
    try:
        model.eval()
        for p in flags:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)


class GatedCore(nn.Module):
    """``inner(q, k, v) * gate[h]``: a per-head gate ξ on the attention output, ones requiring grad.

    The gate is a plain tensor, not a Parameter, so wrapping never adds state_dict keys.
    Args (forward): q, k, v: [B, H, N, D] → [B, H, N, D].
    """

    def __init__(self, inner: nn.Module, num_heads: int, device: torch.device) -> None:
        super().__init__()
        self.inner = inner
        self.gate = torch.ones(num_heads, device=device, requires_grad=True)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, **core_kwargs) -> Tensor:
        out = self.inner(q, k, v, **core_kwargs)
        return out * self.gate.to(out.dtype)[None, :, None, None]


class EntropyCore(nn.Module):
    """Passes ``inner``'s output through and accumulates the mean attention entropy (nats) per head.

    Attention probabilities ``softmax(q kᵀ / √D)`` are recomputed in float32 in query chunks, over all
    queries (special and patch) and all keys.  Args (forward): q, k, v: [B, H, N, D] → [B, H, N, D].
    """

    def __init__(self, inner: nn.Module, num_heads: int, chunk: int = 1024) -> None:
        super().__init__()
        self.inner = inner
        self.chunk = chunk
        self.entropy_sum = torch.zeros(num_heads, dtype=torch.float64)
        self.count = 0

    def forward(self, q: Tensor, k: Tensor, v: Tensor, **core_kwargs) -> Tensor:
        out = self.inner(q, k, v, **core_kwargs)
        with torch.no_grad():
            kf = k.float()
            for start in range(0, q.shape[2], self.chunk):
                logits = q[:, :, start : start + self.chunk].float() @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
                logp = logits.log_softmax(dim=-1)  # [B, H, n, N]
                ent = -(logp.exp() * logp).sum(dim=-1)  # [B, H, n]
                self.entropy_sum += ent.sum(dim=(0, 2)).double().cpu()
            self.count += q.shape[0] * q.shape[2]
        return out


def global_layers(model: nn.Module) -> list[Attention]:
    """``model.global_attention_layers()``, checked: a hess model with at least one global layer."""
    if not hasattr(model, "global_attention_layers"):
        raise TypeError(f"{type(model).__name__} has no global_attention_layers(); it is not a hess model")
    layers = list(model.global_attention_layers())
    if not layers:
        raise ValueError("model.global_attention_layers() is empty")
    return layers


def _check_scenes(scenes: Sequence[Any]) -> None:
    if len(scenes) == 0:
        raise ValueError("scorers need at least one scene")


def head_importance(model: nn.Module, scenes: Sequence[Any], error_fn: ErrorFn) -> Tensor:
    """Michel et al. (2019) head importance ``I_h = mean_scenes |∂e / ∂ξ_h|`` at ξ = 1.

    Args:
        model: a hess model (``global_attention_layers()``); its parameters are frozen during scoring.
        scenes: calibration scenes passed to ``error_fn``.
        error_fn: ``(model, scene) -> []`` differentiable calibration error.
    Returns:
        [L, H] float64, non-negative.
    """
    _check_scenes(scenes)
    layers = global_layers(model)
    device = layers[0].qkv.weight.device
    total = torch.zeros(len(layers), layers[0].num_heads, dtype=torch.float64)
    with grad_only_for(model), wrapped_cores(layers, lambda l, c: GatedCore(c, layers[l].num_heads, device)) as cores:
        gates = [core.gate for core in cores]
        for scene in scenes:
            error = error_fn(model, scene)
            if not error.requires_grad:  # e.g. an empty inlier set: no signal from this scene
                continue
            grads = torch.autograd.grad(error, gates, allow_unused=True)
            total += torch.stack([(g if g is not None else torch.zeros_like(x)).abs().double().cpu()
                                  for g, x in zip(grads, gates)])
    return total / len(scenes)


def attention_entropy(model: nn.Module, scenes: Sequence[Any], forward_fn: ForwardFn = default_forward) -> Tensor:
    """Mean attention entropy (nats) per global head over all queries of all scenes; no gradients.

    Diffuse heads (high entropy) lose more mass to block selection, so a higher value means more budget.
    Returns:
        [L, H] float64 in [0, log N].
    """
    _check_scenes(scenes)
    layers = global_layers(model)
    with grad_only_for(model), torch.no_grad(), wrapped_cores(layers, lambda l, c: EntropyCore(c, layers[l].num_heads)) as cores:
        for scene in scenes:
            forward_fn(model, scene)
        return torch.stack([core.entropy_sum / max(core.count, 1) for core in cores])


class OneHeadSparseCore(nn.Module):
    """Dense attention for every head except ``head``, which keeps ``c`` of its n_k patch key blocks.

    ``c = max(min_blocks, floor(n_k * keep_ratio))`` (the rule of ``hess.budget.base_blocks``) with n_k from
    the sequence layout.  Args (forward): q, k, v: [B, H, N, D], ``tokens_per_frame``, ``num_special`` →
    [B, H, N, D].
    """

    def __init__(self, inner: nn.Module, head: int, keep_ratio: float, min_blocks: int = 1,
                 q_block: int = 128, k_block: int = 64, backend: str = "auto") -> None:
        super().__init__()
        self.inner, self.head, self.keep_ratio = inner, head, keep_ratio
        self.min_blocks, self.q_block, self.k_block, self.backend = min_blocks, q_block, k_block, backend

    def forward(self, q: Tensor, k: Tensor, v: Tensor, **core_kwargs) -> Tensor:
        from hess.attention import head_sparse_attention

        P, n_s = core_kwargs["tokens_per_frame"], core_kwargs["num_special"]
        num_patches = (q.shape[2] // P) * (P - n_s)
        n_k = math.ceil(num_patches / self.k_block)
        c = min(n_k, max(self.min_blocks, math.floor(n_k * self.keep_ratio + 1e-9)))
        out = self.inner(q, k, v, **core_kwargs).clone()
        h = slice(self.head, self.head + 1)
        blocks = torch.full((1,), c, dtype=torch.int64, device=q.device)
        out[:, h] = head_sparse_attention(q[:, h], k[:, h], v[:, h], tokens_per_frame=P, num_special=n_s,
                                          blocks_per_head=blocks, q_block=self.q_block, k_block=self.k_block,
                                          backend=self.backend)
        return out


def oracle_sensitivity(model: nn.Module, scenes: Sequence[Any], error_fn: ErrorFn, keep_ratio: float, *,
                       min_blocks: int = 1, q_block: int = 128, k_block: int = 64, backend: str = "auto",
                       progress: bool = False) -> Tensor:
    """Measured increase of the calibration error when one head alone is sparsified (RQ1 ground truth).

    ``Δ[l, h] = mean_scenes (e(model with head (l, h) at keep_ratio) - e(dense model))``; expensive:
    ``L * H + 1`` forwards per scene.  The error is measured in full (alignment recomputed), no gradients.
    ``q_block`` / ``k_block`` should be those the sparsified model will run with (a budget of c blocks
    of 64 keys is not one of c blocks of 6).
    Returns:
        [L, H] float64; may be slightly negative where sparsifying a head happens to help.
    """
    from tqdm.auto import tqdm

    _check_scenes(scenes)
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    layers = global_layers(model)
    delta = torch.zeros(len(layers), layers[0].num_heads, dtype=torch.float64)
    pairs = [(l, h) for l in range(len(layers)) for h in range(layers[l].num_heads)]
    with grad_only_for(model), torch.no_grad():
        base = torch.tensor([float(error_fn(model, s)) for s in scenes], dtype=torch.float64)
        for l, h in tqdm(pairs, desc="oracle heads", disable=not progress):
            make = lambda _, core: OneHeadSparseCore(core, h, keep_ratio, min_blocks, q_block, k_block,  # noqa: E731
                                                     backend=backend)
            with wrapped_cores([layers[l]], make):
                errs = torch.tensor([float(error_fn(model, s)) for s in scenes], dtype=torch.float64)
            delta[l, h] = (errs - base).mean()
    return delta


PrepareFn = Callable[[nn.Module, Any], Any]
MeasureFn = Callable[[nn.Module, Any], "dict[str, float]"]


def oracle_deltas(model: nn.Module, scenes: Sequence[Any], prepare: PrepareFn, measure: MeasureFn, keep_ratio: float, *,
                  min_blocks: int = 1, q_block: int = 128, k_block: int = 64, backend: str = "auto",
                  progress: bool = False) -> dict[str, Tensor]:
    """The faithful oracle: several errors per head, each against targets fixed by the dense model.

    ``state = prepare(dense model, scene)`` is computed once per scene (e.g. the dense prediction's
    alignment, inlier set and nearest-neighbour targets, ``hess.calibrate.fixed_target_errors``);
    ``measure(model, state) -> {error name: value}`` then scores the dense model and every model with one
    head (l, h) alone at ``keep_ratio``, against that same state, so a head that wrecks the point cloud
    cannot hide it by moving its points out of a re-fitted inlier set.

    Returns:
        error name -> [L, H] float64 ``Δ[l, h] = mean_scenes (measure(head (l, h) sparse) − measure(dense))``.
    """
    from tqdm.auto import tqdm

    _check_scenes(scenes)
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    layers = global_layers(model)
    pairs = [(l, h) for l in range(len(layers)) for h in range(layers[l].num_heads)]
    with grad_only_for(model), torch.no_grad():
        states = [prepare(model, s) for s in scenes]
        base = [measure(model, st) for st in states]
        names = list(base[0])
        delta = {n: torch.zeros(len(layers), layers[0].num_heads, dtype=torch.float64) for n in names}
        for l, h in tqdm(pairs, desc=f"oracle heads (keep {keep_ratio:g})", disable=not progress):
            make = lambda _, core: OneHeadSparseCore(core, h, keep_ratio, min_blocks, q_block, k_block,  # noqa: E731
                                                     backend=backend)
            with wrapped_cores([layers[l]], make):
                errs = [measure(model, st) for st in states]
            for n in names:
                delta[n][l, h] = sum(e[n] - b[n] for e, b in zip(errs, base)) / len(states)
    return delta
