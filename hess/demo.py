"""``hess demo``: one VGGT forward on a generated image set, printing the predicted cameras.

Question: does the installed package run, and what does the default model predict?
Command:  hess demo                                   # embedded default model, one synthetic scene of 4 views
          hess demo --model runs/my-model/            # your own checkpoint (model.safetensors + config.json)
          hess demo --frames 6 --seed 3 --out runs/demo --images my_photos/   # your own images instead
Output:   a table of predicted vs ground-truth cameras (centre in frame 0's camera frame, viewing angle to
          frame 0, horizontal FoV), the pose errors of every frame pair, AUC@30 and the forward time;
          with ``--out``: cameras.json and images.png there.

Both are in frame 0's camera frame: ground truth normalised like the evaluation (mean point distance 1),
predictions in the model's own scale.  Pair errors (rotation, translation direction) are scale-free.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from hess.config import ModelSection


def camera_rows(extrinsics: Tensor, intrinsics: Tensor, width: int) -> list[dict[str, Any]]:
    """Per frame: centre ``-Rᵀt`` [3], angle (deg) between its optical axis and frame 0's, FoV (deg).

    extrinsics: [S, 3, 4] world-to-camera; intrinsics: [S, 3, 3].
    """
    R, t = extrinsics[:, :, :3].double(), extrinsics[:, :, 3:].double()
    centres = (-R.transpose(1, 2) @ t)[..., 0]
    axes = R[:, 2, :]  # optical axis in world coordinates (third row of R)
    angles = torch.rad2deg(torch.arccos((axes @ axes[0]).clamp(-1, 1)))
    fov = torch.rad2deg(2 * torch.atan(width / (2 * intrinsics[:, 0, 0].double())))
    return [{"frame": i, "centre": [round(float(v), 4) for v in centres[i]], "angle_to_frame0_deg": float(angles[i]),
             "fov_deg": float(fov[i])} for i in range(len(centres))]


def _scene(args: argparse.Namespace):
    from hess.rq.resources import SCENE_SOURCES

    return SCENE_SOURCES.get("synthetic")("test", 1, args.frames, args.size, args.size, args.seed, None)[0]


def _own_images(folder: str, size: int) -> Tensor:
    from hess.models import load_and_preprocess_images

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if len(files) < 2:
        raise FileNotFoundError(f"--images {folder}: need at least 2 .png/.jpg files, found {len(files)}")
    images = load_and_preprocess_images([str(f) for f in files])  # [S, 3, H, 518], width 518
    height = max(14, round(images.shape[-2] * size / images.shape[-1] / 14) * 14)
    return torch.nn.functional.interpolate(images, size=(height, size), mode="bilinear", antialias=True)


def model_section(model: str, config: Optional[str] = None) -> ModelSection:
    """``--model``: a model name (embedded, preset) or a checkpoint path (file or folder with config.json);
    ``--model-config``: its architecture (config.json or preset) when none lies beside the weights."""
    if Path(model).expanduser().exists():
        family = "pi3" if "pi3" in Path(model).name.lower() else "vggt"
        return ModelSection(name=family, checkpoint=str(Path(model).expanduser()), config=config, device="cpu")
    if config is not None:
        raise ValueError(f"--model-config needs --model to be a checkpoint path; {model!r} is not a file or folder")
    return ModelSection(name=model, device="cpu")


def run_demo(model_name: str = "hess-tiny", *, frames: int = 4, size: int = 84, seed: int = 0,
             images: Optional[str] = None, out: Optional[str] = None,
             model_config: Optional[str] = None) -> dict[str, Any]:
    """Forward one image set; returns {"predicted", "ground_truth", "pose", "forward_ms", "weights"}.

    ``model_name``: a model name or a checkpoint path (``model_section``).
    """
    from hess.data import normalize_scene
    from hess.metrics import pose_metrics, relative_pose_errors
    from hess.rq.resources import load_run_model

    model, info = load_run_model(model_section(model_name, model_config))
    scene = None
    if images:
        batch = _own_images(images, size)[None]
    else:
        scene = normalize_scene(_scene(argparse.Namespace(frames=frames, size=size, seed=seed)))
        batch = scene.images[None]
    with torch.no_grad():
        model(batch)  # warm-up
        start = time.perf_counter()
        geo = model.geometry(model(batch))
        forward_ms = (time.perf_counter() - start) * 1e3
    width = batch.shape[-1]
    result: dict[str, Any] = {"weights": info["weights"], "model": model_name, "forward_ms": forward_ms,
                              "predicted": camera_rows(geo["extrinsics"][0], geo["intrinsics"][0], width)}
    if scene is not None:
        result["ground_truth"] = camera_rows(scene.extrinsics, scene.intrinsics, width)
        rot, trans = relative_pose_errors(geo["extrinsics"][0].double(), scene.extrinsics.double())
        result["pose"] = {"rot_err_deg": [round(float(v), 2) for v in rot], "trans_err_deg": [round(float(v), 2) for v in trans],
                          **pose_metrics(rot, trans, thresholds=(30,))}
    if out:
        _save(result, batch[0], Path(out))
    return result


def _save(result: dict, images: Tensor, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    (out / "cameras.json").write_text(json.dumps(result, indent=2))
    fig = Figure(figsize=(2.2 * len(images), 2.4))
    for i, img in enumerate(images):
        ax = fig.add_subplot(1, len(images), i + 1)
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_title(f"frame {i}", fontsize=9)
        ax.axis("off")
    fig.savefig(out / "images.png", dpi=100, bbox_inches="tight")


def format_result(result: dict[str, Any]) -> str:
    """The printed table of ``run_demo``'s result."""
    lines = [f"model {result['model']} (weights: {result['weights']}), forward {result['forward_ms']:.1f} ms"]
    if result["weights"] == "random-init":
        lines.append("NOTE: random weights (the embedded checkpoint is not available): the cameras below are noise.")
    gt = result.get("ground_truth")
    lines.append(f"{'frame':>5} | {'predicted centre (x, y, z)':>28} {'angle°':>7} {'FoV°':>6}"
                 + (f" | {'true centre (x, y, z)':>28} {'angle°':>7} {'FoV°':>6}" if gt else ""))
    for i, p in enumerate(result["predicted"]):
        row = f"{i:>5} | {str(tuple(p['centre'])):>28} {p['angle_to_frame0_deg']:7.1f} {p['fov_deg']:6.1f}"
        if gt:
            g = gt[i]
            row += f" | {str(tuple(g['centre'])):>28} {g['angle_to_frame0_deg']:7.1f} {g['fov_deg']:6.1f}"
        lines.append(row)
    if "pose" in result:
        pose = result["pose"]
        lines.append(f"pair errors: rotation {pose['rot_err_deg']} deg, translation direction {pose['trans_err_deg']} deg; "
                     f"AUC@30 = {pose['auc30']:.3f}")
    lines.append("centres are in frame 0's camera frame (predicted: up to the model's scale; truth: mean point distance 1)")
    return "\n".join(lines)


