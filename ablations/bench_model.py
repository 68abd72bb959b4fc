"""End-to-end speed and memory of one model forward: dense vs uniform vs HeSS budgets (issue 17).

What: the VGGT-1B architecture with random weights (weights do not change speed) at a given frame
count and resolution.  One *round* runs, back to back, one forward of every configuration:

* ``dense-all``: dense attention as before issue 17 and as the official model: every aggregator output
  kept (``keep_all_layers``), depth/point heads 8 frames at a time;
* ``dense``: dense attention, hess's default: only the aggregator outputs the heads read, heads
  ``VGGT.head_frames_chunk_size`` (2) frames at a time;
* ``uniform@k`` and ``hess@k`` for each keep ratio k (default 0.57 / 0.27 / 0.1): sparse global attention
  (``hess.sparsify``, backend ``auto``) with SparseVGGT's uniform budgets ``c = floor(k·n_k)``, and with
  HeSS budgets from ``hess.budget.allocate`` (same total per layer).  Random weights carry no head
  sensitivity, so the HeSS budgets come from seeded log-normal head scores (σ = 1): they have the
  ragged shape a calibration gives, which is what matters for speed.

Rounds are interleaved (the order rotates per round), times are medians over rounds and speed-ups the
median of the per-round ratios dense / config, so a shared machine whose speed drifts stays comparable.

Per-component time comes from forward hooks: patch embed, frame attention (the ``attn`` of the frame
blocks: qkv, RoPE, SDPA, proj), global attention (the same for global blocks) with its core alone
(``global_core``: dense SDPA or the sparse op including block selection), the blocks' MLPs, the heads;
``other`` is the rest (norms, residuals, layer scale, concatenations).

Peak memory (CPU): resident set size sampled every 2 ms from ``/proc/self/statm`` by a thread during
the forward; glibc's mmap threshold is fixed at 128 KiB (``mallopt``) so freed tensors go back to the
OS and RSS follows the live tensors.  ``act_bytes`` = peak RSS − RSS just before the forward (weights
and inputs excluded).  On CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus the
allocation before the forward.

How to run::

    python ablations/bench_model.py --frames 2 4 8 --rounds 1 --out ablations/results/bench/model_cpu.csv
    python ablations/bench_model.py --config vggt-parity-a --frames 2 --height 56 --width 56 --rounds 2
    python ablations/bench_model.py --device cuda --dtype bfloat16 --frames 8 32 100   # a GPU machine

Rows are appended to ``--out`` as they finish; a rerun skips the (frames, config, round) rows already
there, so a killed run resumes.  The summary table (stdout, Markdown) is printed at the end, or alone
with ``--summary CSV``.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import os
import platform
import socket
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

import torch

from hess.budget import allocate
from hess.models.vggt import build_vggt
from hess.patch import SparsePlan, densify, realized_density, sparsify

KEEPS = (0.57, 0.27, 0.1)
COMPONENTS = ("patch_embed", "frame_attn", "global_attn", "global_core", "mlp", "heads")
FIELDS = ["date", "host", "device", "config_name", "dtype", "threads", "frames", "height", "width", "config",
          "keep", "round", "total_s", *[f"{c}_s" for c in COMPONENTS], "other_s", "base_bytes", "peak_bytes",
          "act_bytes", "density", "load_before", "load_after"]
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def fix_malloc_threshold(nbytes: int = 128 << 10) -> bool:
    """glibc: serve allocations above ``nbytes`` with mmap and return them on free (RSS = live memory)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, nbytes))  # M_MMAP_THRESHOLD
    except OSError:
        return False


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


