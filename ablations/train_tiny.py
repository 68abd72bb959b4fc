"""Train and evaluate the embedded ``hess-tiny`` VGGT and ``hess-tiny-pi3`` (recipes in ``hess/assets/``).

Train: the exact two-phase commands are in ``hess/assets/MODEL_CARD.md`` ("Recipe"); the first renders
the 2,400-scene bank (``--render-bank 0-1200,4000-5200``), then trains on one CPU thread.

Evaluate a checkpoint on the held-out test split (60 scenes, 4 views, frame order shuffled per scene)
with dense / restricted / sparse global attention and the baselines; writes a JSON beside it:

    python ablations/train_tiny.py runs/hess-tiny/model.safetensors --num-test 60
    python ablations/train_tiny.py M.safetensors --arc-deg 15 60 --out M_eval_15_60.json   # other arcs
    python ablations/train_tiny.py runs/tiny8/model.safetensors --frames 8                 # 8-view test split
    python ablations/train_tiny.py runs/pi3/model.safetensors --frames 8 --family pi3

The family (VGGT or π³) is read from the architecture beside the checkpoint unless ``--family`` says it.
The output JSON also holds the bars of issue 16 (``bars``), computed from the rows.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from hess.evaluate import constant_pose_metrics, eval_scenes_default, evaluate_model, mean_pose_encoding
from hess.models import build_pi3, build_vggt
from hess.patch import SparsePlan
from hess.train import TrainConfig

#: Uniform block sparsity used in the cards: k-blocks of 6 patches (4 views: 24 key blocks; 8 views: 48).
SPARSE_90 = SparsePlan(keep_ratio=0.1, q_block=12, k_block=6)
SPARSE_75 = SparsePlan(keep_ratio=0.25, q_block=12, k_block=6)
COLUMNS = ("auc30", "auc15", "rra15", "rta15", "chamfer", "point_err", "chamfer_f0", "abs_rel")


def model_config(path: Path) -> dict:
    """The architecture beside a checkpoint: ``config.json`` (``hess train``'s export), else ``<stem>.json``."""
    beside = path.parent / "config.json"
    return json.loads((beside if beside.is_file() else path.with_suffix(".json")).read_text())


#: Architecture builder per family; a config with a ``decoder`` section is a π³.
BUILDERS = {"vggt": build_vggt, "pi3": build_pi3}


def family_of(config: dict) -> str:
    return "pi3" if "decoder" in config else "vggt"


def load(path: Path, family: str | None = None) -> torch.nn.Module:
    from safetensors.torch import load_file

    config = model_config(path)
    model = BUILDERS[family or family_of(config)](config)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def bars(rows: dict, family: str) -> dict:
    """Issue 16's bars from the rows: relative drops and the ratio to the strongest constant."""
    dense = rows["dense"]["auc30"]
    const = max(m["auc30"] for k, m in rows.items() if k.startswith("constant"))
    drop = lambda k: 1 - rows[k]["auc30"] / dense if dense > 0 else float("nan")  # noqa: E731
    out = {"dense_auc30": dense, "own_frame_drop": drop("own frame + special tokens"),
           "uniform90_drop": drop("uniform 90% block-sparse"), "strongest_constant_auc30": const,
           "x_strongest_constant": dense / const if const > 0 else float("inf")}
    targets = ({"dense_auc30": 0.65, "own_frame_drop": 0.80, "uniform90_drop": 0.25, "x_strongest_constant": 5.0}
               if family == "vggt" else {"dense_auc30": 0.5, "own_frame_drop": 0.5})
    out["met"] = {k: bool(out[k] >= v) for k, v in targets.items()}
    out["targets"] = targets
    return out


def report(path: Path, num_test: int, seed: int = 0, arc_deg=None, out: Path | None = None, walls=None,
           frames: int | None = None, family: str | None = None, threads: int = 2) -> dict:
    """All rows of the card's test table; ``arc_deg`` evaluates on (and takes the constant baselines
    from) orbits of another arc range than the embedded distribution; ``frames``: views per test scene."""
    torch.set_num_threads(threads)
    t0 = time.time()
    options = TrainConfig(arc_deg=arc_deg, walls=walls, views=frames).scene_overrides()  # as hess train
    scenes = eval_scenes_default("test", num_test, seed=seed, options=options)
    family = family or family_of(model_config(path))
    model = load(path, family)
    rows: dict[str, dict] = {}
    for name, attention in (("dense", "dense"), ("own frame + special tokens", "frame-local"),
                            ("own frame only", "frame-only"), ("uniform 75% block-sparse", SPARSE_75),
                            ("uniform 90% block-sparse", SPARSE_90)):
        rows[name] = evaluate_model(model, scenes, attention=attention)
    torch.manual_seed(seed)
    rows["random-init model"] = evaluate_model(BUILDERS[family](model_config(path)), scenes)
    train_scenes = eval_scenes_default("train", 48, seed=seed, options=options)
    rows["constant: no motion"] = constant_pose_metrics(scenes)
    rows["constant: mean train pose"] = constant_pose_metrics(scenes, mean_pose_encoding(train_scenes))
    for side, label in ((1, ">"), (-1, "<")):
        rows[f"constant: mean train pose with t_x {label} 0"] = constant_pose_metrics(
            scenes, mean_pose_encoding(train_scenes, side))
    result = {"checkpoint": str(path), "family": family, "num_test_scenes": num_test, "scene_options": options,
              "rows": rows, "bars": bars(rows, family), "eval_seconds": time.time() - t0}
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
    p.add_argument("--frames", type=int, default=None, help="views per test scene (default: the embedded distribution's)")
    p.add_argument("--family", choices=sorted(BUILDERS), default=None, help="default: from the config beside the checkpoint")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    result = report(a.checkpoint, a.num_test, arc_deg=a.arc_deg, out=a.out, walls=a.walls, frames=a.frames,
                    family=a.family, threads=a.threads)
    print(markdown(result))
    print(json.dumps(result["bars"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
