"""VGGT's Aggregator: patch embedding, then alternating frame and global attention (vggt-architecture.md §5).

Token layout of every frame: ``[camera(1), registers(R), patches(P_img)]``, so the special tokens end at
``patch_start_idx = 1 + R`` and a frame holds ``P = 1 + R + P_img`` tokens.  Special tokens come from two
slots: slot 0 for frame 0 of every sequence, slot 1 shared by frames 1..S-1 (the only thing that tells the
reference frame apart).  Frame blocks see ``[B·S, P, C]``; global blocks see the frame-major flattening
``[B, S·P, C]`` and additionally receive the attention-core hints ``tokens_per_frame=P`` and
``num_special=patch_start_idx`` (see ``hess.models.layers``).

Output of ``forward``: a list with one ``[B, S, P, 2C]`` tensor per (frame, global) block pair,
``cat(frame_out_i, global_out_i, -1)``, and ``patch_start_idx``.  ``forward(images, layers=...)``
builds only the listed entries and leaves ``None`` in the others (their block outputs are freed as the
trunk moves on): VGGT's heads read 4 of the 24 (DPT) plus the last (camera), so inference keeps 4 of
24 ``[B, S, P, 2C]`` tensors (``VGGT.head_layers``); ``layers=None`` (the default) keeps every one, as
the official model and the parity fixtures do.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hess.models.dinov2 import DINOV2_VARIANTS, PatchEmbed, build_dinov2
from hess.models.layers import Attention, Block, PositionGetter, RotaryPositionEmbedding2D
from hess.registry import Registry

_RESNET_MEAN = (0.485, 0.456, 0.406)
_RESNET_STD = (0.229, 0.224, 0.225)

# name -> builder(img_size, patch_size, embed_dim, num_register_tokens) -> module returning [B, N, C]
# (or DINOv2's dict with "x_norm_patchtokens").
PATCH_EMBEDS: Registry[Callable[[int, int, int, int], nn.Module]] = Registry("patch embed")


@PATCH_EMBEDS.register("conv")
def _conv_patch_embed(img_size: int, patch_size: int, embed_dim: int, num_register_tokens: int) -> nn.Module:
    return PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim)


def _dinov2_builder(variant: str) -> Callable[[int, int, int, int], nn.Module]:
    def build(img_size: int, patch_size: int, embed_dim: int, num_register_tokens: int) -> nn.Module:
        if DINOV2_VARIANTS[variant]["embed_dim"] != embed_dim:
            raise ValueError(
                f"patch_embed={variant!r} produces {DINOV2_VARIANTS[variant]['embed_dim']}-d tokens "
                f"but the aggregator's embed_dim is {embed_dim}"
            )
        dino = build_dinov2(
            variant, img_size=img_size, patch_size=patch_size, num_register_tokens=num_register_tokens,
            interpolate_antialias=True, interpolate_offset=0.0, block_chunks=0, init_values=1.0,
        )
        dino.mask_token.requires_grad_(False)  # unused at inference; frozen as in the official model
        return dino

    return build


for _variant in DINOV2_VARIANTS:
    PATCH_EMBEDS.register(_variant)(_dinov2_builder(_variant))


def expand_special_tokens(token: Tensor, B: int, S: int) -> Tensor:
    """Slot 0 for frame 0, slot 1 for frames 1..S-1.

    Args:
        token: [1, 2, n, C].
    Returns:
        [B·S, n, C], frame-major within each batch element.
    """
    first = token[:, :1].expand(B, 1, *token.shape[2:])
    rest = token[:, 1:].expand(B, S - 1, *token.shape[2:])
    return torch.cat([first, rest], dim=1).reshape(B * S, *token.shape[2:])


class Aggregator(nn.Module):
    """Alternating-attention trunk of VGGT (official constructor arguments and defaults).

    Args:
        img_size, patch_size: nominal image size and patch size p (images must be multiples of p).
        embed_dim: C.  depth: number of frame blocks (= number of global blocks).
        num_heads, mlp_ratio, qkv_bias, proj_bias, ffn_bias, qk_norm, init_values: block settings.
        num_register_tokens: R.
        patch_embed: a ``PATCH_EMBEDS`` name: ``"dinov2_vitl14_reg"`` (VGGT-1B), other DINOv2 sizes, ``"conv"``.
        aa_order: order of the two attention kinds inside a group, e.g. ``["frame", "global"]``.
        aa_block_size: blocks of each kind per group (a group runs all its frame blocks, then all its
            global blocks, and pairs their outputs index by index).
        rope_freq: RoPE base; ``<= 0`` disables RoPE.
    Gradient checkpointing is the explicit flag ``use_checkpoint`` (default False, independent of
    ``train()``); it also applies to a DINOv2 patch embed.
    """

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_register_tokens: int = 4,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        patch_embed: str = "dinov2_vitl14_reg",
        aa_order: Sequence[str] = ("frame", "global"),
        aa_block_size: int = 1,
        qk_norm: bool = True,
        rope_freq: float = 100,
        init_values: float = 0.01,
    ) -> None:
        super().__init__()
        aa_order = list(aa_order)
        if sorted(aa_order) != ["frame", "global"]:
            raise ValueError(f"aa_order must contain 'frame' and 'global' once each, got {aa_order}")
        if aa_block_size < 1 or depth % aa_block_size:
            raise ValueError(f"depth {depth} is not divisible by aa_block_size {aa_block_size}")
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        self.patch_embed = PATCH_EMBEDS.get(patch_embed)(img_size, patch_size, embed_dim, num_register_tokens)
        self.rope = RotaryPositionEmbedding2D(frequency=rope_freq) if rope_freq > 0 else None
        self.position_getter = PositionGetter() if self.rope is not None else None

        def make_block() -> Block:
            return Block(
                embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias,
                ffn_bias=ffn_bias, init_values=init_values, qk_norm=qk_norm, rope=self.rope,
            )

        self.frame_blocks = nn.ModuleList(make_block() for _ in range(depth))
        self.global_blocks = nn.ModuleList(make_block() for _ in range(depth))
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_size = patch_size
        self.aa_order = aa_order
        self.aa_block_size = aa_block_size
        self.aa_block_num = depth // aa_block_size
        self.num_register_tokens = num_register_tokens
        self.patch_start_idx = 1 + num_register_tokens
        self.camera_token = nn.Parameter(torch.empty(1, 2, 1, embed_dim))
        self.register_token = nn.Parameter(torch.empty(1, 2, num_register_tokens, embed_dim))
        nn.init.normal_(self.camera_token, std=1e-6)
        nn.init.normal_(self.register_token, std=1e-6)
        self.init_buffers()
        self._use_checkpoint = False

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)create the non-persistent ImageNet mean/std buffers ``[1, 1, 3, 1, 1]`` (e.g. after a meta build)."""
        for name, value in (("_resnet_mean", _RESNET_MEAN), ("_resnet_std", _RESNET_STD)):
            self.register_buffer(name, torch.tensor(value, device=device).view(1, 1, 3, 1, 1), persistent=False)

    @property
    def use_checkpoint(self) -> bool:
        return self._use_checkpoint

    @use_checkpoint.setter
    def use_checkpoint(self, value: bool) -> None:
        self._use_checkpoint = bool(value)
        if hasattr(self.patch_embed, "use_checkpoint"):
            self.patch_embed.use_checkpoint = bool(value)

    def global_attention_layers(self) -> list[Attention]:
        """The attention module of every global block, in order."""
        return [blk.attn for blk in self.global_blocks]

    def embed_patches(self, images: Tensor) -> Tensor:
        """images: [B, S, 3, H, W] in [0, 1] → patch tokens [B·S, (H/p)(W/p), C] (ImageNet-normalised input)."""
        B, S, C_in, H, W = images.shape
        mean, std = self._resnet_mean.to(images.dtype), self._resnet_std.to(images.dtype)
        x = ((images - mean) / std).reshape(B * S, C_in, H, W)
        weight_dtype = self.camera_token.dtype  # a bf16/fp16 model takes fp32 images: normalise, then cast
        tokens = self.patch_embed(x if torch.is_autocast_enabled(x.device.type) else x.to(weight_dtype))
        return tokens["x_norm_patchtokens"] if isinstance(tokens, dict) else tokens

    def _positions(self, B: int, S: int, H: int, W: int, device: torch.device) -> Tensor | None:
        """[B·S, P, 2] integer (y, x): specials at (0, 0), patch (row, col) shifted by +1."""
        if self.position_getter is None:
            return None
        pos = self.position_getter(B * S, H // self.patch_size, W // self.patch_size, device) + 1
        special = torch.zeros(B * S, self.patch_start_idx, 2, device=device, dtype=pos.dtype)
        return torch.cat([special, pos], dim=1)

    def _run(self, block: nn.Module, x: Tensor, **kwargs) -> Tensor:
        if self._use_checkpoint and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False, **kwargs)
        return block(x, **kwargs)

    def _attend(self, kind: str, tokens: Tensor, pos: Tensor | None, B: int, S: int, start: int) -> list[Tensor]:
        """Run ``aa_block_size`` blocks of one kind from index ``start``; returns their outputs [B, S, P, C]."""
        _, _, P, C = tokens.shape
        outs = []
        if kind == "frame":
            x = tokens.reshape(B * S, P, C)
            for i in range(start, start + self.aa_block_size):
                x = self._run(self.frame_blocks[i], x, pos=pos)
                outs.append(x.view(B, S, P, C))
        else:
            x = tokens.reshape(B, S * P, C)  # frame-major: all of frame 0, then frame 1, ...
            gpos = None if pos is None else pos.reshape(B, S * P, 2)
            for i in range(start, start + self.aa_block_size):
                x = self._run(
                    self.global_blocks[i], x, pos=gpos, tokens_per_frame=P, num_special=self.patch_start_idx
                )
                outs.append(x.view(B, S, P, C))
        return outs

    def forward(
        self, images: Tensor, layers: Optional[Iterable[int]] = None
    ) -> tuple[list[Optional[Tensor]], int]:
        """images: [B, S, 3, H, W] in [0, 1] → (``depth`` entries [B, S, P, 2C], patch_start_idx).

        ``layers``: indices (negative ones count from the end) of the entries to build; the others are
        ``None``.  ``None`` (default): all ``depth`` entries.
        """
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be [B, S, 3, H, W], got {tuple(images.shape)}")
        keep = self._kept_layers(layers)
        B, S, _, H, W = images.shape
        patches = self.embed_patches(images)  # [B*S, P_img, C]
        camera = expand_special_tokens(self.camera_token, B, S).to(patches.dtype)
        registers = expand_special_tokens(self.register_token, B, S).to(patches.dtype)
        tokens = torch.cat([camera, registers, patches], dim=1)  # [B*S, P, C]
        P, C = tokens.shape[1:]
        tokens = tokens.view(B, S, P, C)
        pos = self._positions(B, S, H, W, images.device)

        output: list[Optional[Tensor]] = []
        for group in range(self.aa_block_num):
            start = group * self.aa_block_size
            outs: dict[str, list[Tensor]] = {}
            for kind in self.aa_order:
                outs[kind] = self._attend(kind, tokens, pos, B, S, start)
                tokens = outs[kind][-1]
            output.extend(
                torch.cat([f, g], dim=-1) if start + i in keep else None
                for i, (f, g) in enumerate(zip(outs["frame"], outs["global"]))
            )
            del outs  # unkept block outputs are freed here (autograd keeps what backward needs)
        return output, self.patch_start_idx

    def _kept_layers(self, layers: Optional[Iterable[int]]) -> frozenset[int]:
        if layers is None:
            return frozenset(range(self.depth))
        kept = set()
        for i in layers:
            if not isinstance(i, int) or isinstance(i, bool) or not -self.depth <= i < self.depth:
                raise ValueError(f"aggregator layers must be integers in [-{self.depth}, {self.depth}), got {i!r}")
            kept.add(i % self.depth)
        return frozenset(kept)
