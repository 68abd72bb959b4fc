"""What ``hess train`` optimises, per model family: the architecture, its training-only modules, its losses.

    obj = OBJECTIVES.get("pi3")
    model = obj.build(TINY_PI3_CONFIG)
    losses = obj.losses(model, aux, probes, batch, cfg)      # dict of scalar tensors (before weighting)

* ``vggt``: VGGT camera loss, frame-0 point-map loss, correspondence-location head (``hess.losses``).
* ``pi3``: reference-frame-free losses (``hess.losses_pi3``): scale-aligned local points, relative poses of
  every frame pair, confidence BCE.  π³ cannot know which input is "frame 0", so it has no location head.

Both share the cross-view attention supervision (``hess.losses.attention_match_loss``) on the probed
global layers, with the heads pooled as ``TrainConfig.attn_pool`` says.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from hess.registry import Registry

#: Architecture of ``hess-tiny`` v1 (4 heads; sectioned ``build_vggt`` config; no depth or track head).
TINY_MODEL_CONFIG: dict[str, Any] = {
    "name": "hess-tiny",
    "aggregator": dict(img_size=84, patch_size=14, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0,
                       num_register_tokens=4, patch_embed="conv", qk_norm=True, rope_freq=100, init_values=1.0),
    "camera_head": dict(trunk_depth=1, num_heads=4, init_values=1.0),
    "point_head": dict(output_dim=4, activation="inv_log", conf_activation="expp1", features=16,
                       out_channels=[16, 16, 32, 32], intermediate_layer_idx=[0, 1, 2, 3]),
    "depth_head": None,
    "track_head": None,
}

#: ``hess-tiny`` v2: the same widths with 8 global-attention heads of 16 dims (issue 16).
TINY8_MODEL_CONFIG: dict[str, Any] = json.loads(json.dumps(TINY_MODEL_CONFIG))
TINY8_MODEL_CONFIG["name"] = "hess-tiny-8h"
TINY8_MODEL_CONFIG["aggregator"]["num_heads"] = 8

#: ``hess-tiny-pi3``: a small π³ (DINOv2-style ViT encoder of 3 blocks, 8 decoder blocks = 4 frame + 4 global
#: attention layers of 8 heads, one-block head decoders), 84×84 inputs, 5 register tokens as in π³.
TINY_PI3_CONFIG: dict[str, Any] = {
    "name": "hess-tiny-pi3",
    "patch_size": 14, "pos_type": "rope100", "num_register_tokens": 5,
    "encoder": dict(img_size=84, patch_size=14, in_chans=3, embed_dim=128, depth=3, num_heads=4, mlp_ratio=4,
                    qkv_bias=True, ffn_bias=True, proj_bias=True, drop_path_rate=0.0, drop_path_uniform=False,
                    init_values=1.0, ffn_layer="mlp", block_chunks=0, num_register_tokens=4,
                    interpolate_antialias=True, interpolate_offset=0.0),
    "decoder": dict(dec_embed_dim=128, dec_num_heads=8, mlp_ratio=4, dec_depth=8),
    "point_decoder": dict(in_dim=256, out_dim=64, dec_embed_dim=64, depth=1, dec_num_heads=4, mlp_ratio=4,
                          need_project=True, use_checkpoint=False),
    "point_head": dict(patch_size=14, dec_embed_dim=64, output_dim=3),
    "conf_head": dict(patch_size=14, dec_embed_dim=64, output_dim=1),
    "camera_decoder": dict(in_dim=256, out_dim=64, dec_embed_dim=64, depth=1, dec_num_heads=4, mlp_ratio=4,
                           need_project=True, use_checkpoint=False),
    "camera_head": dict(dim=64),
}


@dataclass(frozen=True)
class Objective:
    """One model family's training recipe.

    build: config dict → model (train mode).  aux: (cfg, model) → training-only modules (never exported).
    losses: (model, aux, probes, batch, cfg) → {name: scalar} before ``TrainConfig.w_*`` weighting.
    default_model: the architecture used when a run names none.
    """

    build: Callable[[dict], nn.Module]
    aux: Callable[[Any, nn.Module], list[nn.Module]]
    losses: Callable[..., dict[str, Tensor]]
    default_model: dict[str, Any]


OBJECTIVES: Registry[Objective] = Registry("training objective")


def _attn_losses(probes: list, batch: dict[str, Tensor], num_special: int, cfg: Any) -> dict[str, Tensor]:
    from hess.losses import attention_match_loss

    if cfg.w_attn <= 0 or not probes:
        return {}
    return {"attn": torch.stack([attention_match_loss(p.logits, batch["match"], num_special, pool=cfg.attn_pool)
                                 for p in probes]).mean()}


# ------------------------------------------------------------------------------------------ VGGT
def _vggt_build(config: dict) -> nn.Module:
    from hess.models import build_vggt

    model = build_vggt(config)
    model.aggregator.use_checkpoint = False
    return model


def _vggt_aux(cfg: Any, model: nn.Module) -> list[nn.Module]:
    from hess.losses import LocationHead, PoseProbes

    dim = 2 * cfg.model["aggregator"]["embed_dim"]                            # aggregator tokens are [frame, global]
    out = [LocationHead(dim)]
    if cfg.w_probe > 0:
        out.append(PoseProbes(dim, cfg.model["aggregator"]["depth"]))
    return out


def _vggt_losses(model: nn.Module, aux: list[nn.Module], probes: list, batch: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    from hess.losses import camera_loss, location_loss, point_loss, translation_direction_loss

    tokens, ps = model.aggregator(batch["images"])
    out: dict[str, Tensor] = {}
    pose_list = model.camera_head(tokens)
    out["camera"] = camera_loss(pose_list, batch["pose_enc"])
    if cfg.w_dir > 0:
        out["dir"] = translation_direction_loss(pose_list[-1], batch["pose_enc"])
    if cfg.w_probe > 0:
        out["probe"] = torch.stack([(p - batch["pose_enc"]).abs().mean() for p in aux[1](tokens)]).mean()
    if cfg.w_point > 0:
        pts, conf = model.point_head(tokens, images=batch["images"], patch_start_idx=ps)
        out["point"] = point_loss(pts, conf, batch["points"], batch["valid"])
    out.update(_attn_losses(probes, batch, ps, cfg))
    if cfg.w_loc > 0:
        out["loc"] = location_loss(aux[0](tokens[-1][:, :, ps:]), batch["loc0"], batch["loc0_valid"])
    return out


OBJECTIVES.register("vggt")(Objective(_vggt_build, _vggt_aux, _vggt_losses, TINY_MODEL_CONFIG))


# ------------------------------------------------------------------------------------------- π³
def _pi3_build(config: dict) -> nn.Module:
    from hess.models import build_pi3

    model = build_pi3(config)
    model.use_checkpoint = False
    return model


def _pi3_losses(model: nn.Module, aux: list[nn.Module], probes: list, batch: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    from hess.losses_pi3 import (confidence_loss, gt_local_points, local_point_loss, optimal_scale,
                                 relative_pose_loss)

    pred = model(batch["images"])
    gt = gt_local_points(batch["points"], batch["extrinsics"])
    valid = batch["valid"]
    scale = optimal_scale(pred["local_points"], gt, valid)
    out = {"camera": relative_pose_loss(pred["camera_poses"], batch["extrinsics"], scale),
           "point": local_point_loss(pred["local_points"], gt, valid, scale)}
    if cfg.w_conf > 0:
        out["conf"] = confidence_loss(pred["conf"][..., 0], pred["local_points"], gt, valid, scale)
    out.update(_attn_losses(probes, batch, model.num_special_tokens, cfg))
    return out


OBJECTIVES.register("pi3")(Objective(_pi3_build, lambda cfg, model: [], _pi3_losses, TINY_PI3_CONFIG))
