"""``hess calibrate``: compute (or reuse from the cache) the HeSS score artifact of a config and write it.

    hess calibrate --preset demo --output scores.safetensors          # embedded model, synthetic calib scenes
    hess calibrate model.name=vggt model.checkpoint=facebook/VGGT-1B data.dataset=co3d --output vggt1b.safetensors

The artifact holds the raw Fisher traces ``[error, proj, scene, L, H]`` plus a JSON sidecar (calibration
config, scene ids, model id/hash, hess version); it is cached by config hash under ``<out>/cache`` so a
second call, or any λ / keep-ratio sweep, reuses it.  Prints the artifact path and the per-layer HeSS table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from hess.config import config_hash, dump_yaml
from hess.rq.command import configure_cli as _configure_config_cli
from hess.rq.command import resolve
from hess.rq.pipeline import Pipeline


def configure_cli(parser: argparse.ArgumentParser) -> None:
    """Config arguments (as ``hess evaluate``) plus ``--output``."""
    _configure_config_cli(parser)
    parser.add_argument("--output", type=Path, default=None,
                        help="artifact path (.safetensors; default <out>/scores/<config-hash>.safetensors)")


def run_cli(args: argparse.Namespace) -> int:
    """Calibrate (or load the cached artifact), save it to ``--output``, print where and the HeSS table."""
    cfg = resolve(args)
    if args.dry_run:
        print(dump_yaml(cfg))
        return 0
    scores = Pipeline(Path(cfg.log.out_dir) / "cache").resources.head_scores(cfg)
    output = args.output or Path(cfg.log.out_dir) / "scores" / f"{config_hash(cfg)}.safetensors"
    path = scores.save(output)
    table = scores.hess(lam=cfg.score.lam, proj=cfg.calib.proj, normalize=cfg.score.normalize)
    print(json.dumps({"artifact": str(path), "model": scores.model_id, "scenes": list(scores.scene_ids),
                      "traces_shape": list(scores.traces.shape), "lam": cfg.score.lam,
                      "hess": [[round(float(v), 4) for v in row] for row in table]}, indent=1))
    return 0
