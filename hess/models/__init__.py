"""Models of hess: our state-dict-compatible VGGT and π³, their builders and loaders.

    model = build_vggt("vggt-1b", device="meta")          # architecture only
    model = load_vggt("facebook/VGGT-1B", dtype="bf16")   # weights (HF cache / local file / embedded)
    model = build_model("vggt-parity-a"); model = load_model("path/to/model.safetensors")

``MODELS`` maps a model family to its builder and ``LOADERS`` to its loader; ``build_model`` /
``load_model`` dispatch on the family (a config's ``"model"`` key, else the preset-name prefix, default
``"vggt"``).  A new family registers one builder and one loader here.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

from torch import nn

from hess.models.aggregator import PATCH_EMBEDS, Aggregator
from hess.models.dinov2 import DinoVisionTransformer
from hess.models.load import (
    EMBEDDED_CHECKPOINTS,
    CheckpointUnavailableError,
    EmbeddedCheckpoint,
    StateDictMismatchError,
    load_vggt,
)
from hess.models.pose import (
    closed_form_inverse_se3,
    extri_intri_to_pose_encoding,
    mat_to_quat,
    pose_encoding_to_extri_intri,
    quat_to_mat,
    unproject_depth_map_to_point_map,
)
from hess.models.preprocess import load_and_preprocess_images
from hess.models.pi3 import PI3_PRESETS, Pi3, build_pi3, load_pi3
from hess.models.vggt import VGGT, VGGT_PRESETS, build_vggt
from hess.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
LOADERS: Registry[Callable[..., nn.Module]] = Registry("model loader")
MODELS.register("vggt")(build_vggt)
LOADERS.register("vggt")(load_vggt)
MODELS.register("pi3")(build_pi3)
LOADERS.register("pi3")(load_pi3)


def _family(name_or_config: Union[str, dict, None], family: Optional[str]) -> str:
    if family is not None:
        return family
    if isinstance(name_or_config, dict):
        return str(name_or_config.get("model", "vggt"))
    prefix = str(name_or_config).replace("\\", "/").rsplit("/", 1)[-1].split("-")[0].lower()
    return prefix if prefix in MODELS else "vggt"


def build_model(name_or_config: Union[str, dict], *, family: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """Build any registered model family from a preset name or config (``family`` overrides the guess)."""
    return MODELS.get(_family(name_or_config, family))(name_or_config, **kwargs)


def load_model(source: str, *, family: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """Load any registered model family from a checkpoint source (see ``load_vggt``)."""
    return LOADERS.get(_family(source, family))(source, **kwargs)


__all__ = [
    "Aggregator", "CheckpointUnavailableError", "DinoVisionTransformer", "EMBEDDED_CHECKPOINTS",
    "EmbeddedCheckpoint", "LOADERS", "MODELS", "PI3_PRESETS", "Pi3", "PATCH_EMBEDS", "StateDictMismatchError", "VGGT",
    "VGGT_PRESETS", "build_model", "build_pi3", "build_vggt", "closed_form_inverse_se3", "extri_intri_to_pose_encoding",
    "load_and_preprocess_images", "load_model", "load_pi3", "load_vggt", "mat_to_quat", "pose_encoding_to_extri_intri",
    "quat_to_mat", "unproject_depth_map_to_point_map",
]
