"""Train and evaluate the embedded ``hess-tiny`` VGGT (the recipe of ``hess/assets/MODEL_CARD.md``).

Train: the exact two-phase commands are in ``hess/assets/MODEL_CARD.md`` ("Recipe"); the first renders
the 2,400-scene bank (``--render-bank 0-1200,4000-5200``), then trains on one CPU thread.

Evaluate a checkpoint on the held-out test split (60 scenes, 4 views, frame order shuffled per scene)
with dense / restricted / sparse global attention and the baselines; writes a JSON beside it:

    python ablations/train_tiny.py runs/hess-tiny/model.safetensors --num-test 60
    python ablations/train_tiny.py M.safetensors --arc-deg 15 60 --out M_eval_15_60.json   # other arcs
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from hess.evaluate import constant_pose_metrics, eval_scenes_default, evaluate_model, mean_pose_encoding
from hess.models import build_vggt
from hess.patch import SparsePlan
from hess.train import TrainConfig

#: Uniform block sparsity used in the card: 4 views x 36 patches, k-blocks of 6 -> 24 key blocks.
SPARSE_90 = SparsePlan(keep_ratio=0.1, q_block=12, k_block=6)
SPARSE_75 = SparsePlan(keep_ratio=0.25, q_block=12, k_block=6)
COLUMNS = ("auc30", "auc15", "rra15", "rta15", "chamfer", "point_err", "chamfer_f0", "abs_rel")


def load(path: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    model = build_vggt(json.loads(path.with_suffix(".json").read_text()))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def report(path: Path, num_test: int, seed: int = 0, arc_deg=None, out: Path | None = None, walls=None) -> dict:
    """All rows of the card's test table; ``arc_deg`` evaluates on (and takes the constant baselines
    from) orbits of another arc range than the embedded distribution."""
    torch.set_num_threads(2)
    t0 = time.time()
    options = TrainConfig(arc_deg=arc_deg, walls=walls).scene_overrides()  # the same overrides as hess train
    scenes = eval_scenes_default("test", num_test, seed=seed, options=options)
    model = load(path)
    rows: dict[str, dict] = {}
    for name, attention in (("dense", "dense"), ("own frame + special tokens", "frame-local"),
                            ("own frame only", "frame-only"), ("uniform 75% block-sparse", SPARSE_75),
                            ("uniform 90% block-sparse", SPARSE_90)):
        rows[name] = evaluate_model(model, scenes, attention=attention)
    torch.manual_seed(seed)
    rows["random-init model"] = evaluate_model(build_vggt(json.loads(path.with_suffix(".json").read_text())), scenes)
    train_scenes = eval_scenes_default("train", 48, seed=seed, options=options)
    rows["constant: no motion"] = constant_pose_metrics(scenes)
    rows["constant: mean train pose"] = constant_pose_metrics(scenes, mean_pose_encoding(train_scenes))
    for side, label in ((1, ">"), (-1, "<")):
        rows[f"constant: mean train pose with t_x {label} 0"] = constant_pose_metrics(
            scenes, mean_pose_encoding(train_scenes, side))
    result = {"checkpoint": str(path), "num_test_scenes": num_test, "scene_options": options,
              "rows": rows, "eval_seconds": time.time() - t0}
    (out or path.with_name(path.stem + "_eval.json")).write_text(json.dumps(result, indent=1))
    return result


def markdown(result: dict) -> str:
    lines = ["| model / global attention | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, m in result["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.3f}" if c in m else "—" for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--num-test", type=int, default=60)
    p.add_argument("--arc-deg", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="orbit arc range of the test scenes (default: the embedded distribution)")
    p.add_argument("--walls", action=argparse.BooleanOptionalAction, default=None, help="corner walls (default: embedded)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: <checkpoint>_eval.json)")
    a = p.parse_args(argv)
    print(markdown(report(a.checkpoint, a.num_test, arc_deg=a.arc_deg, out=a.out, walls=a.walls)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
