"""The VGGT model (aggregator + camera / depth / point / track heads), its presets and ``build_vggt``.

Configuration format (that of ``fixtures/vggt_parity_a/config.json``): a dict of sections with the
official constructor argument names::

    {"aggregator": {...}, "camera_head": {...}, "point_head": {...}, "depth_head": {...},
     "track_head": {...}, "track_head_feature_extractor": {...}}

* A missing section takes the official default (heads: ``dim_in = 2·embed_dim``, the official
  activations); a section set to ``None`` disables that head.  Inside a section, missing arguments take
  the head's defaults, except ``dim_in`` (and the DPT/track ``patch_size``) which follow the aggregator.
* ``track_head_feature_extractor`` replaces the DPT feature extractor that ``TrackHead`` hard-codes.
* Unknown sections or arguments raise ``ValueError`` naming them.  Descriptive fields written beside a
  config (``CONFIG_METADATA_KEYS``: name, notes, seeds, input sizes, ...) are ignored.
* The official ``VGGT.__init__`` keyword form (``img_size, patch_size, embed_dim, enable_camera, ...``),
  as a Hugging Face ``config.json`` stores it, is accepted too.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from hess.models.inputs import check_images
from hess.models.aggregator import Aggregator
from hess.models.layers import Attention
from hess.models.pose import pose_encoding_to_extri_intri, unproject_depth_map_to_point_map

# section -> (module, class) of the head; imported lazily so the aggregator works on its own.
HEAD_CLASSES: dict[str, tuple[str, str]] = {
    "camera_head": ("hess.models.camera_head", "CameraHead"),
    "point_head": ("hess.models.dpt_head", "DPTHead"),
    "depth_head": ("hess.models.dpt_head", "DPTHead"),
    "track_head": ("hess.models.track_head", "TrackHead"),
    "track_head_feature_extractor": ("hess.models.dpt_head", "DPTHead"),
}
CONFIG_SECTIONS = ("aggregator",) + tuple(HEAD_CLASSES)
CONFIG_METADATA_KEYS = frozenset({
    "name", "model", "notes", "description", "inputs", "seed_init", "seed_inputs", "official_source",
    "patch_start_idx", "tokens_per_frame", "dtype", "torch_version", "block_io_index", "dinov2",
})
OFFICIAL_KWARGS = (
    "img_size", "patch_size", "embed_dim", "enable_camera", "enable_point", "enable_depth", "enable_track",
)

VGGT_PRESETS: dict[str, dict[str, Any]] = {
    # VGGT() with its official defaults: DINOv2 ViT-L/14-reg, 24+24 blocks of width 1024, every head.
    "vggt-1b": {"aggregator": {"img_size": 518, "patch_size": 14, "embed_dim": 1024}},
    # The configuration of fixtures/vggt_parity_a (tiny random-weight model from the official classes).
    "vggt-parity-a": {
        "aggregator": dict(
            img_size=518, patch_size=14, embed_dim=64, depth=8, num_heads=4, mlp_ratio=4.0,
            num_register_tokens=4, qkv_bias=True, proj_bias=True, ffn_bias=True, patch_embed="conv",
            aa_order=["frame", "global"], aa_block_size=1, qk_norm=True, rope_freq=100, init_values=0.01,
        ),
        "camera_head": dict(
            dim_in=128, trunk_depth=4, pose_encoding_type="absT_quaR_FoV", num_heads=8, mlp_ratio=4,
            init_values=0.01, trans_act="linear", quat_act="linear", fl_act="relu",
        ),
        "point_head": dict(
            dim_in=128, patch_size=14, output_dim=4, activation="inv_log", conf_activation="expp1",
            features=32, out_channels=[16, 32, 64, 64], intermediate_layer_idx=[1, 3, 5, 7],
            pos_embed=True, feature_only=False, down_ratio=1,
        ),
        "depth_head": dict(
            dim_in=128, patch_size=14, output_dim=2, activation="exp", conf_activation="expp1",
            features=32, out_channels=[16, 32, 64, 64], intermediate_layer_idx=[1, 3, 5, 7],
            pos_embed=True, feature_only=False, down_ratio=1,
        ),
        "track_head": dict(
            dim_in=128, patch_size=14, features=32, iters=4, predict_conf=True, stride=2,
            corr_levels=3, corr_radius=3, hidden_size=32,
        ),
        "track_head_feature_extractor": dict(
            dim_in=128, patch_size=14, output_dim=4, activation="inv_log", conf_activation="expp1",
            features=32, out_channels=[16, 32, 64, 64], intermediate_layer_idx=[1, 3, 5, 7],
            pos_embed=False, feature_only=True, down_ratio=2,
        ),
    },
}


class VGGT(nn.Module):
    """Visual Geometry Grounded Transformer: ``images → cameras, depth, point maps, tracks``.

    Attribute order (aggregator, camera, point, depth, track) reproduces the official state_dict order.
    Disabled heads are ``None`` and own no keys.

    Activation memory: ``forward`` asks the aggregator only for the layers the enabled heads read
    (:meth:`head_layers`: the DPT heads' ``intermediate_layer_idx`` and the camera head's last layer;
    4 of 24 for VGGT-1B), so the other ``[B, S, P, 2C]`` outputs are never kept.  Set
    ``keep_all_layers = True`` (or pass ``forward(..., keep_all_layers=True)``) to build all of them as
    the official model does; the predictions are identical either way, gradients too (unread layers
    take no part in any head).  The depth and point heads run ``head_frames_chunk_size`` frames at a
    time (official: 8): their full-resolution feature maps (~0.3 GB per frame for VGGT-1B at 518×392 in
    fp32) otherwise dominate the peak once the aggregator outputs are trimmed.  Every frame is computed
    alone in the heads, so the chunk size changes memory, not the predictions.
    """

    keep_all_layers: bool = False
    head_frames_chunk_size: int = 2

    def __init__(
        self,
        aggregator: Aggregator,
        camera_head: Optional[nn.Module] = None,
        point_head: Optional[nn.Module] = None,
        depth_head: Optional[nn.Module] = None,
        track_head: Optional[nn.Module] = None,
        model_id: str = "vggt-custom",
    ) -> None:
        super().__init__()
        self.aggregator = aggregator
        self.camera_head = camera_head
        self.point_head = point_head
        self.depth_head = depth_head
        self.track_head = track_head
        self.model_id = model_id

    # ---- seams used by calibration / sparsification -------------------------------------------------
    @property
    def patch_size(self) -> int:
        return self.aggregator.patch_size

    @property
    def num_special_tokens(self) -> int:
        """Camera + register tokens at the start of every frame (= ``patch_start_idx``)."""
        return self.aggregator.patch_start_idx

    def global_attention_layers(self) -> list[Attention]:
        """The ``.attn`` of every global block, in order (where sparse cores are plugged in)."""
        return self.aggregator.global_attention_layers()

    def head_layers(self, track: bool = False) -> list[int]:
        """Sorted aggregator layer indices the enabled heads read (``track``: the track head runs too)."""
        depth, layers = self.aggregator.depth, set()
        if self.camera_head is not None:
            layers.add(depth - 1)
        dpt = [self.depth_head, self.point_head]
        if track and self.track_head is not None:
            dpt.append(getattr(self.track_head, "feature_extractor", None))
        for head in dpt:
            if head is not None:
                layers.update(i % depth for i in getattr(head, "intermediate_layer_idx", range(depth)))
        return sorted(layers)

    # ---- forward --------------------------------------------------------------------------------------
    def _check_images(self, images: Tensor) -> Tensor:
        return check_images(images, self.patch_size, "VGGT")

    @staticmethod
    def _check_query_points(query_points: Tensor, batch: int) -> Tensor:
        if query_points.dim() == 2:
            query_points = query_points.unsqueeze(0)
        if query_points.dim() != 3 or query_points.shape[-1] != 2:
            raise ValueError(f"query_points must be [N, 2] or [B, N, 2] pixels (x, y), got {tuple(query_points.shape)}")
        if not query_points.dtype.is_floating_point:
            raise ValueError(f"query_points must be float, got dtype {query_points.dtype}")
        if query_points.shape[0] != batch:
            raise ValueError(f"query_points batch {query_points.shape[0]} != images batch {batch}")
        return query_points

    def forward(
        self, images: Tensor, query_points: Optional[Tensor] = None, *, keep_all_layers: Optional[bool] = None
    ) -> dict[str, Any]:
        """Run the aggregator and every enabled head.

        Args:
            images: [S, 3, H, W] or [B, S, 3, H, W] in [0, 1]; H, W multiples of the patch size.
            query_points: [N, 2] or [B, N, 2] pixel (x, y) on frame 0, for the track head.
            keep_all_layers: build every aggregator output, not only those the heads read (default:
                the attribute ``keep_all_layers``, False).
        Returns:
            ``pose_enc [B, S, 9]`` and ``pose_enc_list`` (one per camera iteration); ``depth [B, S, H, W, 1]``,
            ``depth_conf [B, S, H, W]``; ``world_points [B, S, H, W, 3]``, ``world_points_conf [B, S, H, W]``;
            with query points ``track [B, S, N, 2]``, ``vis [B, S, N]``, ``conf [B, S, N]``; in eval mode
            ``images [B, S, 3, H, W]``.
        """
        images = self._check_images(images)
        if query_points is not None:
            query_points = self._check_query_points(query_points, images.shape[0])
        keep_all = self.keep_all_layers if keep_all_layers is None else keep_all_layers
        layers = None if keep_all else self.head_layers(track=query_points is not None)
        tokens, patch_start_idx = self.aggregator(images, layers=layers)
        preds: dict[str, Any] = {}
        chunk = self.head_frames_chunk_size
        # Official: dense heads in fp32 even under CUDA autocast; the track head outside that block.
        no_cuda_amp = torch.autocast("cuda", enabled=False) if images.is_cuda else contextlib.nullcontext()
        with no_cuda_amp:
            if self.camera_head is not None:
                pose_enc_list = self.camera_head(tokens)
                preds["pose_enc"] = pose_enc_list[-1]
                preds["pose_enc_list"] = pose_enc_list
            if self.depth_head is not None:
                preds["depth"], preds["depth_conf"] = self.depth_head(
                    tokens, images=images, patch_start_idx=patch_start_idx, frames_chunk_size=chunk
                )
            if self.point_head is not None:
                preds["world_points"], preds["world_points_conf"] = self.point_head(
                    tokens, images=images, patch_start_idx=patch_start_idx, frames_chunk_size=chunk
                )
        if self.track_head is not None and query_points is not None:
            track_list, vis, conf = self.track_head(
                tokens, images=images, patch_start_idx=patch_start_idx, query_points=query_points
            )
            preds["track"], preds["vis"], preds["conf"] = track_list[-1], vis, conf
        if not self.training:
            preds["images"] = images
        return preds

    def geometry(
        self, predictions: dict[str, Any], image_size_hw: Optional[tuple[int, int]] = None
    ) -> dict[str, Tensor]:
        """Map raw outputs to the fields shared by every model in hess (differentiable).

        Args:
            predictions: output of ``forward``.
            image_size_hw: (H, W) of the input; read from the dense outputs when omitted.
        Returns:
            ``extrinsics [B, S, 3, 4]`` OpenCV world-to-camera, ``intrinsics [B, S, 3, 3]``,
            ``world_points [B, S, H, W, 3]`` (point head; else depth unprojected with the cameras),
            ``world_points_conf [B, S, H, W]`` (point head; else depth confidence), ``depth [B, S, H, W]``,
            ``depth_conf [B, S, H, W]``.  Fields whose head is disabled are absent.
        """
        out: dict[str, Tensor] = {}
        if image_size_hw is None:
            for key in ("images", "depth", "world_points"):
                if key in predictions:
                    t = predictions[key]
                    image_size_hw = tuple(t.shape[-2:]) if key == "images" else tuple(t.shape[2:4])
                    break
        if "pose_enc" in predictions:
            if image_size_hw is None:
                raise ValueError("geometry() needs image_size_hw when predictions hold no images, depth or points")
            out["extrinsics"], out["intrinsics"] = pose_encoding_to_extri_intri(predictions["pose_enc"], image_size_hw)
        if "depth" in predictions:
            out["depth"] = predictions["depth"][..., 0]
            out["depth_conf"] = predictions["depth_conf"]
        if "world_points" in predictions:
            out["world_points"] = predictions["world_points"]
            out["world_points_conf"] = predictions["world_points_conf"]
        elif "depth" in out and "extrinsics" in out:
            out["world_points"] = unproject_depth_map_to_point_map(out["depth"], out["extrinsics"], out["intrinsics"])
            out["world_points_conf"] = out["depth_conf"]
        return out


# ---- configuration -------------------------------------------------------------------------------------
def _head_class(section: str) -> type:
    module, name = HEAD_CLASSES[section]
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise
        raise ImportError(
            f"{section} needs {module}.{name}, which is not available; disable the head with "
            f"config['{section}'] = None"
        ) from err


def _check_arguments(cls: type, section: str, kwargs: dict) -> None:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params) - {"self"})
    if unknown:
        known = ", ".join(n for n in params if n != "self")
        raise ValueError(f"unknown argument(s) {unknown} in config section '{section}'; {cls.__name__} takes: {known}")


def _from_official_kwargs(config: dict) -> dict:
    """``VGGT(img_size, patch_size, embed_dim, enable_*)`` keywords → sectioned config."""
    unknown = sorted(set(config) - set(OFFICIAL_KWARGS) - CONFIG_METADATA_KEYS)
    if unknown:
        raise ValueError(f"unknown VGGT config key(s) {unknown}; official keywords: {', '.join(OFFICIAL_KWARGS)}")
    agg = {k: config[k] for k in ("img_size", "patch_size", "embed_dim") if k in config}
    out: dict[str, Any] = {"aggregator": agg}
    for flag, sections in (("enable_camera", ["camera_head"]), ("enable_point", ["point_head"]),
                           ("enable_depth", ["depth_head"]), ("enable_track", ["track_head"])):
        if not config.get(flag, True):
            out.update({s: None for s in sections})
    return out


def _head_defaults(embed_dim: int, patch_size: int) -> dict[str, dict[str, Any]]:
    """The arguments the official ``VGGT.__init__`` passes to each head."""
    dim_in = 2 * embed_dim
    return {
        "camera_head": dict(dim_in=dim_in),
        "point_head": dict(dim_in=dim_in, patch_size=patch_size, output_dim=4, activation="inv_log",
                           conf_activation="expp1"),
        "depth_head": dict(dim_in=dim_in, patch_size=patch_size, output_dim=2, activation="exp",
                           conf_activation="expp1"),
        "track_head": dict(dim_in=dim_in, patch_size=patch_size),
    }


def _config_dict(config: Union[dict, str, Path]) -> tuple[dict, str]:
    """Preset name / JSON path / dict → (a private copy of the dict, model_id)."""
    if isinstance(config, (str, Path)):
        if str(config) in VGGT_PRESETS:
            return copy.deepcopy(VGGT_PRESETS[str(config)]), str(config)
        if str(config).endswith(".json") and Path(config).is_file():
            config = json.loads(Path(config).read_text())
        else:
            raise KeyError(f"unknown VGGT preset {str(config)!r}; known: {', '.join(sorted(VGGT_PRESETS))}")
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict or a preset name, got {type(config).__name__}")
    if config.get("model", "vggt") != "vggt":
        raise ValueError(f"config is for model {config['model']!r}, not 'vggt'")
    return copy.deepcopy(config), str(config.get("name") or "vggt-custom")


def _extractor_config(extractor: dict, track: Optional[dict]) -> dict:
    """``track_head_feature_extractor`` over what ``TrackHead`` hard-codes for it:
    ``DPTHead(dim_in, patch_size, features, feature_only=True, down_ratio=2, pos_embed=False)``."""
    if track is None:
        raise ValueError("config has track_head_feature_extractor but track_head is disabled")
    default_features = inspect.signature(_head_class("track_head").__init__).parameters["features"].default
    features = track.get("features", default_features)
    defaults = dict(dim_in=track["dim_in"], patch_size=track["patch_size"], features=features, feature_only=True,
                    down_ratio=2, pos_embed=False)
    return {**defaults, **extractor}


def resolve_config(config: Union[dict, str]) -> tuple[dict[str, Optional[dict]], str]:
    """Preset name, JSON path or dict → (fully sectioned config, model_id).  Validates section names."""
    config, model_id = _config_dict(config)
    if any(k in OFFICIAL_KWARGS for k in config):
        config = _from_official_kwargs(config)
    unknown = sorted(set(config) - set(CONFIG_SECTIONS) - CONFIG_METADATA_KEYS)
    if unknown:
        raise ValueError(f"unknown VGGT config section(s) {unknown}; known: {', '.join(CONFIG_SECTIONS)}")
    agg = config.get("aggregator") or {}
    if not isinstance(agg, dict):
        raise TypeError("config['aggregator'] must be a dict of Aggregator arguments")
    _check_arguments(Aggregator, "aggregator", agg)
    agg_sig = inspect.signature(Aggregator.__init__).parameters
    embed_dim = agg.get("embed_dim", agg_sig["embed_dim"].default)
    patch_size = agg.get("patch_size", agg_sig["patch_size"].default)
    n_special = 1 + agg.get("num_register_tokens", agg_sig["num_register_tokens"].default)
    if "patch_start_idx" in config and config["patch_start_idx"] != n_special:
        raise ValueError(f"config patch_start_idx={config['patch_start_idx']} but the aggregator gives {n_special}")
    resolved: dict[str, Optional[dict]] = {"aggregator": agg}
    for section, defaults in _head_defaults(embed_dim, patch_size).items():
        given = config.get(section, {})
        if given is not None and not isinstance(given, dict):
            raise TypeError(f"config['{section}'] must be a dict or None, got {type(given).__name__}")
        resolved[section] = None if given is None else {**defaults, **given}
    extractor = config.get("track_head_feature_extractor")
    resolved["track_head_feature_extractor"] = (
        None if extractor is None else _extractor_config(extractor, resolved["track_head"])
    )
    return resolved, model_id


def _build_heads(cfg: dict[str, Optional[dict]]) -> dict[str, Optional[nn.Module]]:
    heads: dict[str, Optional[nn.Module]] = {}
    for section in ("camera_head", "point_head", "depth_head", "track_head"):
        kwargs = cfg[section]
        if kwargs is None:
            heads[section] = None
            continue
        cls = _head_class(section)
        _check_arguments(cls, section, kwargs)
        heads[section] = cls(**kwargs)
    extractor = cfg["track_head_feature_extractor"]
    if extractor is not None:
        cls = _head_class("track_head_feature_extractor")
        _check_arguments(cls, "track_head_feature_extractor", extractor)
        heads["track_head"].feature_extractor = cls(**extractor)
    return heads


def build_vggt(
    config: Union[dict, str] = "vggt-1b",
    *,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
) -> VGGT:
    """Build a VGGT from a preset name (``VGGT_PRESETS``) or a sectioned config dict (module docstring).

    Args:
        config: preset name, path to a ``config.json``, or dict.
        device: where to allocate; ``"meta"`` builds without allocating weights.
        dtype: optional parameter dtype.
    Returns:
        The model in train mode (as ``nn.Module`` constructors leave it), randomly initialised.
    """
    cfg, model_id = resolve_config(config)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        aggregator = Aggregator(**cfg["aggregator"])
        model = VGGT(aggregator, **_build_heads(cfg), model_id=model_id)
    if dtype is not None:
        model = model.to(dtype)
    model.config = cfg
    return model
