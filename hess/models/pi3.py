"""π³ (``yyfz/Pi3``): permutation-equivariant visual geometry, state-dict compatible with ``yyfz233/Pi3``.

Structure (vggt-architecture.md §16; fixture README ``pi3_parity_a``)::

    images [B, N, 3, H, W] in [0, 1] ──ImageNet norm──► encoder (DINOv2 ViT-L/14-reg, per frame)
      └─ x_norm_patchtokens [B·N, hw, C]
    decoder input per frame: [register_token ×5 (shared by every frame), patches]  → P = 5 + hw
    decoder.{i}: even i = frame attention [B·N, P, C]; odd i = global attention [B, N·P, C] (frame-major)
    hidden = cat(out of decoder[L-2], out of decoder[L-1]) [B·N, P, 2C]
    point / conf / camera decoders (per frame) → LinearPts3d / LinearPts3d / CameraHead

There is no camera token, no reference-frame slot and no frame index in the positions, so permuting the
input frames permutes every output.  The transformer blocks are the shared ``hess.models.layers.Block``
(same ``Attention`` seam as VGGT) and the encoder is ``hess.models.dinov2.DinoVisionTransformer``.

Configuration format (that of ``fixtures/pi3_parity_a/config.json``): sections ``encoder``, ``decoder``,
``point_decoder``, ``conf_decoder`` (default: same as ``point_decoder``), ``point_head``, ``conf_head``,
``camera_decoder``, ``camera_head`` with the official constructor arguments, plus ``patch_size``,
``pos_type`` (``"rope<base>"``) and ``num_register_tokens``.  A missing section takes the official
default; unknown sections or arguments raise ``ValueError``; descriptive fields are ignored.  The
official ``Pi3(pos_type, decoder_size)`` keyword form is accepted too.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import json
from functools import partial
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hess.models.inputs import check_images
from hess.models.dinov2 import DinoVisionTransformer
from hess.models.layers import Attention, Block, PositionGetter, RotaryPositionEmbedding2D
from hess.models.pi3_heads import LAYER_NORM_EPS, CameraHead, LinearPts3d, TransformerDecoder, estimate_intrinsics
from hess.models.pose import closed_form_inverse_se3

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

_ENCODER_L = dict(
    img_size=518, patch_size=14, in_chans=3, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4,
    qkv_bias=True, ffn_bias=True, proj_bias=True, drop_path_rate=0.0, drop_path_uniform=False,
    init_values=1.0, ffn_layer="mlp", block_chunks=0, num_register_tokens=4,
    interpolate_antialias=True, interpolate_offset=0.0,
)


def _head_decoder(in_dim: int, out_dim: int, dim: int, depth: int, heads: int) -> dict[str, Any]:
    return dict(in_dim=in_dim, out_dim=out_dim, dec_embed_dim=dim, depth=depth, dec_num_heads=heads,
                mlp_ratio=4, need_project=True, use_checkpoint=False)


PI3_PRESETS: dict[str, dict[str, Any]] = {
    # Pi3() with its official defaults (checkpoint yyfz233/Pi3): 958,696,732 parameters.
    "pi3": {
        "patch_size": 14, "pos_type": "rope100", "num_register_tokens": 5,
        "encoder": dict(_ENCODER_L),
        "decoder": dict(dec_embed_dim=1024, dec_num_heads=16, mlp_ratio=4, dec_depth=36),
        "point_decoder": _head_decoder(2048, 1024, 1024, 5, 16),
        "point_head": dict(patch_size=14, dec_embed_dim=1024, output_dim=3),
        "conf_head": dict(patch_size=14, dec_embed_dim=1024, output_dim=1),
        "camera_decoder": _head_decoder(2048, 512, 1024, 5, 16),
        "camera_head": dict(dim=512),
    },
    # fixtures/pi3_parity_a/config.json (tiny random-weight model assembled from the official classes).
    "pi3-parity-a": {
        "patch_size": 14, "pos_type": "rope100", "num_register_tokens": 5,
        "encoder": {**_ENCODER_L, "embed_dim": 64, "depth": 2, "num_heads": 4},
        "decoder": dict(dec_embed_dim=64, dec_num_heads=4, mlp_ratio=4, dec_depth=6),
        "point_decoder": _head_decoder(128, 64, 64, 2, 4),
        "point_head": dict(patch_size=14, dec_embed_dim=64, output_dim=3),
        "conf_head": dict(patch_size=14, dec_embed_dim=64, output_dim=1),
        "camera_decoder": _head_decoder(128, 32, 64, 2, 4),
        "camera_head": dict(dim=32),
    },
}

SECTIONS = ("encoder", "decoder", "point_decoder", "conf_decoder", "point_head", "conf_head",
            "camera_decoder", "camera_head")
TOP_LEVEL_KEYS = ("patch_size", "pos_type", "num_register_tokens")
CONFIG_METADATA_KEYS = frozenset({
    "name", "model", "notes", "description", "inputs", "seed_init", "seed_inputs", "official_source",
    "patch_start_idx", "tokens_per_frame", "dtype", "torch_version", "point_head_scale", "rot_bias",
    "frame_block_index", "global_block_index", "permutation",
})
_DECODER_KEYS = ("dec_embed_dim", "dec_num_heads", "mlp_ratio", "dec_depth")
_ENCODER_INFO_KEYS = ("block_fn",)  # descriptive strings in the fixture config, not arguments


def _rope_base(pos_type: str) -> float:
    if not isinstance(pos_type, str) or not pos_type.startswith("rope"):
        raise ValueError(f"pos_type must be 'rope<base>' (official: 'rope100'), got {pos_type!r}")
    try:
        return float(pos_type[4:])
    except ValueError:
        raise ValueError(f"pos_type {pos_type!r}: cannot read the RoPE base after 'rope'") from None


def _check_keys(section: str, given: dict, allowed: Any) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} in π³ config section '{section}'; known: {', '.join(allowed)}")


def _signature_keys(fn: Any) -> list[str]:
    return [n for n in inspect.signature(fn).parameters if n != "self"]


def resolve_config(config: Union[dict, str, Path]) -> tuple[dict[str, Any], str]:
    """Preset name, JSON path or dict → (complete validated config, model_id).  See module docstring."""
    model_id = "pi3-custom"
    if isinstance(config, (str, Path)):
        if str(config) in PI3_PRESETS:
            model_id = str(config)
            config = PI3_PRESETS[model_id]
        elif str(config).endswith(".json") and Path(config).is_file():
            config = json.loads(Path(config).read_text())
        else:
            raise KeyError(f"unknown π³ preset {str(config)!r}; known: {', '.join(sorted(PI3_PRESETS))}")
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, a preset name or a .json path, got {type(config).__name__}")
    config = copy.deepcopy(config)
    if "decoder_size" in config:  # official Pi3(pos_type, decoder_size) keywords (e.g. a HF config.json)
        if config.pop("decoder_size") != "large":
            raise ValueError("decoder_size must be 'large': the ViT-L encoder has no projection to other widths")
    unknown = sorted(set(config) - set(SECTIONS) - set(TOP_LEVEL_KEYS) - CONFIG_METADATA_KEYS)
    if unknown:
        raise ValueError(f"unknown π³ config key(s) {unknown}; sections: {', '.join(SECTIONS + TOP_LEVEL_KEYS)}")
    default = PI3_PRESETS["pi3"]
    cfg: dict[str, Any] = {k: config.get(k, default[k]) for k in TOP_LEVEL_KEYS}
    for section in SECTIONS:
        given = config.get(section, config.get("point_decoder") if section == "conf_decoder" else None)
        if given is None:
            given = default["point_decoder" if section == "conf_decoder" else section]
        if not isinstance(given, dict):
            raise TypeError(f"config['{section}'] must be a dict, got {type(given).__name__}")
        cfg[section] = {**default["decoder"], **given} if section == "decoder" else dict(given)
    _check_keys("encoder", cfg["encoder"], _signature_keys(DinoVisionTransformer.__init__) + list(_ENCODER_INFO_KEYS))
    cfg["encoder"] = {k: v for k, v in cfg["encoder"].items() if k not in _ENCODER_INFO_KEYS}
    _check_keys("decoder", cfg["decoder"], _DECODER_KEYS)
    for s in ("point_decoder", "conf_decoder", "camera_decoder"):
        _check_keys(s, cfg[s], _signature_keys(TransformerDecoder.__init__) + ["use_checkpoint"])
    for s in ("point_head", "conf_head"):
        _check_keys(s, cfg[s], _signature_keys(LinearPts3d.__init__))
    _check_keys("camera_head", cfg["camera_head"], _signature_keys(CameraHead.__init__))
    _check_consistency(cfg, config)
    if model_id == "pi3-custom" and config.get("name"):
        model_id = str(config["name"])
    return cfg, model_id


def _check_consistency(cfg: dict[str, Any], raw: dict[str, Any]) -> None:
    """Widths that must agree between sections (there is no projection between encoder and decoder)."""
    _rope_base(cfg["pos_type"])
    enc, dec = cfg["encoder"], cfg["decoder"]
    C, depth, R = dec["dec_embed_dim"], dec["dec_depth"], cfg["num_register_tokens"]
    enc_dim, enc_patch = enc.get("embed_dim", 1024), enc.get("patch_size", 14)
    checks = [
        (enc_dim == C, f"encoder embed_dim {enc_dim} != decoder dec_embed_dim {C}"),
        (enc_patch == cfg["patch_size"], f"encoder patch_size {enc_patch} != patch_size {cfg['patch_size']}"),
        (depth >= 2, f"decoder dec_depth must be >= 2 (the output joins the last two blocks), got {depth}"),
        (R >= 0, f"num_register_tokens must be >= 0, got {R}"),
        (raw.get("patch_start_idx", R) == R, f"patch_start_idx {raw.get('patch_start_idx')} != num_register_tokens {R}"),
    ]
    for name in ("point_decoder", "conf_decoder", "camera_decoder"):
        in_dim = cfg[name].get("in_dim")
        checks.append((in_dim == 2 * C, f"{name} in_dim {in_dim} != 2 * dec_embed_dim = {2 * C}"))
    for dec_name, head_name, key in (("point_decoder", "point_head", "dec_embed_dim"),
                                     ("conf_decoder", "conf_head", "dec_embed_dim"),
                                     ("camera_decoder", "camera_head", "dim")):
        out_dim, head_dim = cfg[dec_name].get("out_dim"), cfg[head_name].get(key)
        checks.append((out_dim == head_dim, f"{dec_name} out_dim {out_dim} != {head_name} {key} {head_dim}"))
        if head_name != "camera_head":
            p = cfg[head_name].get("patch_size", cfg["patch_size"])
            checks.append((p == cfg["patch_size"], f"{head_name} patch_size {p} != patch_size {cfg['patch_size']}"))
    for ok, message in checks:
        if not ok:
            raise ValueError(f"inconsistent π³ config: {message}")


def _build_encoder(enc: dict[str, Any]) -> DinoVisionTransformer:
    encoder = DinoVisionTransformer(**enc)
    del encoder.mask_token  # Pi3.__init__ deletes it: not a checkpoint key
    return encoder


class Pi3(nn.Module):
    """π³: ``images → points, local_points, conf, camera_poses`` (official output dict).

    Attributes follow ``Pi3.__init__``, so the key set is the official one (the order differs only inside
    decoder attention, where hess's shared ``Attention`` lists q/k-norm before ``proj``).  Seams shared
    with VGGT:
    ``global_attention_layers()``, ``num_special_tokens``, ``model_id``, ``use_checkpoint``,
    ``geometry(predictions)``.
    """

    def __init__(self, config: dict[str, Any], model_id: str = "pi3-custom") -> None:
        super().__init__()
        cfg = config
        dec = cfg["decoder"]
        C, heads = dec["dec_embed_dim"], dec["dec_num_heads"]
        self.encoder = _build_encoder(cfg["encoder"])
        self.patch_size = cfg["patch_size"]
        self.pos_type = cfg["pos_type"]
        self.rope = RotaryPositionEmbedding2D(frequency=_rope_base(self.pos_type))
        self.position_getter = PositionGetter()
        self.decoder = nn.ModuleList(
            Block(C, heads, mlp_ratio=dec.get("mlp_ratio", 4), init_values=0.01,
                  norm_layer=partial(nn.LayerNorm, eps=LAYER_NORM_EPS), qk_norm=True, rope=self.rope)
            for _ in range(dec["dec_depth"])
        )
        self.dec_embed_dim = C
        self.patch_start_idx = cfg["num_register_tokens"]
        self.register_token = nn.Parameter(torch.empty(1, 1, self.patch_start_idx, C))
        nn.init.normal_(self.register_token, std=1e-6)

        def head_decoder(section: str) -> TransformerDecoder:
            kwargs = {k: v for k, v in cfg[section].items() if k != "use_checkpoint"}
            return TransformerDecoder(**kwargs, rope=self.rope)

        self.point_decoder = head_decoder("point_decoder")
        self.point_head = LinearPts3d(**cfg["point_head"])
        self.conf_decoder = head_decoder("conf_decoder")
        self.conf_head = LinearPts3d(**cfg["conf_head"])
        self.camera_decoder = head_decoder("camera_decoder")
        self.camera_head = CameraHead(**cfg["camera_head"])
        self.register_buffer("image_mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("image_std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))
        self.model_id = model_id
        self.config = cfg
        self._use_checkpoint = False

    # ---- seams shared with VGGT -------------------------------------------------------------------
    @property
    def num_special_tokens(self) -> int:
        """Register tokens at the start of every frame (= ``patch_start_idx``, 5 for π³)."""
        return self.patch_start_idx

    def global_attention_layers(self) -> list[Attention]:
        """The ``.attn`` of the odd (cross-frame) decoder blocks, in order."""
        return [blk.attn for i, blk in enumerate(self.decoder) if i % 2 == 1]

    @property
    def use_checkpoint(self) -> bool:
        """Gradient checkpointing of encoder and decoder blocks (explicit flag, independent of ``train()``)."""
        return self._use_checkpoint

    @use_checkpoint.setter
    def use_checkpoint(self, value: bool) -> None:
        self._use_checkpoint = self.encoder.use_checkpoint = bool(value)

    # ---- forward ----------------------------------------------------------------------------------
    def _check_images(self, images: Tensor) -> Tensor:
        return check_images(images, self.patch_size, "π³", frames="N")

    def _run(self, block: nn.Module, x: Tensor, **kwargs) -> Tensor:
        if self._use_checkpoint and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False, **kwargs)
        return block(x, **kwargs)

    def encode(self, images: Tensor) -> Tensor:
        """images: [B, N, 3, H, W] in [0, 1] → patch tokens [B·N, h·w, C] (``x_norm_patchtokens``)."""
        B, N, _, H, W = images.shape
        x = ((images - self.image_mean) / self.image_std).reshape(B * N, 3, H, W)
        return self.encoder(x)["x_norm_patchtokens"]

    def positions(self, batch_frames: int, height: int, width: int, device: torch.device) -> Tensor:
        """[B·N, P, 2] integer (y, x): registers (0, 0), patch (row, col) → (row + 1, col + 1).

        As in the official ``Pi3.decode``, the +1 shift applies only when there are register tokens.
        """
        p = self.patch_size
        pos = self.position_getter(batch_frames, height // p, width // p, device)
        pos = pos + 1 if self.patch_start_idx > 0 else pos
        special = torch.zeros(batch_frames, self.patch_start_idx, 2, device=device, dtype=pos.dtype)
        return torch.cat([special, pos], dim=1)

    def decode(self, patch_tokens: Tensor, num_frames: int, height: int, width: int) -> tuple[Tensor, Tensor]:
        """Alternating frame / global attention over ``[registers, patches]`` of every frame.

        Args:
            patch_tokens: [B·N, h·w, C].
            num_frames: N.  height, width: image size in pixels.
        Returns:
            hidden [B·N, P, 2C] = cat(out of ``decoder[L-2]``, out of ``decoder[L-1]``), pos [B·N, P, 2].
        """
        BN, _, C = patch_tokens.shape
        B, N = BN // num_frames, num_frames
        registers = self.register_token.to(patch_tokens.dtype).expand(B * N, -1, -1, -1).flatten(0, 1)  # [B·N, 5, C]
        x = torch.cat([registers, patch_tokens], dim=1)  # [B·N, P, C]
        P = x.shape[1]
        pos = self.positions(BN, height, width, x.device)
        global_pos = pos.reshape(B, N * P, 2)
        last: list[Tensor] = []
        L = len(self.decoder)
        for i, block in enumerate(self.decoder):
            if i % 2 == 0:  # frame attention
                x = self._run(block, x.reshape(BN, P, C), pos=pos)
            else:  # global attention, frame-major [B, N·P, C]
                x = self._run(block, x.reshape(B, N * P, C), pos=global_pos,
                              tokens_per_frame=P, num_special=self.patch_start_idx)
            if i >= L - 2:
                last.append(x.reshape(BN, P, C))
        return torch.cat(last, dim=-1), pos

    def predict(self, hidden: Tensor, pos: Tensor, num_frames: int, height: int, width: int) -> dict[str, Tensor]:
        """Head decoders and heads: hidden [B·N, P, 2C], pos [B·N, P, 2] → the official output dict."""
        BN, H, W, N = hidden.shape[0], height, width, num_frames
        B, s = BN // N, self.patch_start_idx
        point_h = self.point_decoder(hidden, pos=pos)
        conf_h = self.conf_decoder(hidden, pos=pos)
        camera_h = self.camera_decoder(hidden, pos=pos)
        # Official: heads with CUDA autocast off, inputs cast up (here: any device, the heads' parameter dtype).
        with torch.autocast(hidden.device.type, enabled=False):
            head_dtype = self.point_head.proj.weight.dtype
            raw = self.point_head(point_h[:, s:].to(head_dtype), (H, W)).reshape(B, N, H, W, 3)
            xy, log_z = raw.split([2, 1], dim=-1)
            z = torch.exp(log_z)
            local_points = torch.cat([xy * z, z], dim=-1)  # [B, N, H, W, 3] camera frame
            conf = self.conf_head(conf_h[:, s:].to(head_dtype), (H, W)).reshape(B, N, H, W, 1)
            poses = self.camera_head(camera_h[:, s:].to(head_dtype)).reshape(B, N, 4, 4)  # camera-to-world
            homogeneous = torch.cat([local_points, torch.ones_like(z)], dim=-1)
            points = torch.einsum("bnij,bnhwj->bnhwi", poses, homogeneous)[..., :3]
        return {"points": points, "local_points": local_points, "conf": conf, "camera_poses": poses}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Run π³.

        Args:
            images: [N, 3, H, W] or [B, N, 3, H, W] in [0, 1]; H, W multiples of the patch size (14).
        Returns:
            ``points [B, N, H, W, 3]`` world frame (shared, learned; no reference camera),
            ``local_points [B, N, H, W, 3]`` camera frame ``(x·z, y·z, z)``,
            ``conf [B, N, H, W, 1]`` raw logits (``sigmoid`` gives the probability),
            ``camera_poses [B, N, 4, 4]`` camera-to-world ``[[R, t], [0, 0, 0, 1]]``.
        """
        images = self._check_images(images)
        _, N, _, H, W = images.shape
        hidden, pos = self.decode(self.encode(images), N, H, W)
        return self.predict(hidden, pos, N, H, W)

    def geometry(self, predictions: dict[str, Tensor], image_size_hw: Optional[tuple[int, int]] = None) -> dict[str, Tensor]:
        """Map π³'s outputs to the fields shared by every model in hess (differentiable).

        Args:
            predictions: output of ``forward``.
            image_size_hw: accepted for signature compatibility with ``VGGT.geometry``; when given it must
                equal the (H, W) of the predicted maps.
        Returns:
            ``extrinsics [B, S, 3, 4]`` OpenCV world-to-camera (inverse of ``camera_poses``),
            ``intrinsics [B, S, 3, 3]`` (π³ predicts none: least-squares pinhole fit to ``local_points``,
            principal point at the image centre, see ``estimate_intrinsics``),
            ``world_points [B, S, H, W, 3]`` (= ``points``), ``world_points_conf [B, S, H, W]`` =
            ``sigmoid(conf)`` in (0, 1) (the official logit is monotone in it; the official demo masks
            ``> 0.1``), ``depth [B, S, H, W]`` (z of ``local_points``), ``depth_conf`` (same as
            ``world_points_conf``).
        """
        local = predictions["local_points"]
        if image_size_hw is not None and tuple(image_size_hw) != tuple(local.shape[2:4]):
            raise ValueError(f"image_size_hw {tuple(image_size_hw)} != predicted map size {tuple(local.shape[2:4])}")
        confidence = torch.sigmoid(predictions["conf"][..., 0])
        return {
            "extrinsics": closed_form_inverse_se3(predictions["camera_poses"])[..., :3, :],
            "intrinsics": estimate_intrinsics(local, confidence),
            "world_points": predictions["points"],
            "world_points_conf": confidence,
            "depth": local[..., 2],
            "depth_conf": confidence,
        }


def build_pi3(
    config: Union[dict, str, Path] = "pi3",
    *,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
) -> Pi3:
    """Build π³ from a preset name (``PI3_PRESETS``), a ``config.json`` path or a config dict.

    Args:
        config: ``"pi3"`` (official defaults), ``"pi3-parity-a"``, a path, or a dict (module docstring).
        device: where to allocate; ``"meta"`` builds without allocating weights.
        dtype: optional parameter dtype.
    Returns:
        The randomly initialised model (train mode, as constructors leave it).
    """
    cfg, model_id = resolve_config(config)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = Pi3(cfg, model_id=model_id)
    return model if dtype is None else model.to(dtype)


def load_pi3(
    source: Union[str, Path],
    *,
    config: Union[dict, str, Path, None] = None,
    dtype: Union[str, torch.dtype] = "fp32",
    device: Union[str, torch.device] = "cpu",
    strict: bool = True,
) -> Pi3:
    """Build π³ and load a checkpoint into it (same sources and errors as ``load_vggt``).

    Args:
        source: ``.safetensors`` / ``.pt`` file, a directory with ``model.safetensors`` or ``model.pt``
            (and optionally ``config.json``), a Hugging Face repo id (``"yyfz233/Pi3"``; offline and not
            cached → ``CheckpointUnavailableError``) or an embedded checkpoint name.
        config: architecture (preset / dict / config.json path); default: the ``config.json`` beside the
            weights, else ``"pi3"``.
        dtype: ``"fp32" | "bf16" | "fp16"`` or a torch floating dtype.
        device: where the parameters live.
        strict: raise ``StateDictMismatchError`` listing missing / unexpected / wrongly-shaped keys by
            name; ``False`` warns and keeps unmatched parameters randomly initialised.
    Returns:
        The model in ``eval()`` mode, ``model_id`` = ``str(source)``.
    """
    from hess.models.load import load_checkpoint  # the one place that reads weights

    return load_checkpoint(build_pi3, source, default_config="pi3", config=config, dtype=dtype,
                           device=device, strict=strict)