class PeakRSS:
    """Context manager sampling RSS every ``interval`` s; ``.peak`` and ``.base`` in bytes."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self.base = interval, 0, 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


class ComponentTimer:
    """Forward hooks adding wall time per component (see module docstring); CUDA-synchronising."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.times: dict[str, float] = defaultdict(float)
        self._start: dict[int, float] = {}
        self.cuda = next(model.parameters()).is_cuda
        agg = model.aggregator
        groups: dict[str, list[torch.nn.Module]] = {
            "patch_embed": [agg.patch_embed],
            "frame_attn": [b.attn for b in agg.frame_blocks],
            "global_attn": [b.attn for b in agg.global_blocks],
            "mlp": [b.mlp for b in list(agg.frame_blocks) + list(agg.global_blocks)],
            "heads": [h for h in (model.camera_head, model.depth_head, model.point_head, model.track_head) if h is not None],
        }
        self.handles = []
        for name, modules in groups.items():
            for m in modules:
                self._hook(m, name)
        self.global_attn = groups["global_attn"]

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _hook(self, module: torch.nn.Module, name: str) -> None:
        def pre(mod, args, kwargs=None):
            self._start[id(mod)] = self._now()

        def post(mod, args, out):
            self.times[name] += self._now() - self._start.pop(id(mod))

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def hook_cores(self) -> None:
        """(Re)hook the attention cores of the global blocks (they change with sparsify/densify)."""
        for h in getattr(self, "_core_handles", []):
            h.remove()
        before = len(self.handles)
        for attn in self.global_attn:
            self._hook(attn.core, "global_core")
        self._core_handles, self.handles = self.handles[before:], self.handles[:before]

    def reset(self) -> None:
        self.times.clear()


