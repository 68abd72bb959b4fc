"""Peak memory and time of HeSS calibration of the VGGT-1B architecture on CPU, with / without checkpointing.

Question: does calibrating VGGT-1B fit, and what do gradient checkpointing (and autocast) buy?
Command:  python ablations/calib_memory.py --frames 4 --height 392 --width 518 --threads 1
          python ablations/calib_memory.py --config vggt-parity-a --frames 2 --height 56 --width 56   # quick check
Output:   one JSON line per setting (checkpointing off / on): seconds of ``hess.calibrate.calibrate`` on one
          synthetic scene, peak resident memory of the process (ru_maxrss) and the resident memory before
          calibration (model + scene), so ``peak - before`` is what the calibration itself adds.

Each setting runs in a fresh subprocess, so that one peak does not hide the other.  The weights are random
(seeded; only memory and time are measured, never accuracy): ``build_vggt("vggt-1b")`` is the real
architecture (DINOv2 ViT-L/14-reg, 24 frame + 24 global blocks of width 1024, all heads).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(config: str, frames: int, height: int, width: int, checkpointing: bool, autocast: str | None,
            threads: int) -> dict:
    """Calibrate once in this process; returns the figures (run it in a fresh process per setting)."""
    import torch

    from hess.calibrate import CalibConfig, calibrate
    from hess.models.vggt import build_vggt
    from hess.rq.resources import SCENE_SOURCES

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_vggt(config).eval()
    scene = SCENE_SOURCES.get("synthetic")("calib", 1, frames, height, width, 0, None)[0]
    before = _rss_mib()
    cfg = CalibConfig(checkpointing=checkpointing, autocast=autocast, progress=False)
    start = time.perf_counter()
    scores = calibrate(model, [scene], cfg)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"config": config, "frames": frames, "height": height, "width": width, "checkpointing": checkpointing,
            "autocast": autocast, "threads": threads, "seconds": round(seconds, 1), "rss_before_mib": round(before),
            "peak_rss_mib": round(peak), "calibration_adds_mib": round(peak - before),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "traces_finite": bool(torch.isfinite(scores.traces).all()), "machine": platform.node(),
            "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="vggt-1b", help="VGGT preset (default vggt-1b)")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--height", type=int, default=392)
    p.add_argument("--width", type=int, default=518)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--autocast", default=None, help="bfloat16 to also autocast (CPU bf16 is slow; CUDA is the target)")
    p.add_argument("--settings", default="off,on", help="checkpointing settings to run, comma-separated")
    p.add_argument("--child", choices=["off", "on"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.config, args.frames, args.height, args.width, args.child == "on",
                                 args.autocast, args.threads)), flush=True)
        return 0
    for setting in args.settings.split(","):
        cmd = [sys.executable, __file__, "--child", setting, "--config", args.config, "--frames", str(args.frames),
               "--height", str(args.height), "--width", str(args.width), "--threads", str(args.threads)]
        if args.autocast:
            cmd += ["--autocast", args.autocast]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(json.dumps({"checkpointing": setting == "on", "error": out.stderr.strip().splitlines()[-1:]}))
            continue
        print(out.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
