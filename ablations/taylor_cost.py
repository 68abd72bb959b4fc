"""Calibration cost of ``sparsity-taylor`` against HeSS, measured side by side (issue 18; target <= 2x HeSS).

Question: how long does the sparsity-taylor calibration take compared with HeSS's on the same scenes?
Command:  PYTHONPATH=$PWD python ablations/taylor_cost.py --model hess-tiny          (the demo's calibration)
          PYTHONPATH=$PWD python ablations/taylor_cost.py --model vggt-1b --scenes 1 --height 392 --width 518 \
              --q-block 128 --k-block 64 --checkpointing --repeats 1     (VGGT-1B architecture, random weights)
Output:   one JSON line per timed run and a summary (median seconds per method, ratio, machine load);
          --out FILE writes the summary as JSON.

Runs alternate A B B A … (HeSS first), so a machine whose load drifts slows both methods alike; the
load average (``os.getloadavg``) is recorded before and after every run.  The VGGT-1B run uses random
weights (its cost does not depend on them) and is flagged so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hess.calibrate import CalibConfig, calibrate  # noqa: E402
from hess.taylor import calibrate_taylor  # noqa: E402


def build(args) -> tuple[torch.nn.Module, list, str]:
    from hess.rq.resources import _synthetic

    if args.model == "hess-tiny":
        from hess.models import load_model

        model, weights = load_model("hess-tiny", family="vggt"), "embedded"
    else:
        from hess.models import build_vggt

        torch.manual_seed(0)
        model, weights = build_vggt(args.model), "random-init"
    scenes = _synthetic("calib", args.scenes, args.frames, args.height, args.width, 1, None)
    return model.eval(), scenes, weights


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="hess-tiny", help="hess-tiny (embedded) or a VGGT preset (random weights)")
    p.add_argument("--scenes", type=int, default=4)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--height", type=int, default=84)
    p.add_argument("--width", type=int, default=84)
    p.add_argument("--keep-ratio", type=float, default=0.27)
    p.add_argument("--q-block", type=int, default=12)
    p.add_argument("--k-block", type=int, default=6)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--max-points", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3, help="runs per method (A B B A ...)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, scenes, weights = build(args)
    print(json.dumps({"built_s": round(time.perf_counter() - t0, 1), "model": args.model, "weights": weights,
                      "load": os.getloadavg()}), flush=True)
    config = CalibConfig(progress=False, checkpointing=args.checkpointing, max_points=args.max_points)
    runs = {
        "hess": lambda: calibrate(model, scenes, config),
        "sparsity-taylor": lambda: calibrate_taylor(model, scenes, config, keep_ratio=args.keep_ratio,
                                                    q_block=args.q_block, k_block=args.k_block),
    }
    order = []
    for r in range(args.repeats):
        order += ["hess", "sparsity-taylor"] if r % 2 == 0 else ["sparsity-taylor", "hess"]
    times: dict[str, list[float]] = {k: [] for k in runs}
    loads = []
    for name in order:
        before = os.getloadavg()[0]
        t = time.perf_counter()
        runs[name]()
        dt = time.perf_counter() - t
        after = os.getloadavg()[0]
        times[name].append(dt)
        loads += [before, after]
        print(json.dumps({"method": name, "seconds": round(dt, 3), "load1_before": before, "load1_after": after}),
              flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    summary = {
        "model": args.model, "weights": weights, "scenes": args.scenes, "frames": args.frames,
        "hw": [args.height, args.width], "keep_ratio": args.keep_ratio, "blocks": [args.q_block, args.k_block],
        "checkpointing": args.checkpointing, "threads": torch.get_num_threads(), "times_s": times,
        "median_s": med, "ratio_taylor_over_hess": med["sparsity-taylor"] / med["hess"],
        "load1_min_max": [min(loads), max(loads)], "machine": f"{platform.node()} {platform.processor() or ''} "
        f"{os.cpu_count()} cpus", "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    print(json.dumps(summary, indent=1), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