def hess_scores(layers: int, heads: int, seed: int = 0) -> torch.Tensor:
    """[L, H] seeded log-normal head scores (σ = 1): the ragged shape of a HeSS calibration."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, heads, generator=g, dtype=torch.float64).exp()


def plans(model, frames: int, height: int, width: int, keeps, k_block: int = 64) -> dict[str, Optional[SparsePlan]]:
    """Configuration name → SparsePlan (None: dense)."""
    agg = model.aggregator
    P_img = (height // agg.patch_size) * (width // agg.patch_size)
    n_k = -(-frames * P_img // k_block)
    L, H = agg.depth, agg.global_blocks[0].attn.num_heads
    out: dict[str, Optional[SparsePlan]] = {"dense-all": None, "dense": None}
    for k in keeps:
        out[f"uniform@{k}"] = SparsePlan(keep_ratio=float(k), k_block=k_block)
        out[f"hess@{k}"] = SparsePlan(blocks_per_head=allocate(hess_scores(L, H), float(k), n_k), k_block=k_block)
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    if torch.cuda.is_available():
        cpu += f" + {torch.cuda.get_device_name()}"
    return f"{socket.gethostname()} ({cpu}, {os.cpu_count()} cores)"


def forward_once(model, images: torch.Tensor, timer: ComponentTimer, keep_all: bool) -> dict:
    """One timed forward: total, components, peak memory."""
    cuda = images.is_cuda
    timer.reset()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    load_before = os.getloadavg()[0]
    chunk = model.head_frames_chunk_size
    model.head_frames_chunk_size = 8 if keep_all else chunk  # dense-all: the official memory behaviour
    with torch.inference_mode(), PeakRSS() as mem:
        t0 = time.perf_counter()
        out = model(images, keep_all_layers=keep_all)
        if cuda:
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
    model.head_frames_chunk_size = chunk
    del out
    base_b, peak_b = (base, torch.cuda.max_memory_allocated()) if cuda else (mem.base, mem.peak)
    comp = {f"{c}_s": round(timer.times.get(c, 0.0), 4) for c in COMPONENTS}
    accounted = sum(timer.times.get(c, 0.0) for c in COMPONENTS if c != "global_core")
    return dict(total_s=round(total, 4), **comp, other_s=round(total - accounted, 4), base_bytes=base_b,
                peak_bytes=peak_b, act_bytes=peak_b - base_b, load_before=round(load_before, 2),
                load_after=round(os.getloadavg()[0], 2))


def _done(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    with path.open() as fh:
        return {(r["config_name"], r["dtype"], r["device"], int(r["frames"]), int(r["height"]), int(r["width"]),
                 r["config"], int(r["round"])) for r in csv.DictReader(fh)}


def run(args, log: Callable[[str], None]) -> None:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    log(f"building {args.config} (random weights, {args.dtype}) on {device} ...")
    model = build_vggt(args.config, dtype=dtype).to(device).eval()
    timer = ComponentTimer(model)
    done = _done(args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new_file = not args.out.exists()
    with args.out.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        for frames in args.frames:
            g = torch.Generator().manual_seed(frames)
            images = torch.rand(1, frames, 3, args.height, args.width, generator=g).to(device)
            configs = plans(model, frames, args.height, args.width, args.keeps)
            names = list(configs)
            for rnd in range(args.rounds):
                order = names[rnd % len(names):] + names[: rnd % len(names)]  # rotate per round
                for name in order:
                    key = (args.config, args.dtype, args.device, frames, args.height, args.width, name, rnd)
                    if key in done:
                        continue
                    plan = configs[name]
                    densify(model) if plan is None else sparsify(model, plan)
                    timer.hook_cores()
                    row = forward_once(model, images, timer, keep_all=name == "dense-all")
                    density = 1.0 if plan is None else realized_density(model).overall
                    row.update(date=datetime.datetime.now().isoformat(timespec="seconds"), host=machine(),
                               device=args.device, config_name=args.config, dtype=args.dtype, threads=args.threads,
                               frames=frames, height=args.height, width=args.width, config=name,
                               keep=1.0 if plan is None else float(name.split("@")[1]), round=rnd,
                               density=round(density, 4))
                    writer.writerow(row)
                    fh.flush()
                    log(f"  S={frames} round {rnd} {name:12s} {row['total_s']:8.2f}s  global core "
                        f"{row['global_core_s']:7.2f}s  act {row['act_bytes'] / 2**30:6.2f} GiB  "
                        f"density {density:.3f}  load {row['load_before']}")
    densify(model)


def summarize(path: Path) -> str:
    """Markdown table of medians per (frames, config); speed-up = median of per-round dense / config."""
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    by: dict[tuple, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        by[(r["config_name"], r["device"], r["dtype"], int(r["frames"]), int(r["height"]), int(r["width"]))][
            r["config"]][int(r["round"])] = r
    med = lambda rs, f: statistics.median(float(r[f]) for r in rs)  # noqa: E731
    head = ("| frames | config | density | total (s) | speed-up | patch embed | frame attn | global attn "
            "(core) | MLPs | heads | other | act. mem (GiB) | rounds | load |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key in sorted(by):
        configs = by[key]
        dense = configs.get("dense", {})
        for name in sorted(configs, key=lambda n: (n.split("@")[0] not in ("dense-all", "dense"), n.split("@")[0] != "dense-all",
                                                    -float(n.split("@")[1]) if "@" in n else 0, n)):
            rs = list(configs[name].values())
            paired = [float(dense[i]["total_s"]) / float(r["total_s"]) for i, r in configs[name].items() if i in dense]
            sp = f"{statistics.median(paired):.2f}×" if paired else "–"
            loads = [float(r["load_before"]) for r in rs]
            lines.append(
                f"| {key[3]} | {name} | {med(rs, 'density'):.3f} | {med(rs, 'total_s'):.1f} | {sp} | "
                f"{med(rs, 'patch_embed_s'):.1f} | {med(rs, 'frame_attn_s'):.1f} | {med(rs, 'global_attn_s'):.1f} "
                f"({med(rs, 'global_core_s'):.1f}) | {med(rs, 'mlp_s'):.1f} | {med(rs, 'heads_s'):.1f} | "
                f"{med(rs, 'other_s'):.1f} | {med(rs, 'act_bytes') / 2**30:.2f} | {len(rs)} | "
                f"{min(loads):.1f}–{max(loads):.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="vggt-1b", help="VGGT preset name or config.json (default vggt-1b)")
    ap.add_argument("--frames", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--height", type=int, default=392)
    ap.add_argument("--width", type=int, default=518)
    ap.add_argument("--keeps", nargs="+", type=float, default=list(KEEPS))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", type=Path, default=Path("ablations/outputs/bench_model.csv"))
    ap.add_argument("--summary", type=Path, default=None, help="only print the table of an existing CSV")
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.summary is not None:
        print(summarize(args.summary))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_model: --device cuda but no CUDA device is available; use --device cpu")
    torch.set_num_threads(args.threads)
    fixed = args.device == "cpu" and fix_malloc_threshold()
    log(f"{machine()}, torch {torch.__version__}, {args.threads} threads, mmap threshold fixed: {fixed}, "
        f"load {os.getloadavg()[0]:.2f}")
    run(args, log)
    print(summarize(args.out))
    print(f"\n{datetime.datetime.now().isoformat(timespec='seconds')}; CSV: {args.out}")


if __name__ == "__main__":
    main()