def configure_cli(parser: argparse.ArgumentParser) -> None:
    """Arguments of the command (``hess.cli`` calls this)."""
    parser.add_argument("--model", default="hess-tiny", help="model name or preset (default: the embedded hess-tiny), "
                                                             "or a checkpoint: a .safetensors file or a folder with "
                                                             "model.safetensors + config.json")
    parser.add_argument("--model-config", help="architecture of a --model checkpoint path (config.json or preset) "
                                               "when no config.json lies beside it")
    parser.add_argument("--frames", type=int, default=4, help="views of the generated scene")
    parser.add_argument("--size", type=int, default=84, help="image side in pixels (multiple of 14)")
    parser.add_argument("--seed", type=int, default=0, help="which held-out synthetic scene")
    parser.add_argument("--images", help="a folder of your own images instead of a generated scene")
    parser.add_argument("--out", help="write cameras.json and images.png here")
    parser.add_argument("--no-wandb", action="store_true", help="accepted for symmetry; the demo logs nothing to W&B")


def run_cli(args: argparse.Namespace) -> int:
    """Run the command; returns the exit code."""
    if args.frames < 2:
        raise ValueError(f"--frames must be >= 2, got {args.frames}")
    result = run_demo(args.model, frames=args.frames, size=args.size, seed=args.seed, images=args.images, out=args.out,
                      model_config=getattr(args, "model_config", None))
    print(format_result(result))
    return 0
