"""A rehearsal of the paper protocol without real weights or data: the ``paper`` presets' code path, end to end.

Question: does ``hess reproduce all --preset paper`` run on a user's machine (VGGT-1B weights, CO3Dv2, DTU)?
Command:  python ablations/rehearse_paper.py --out /tmp/rehearsal          # VGGT-1B / π³ architectures, CPU
Output:   <out>/REHEARSAL.md (+ rehearsal.json): seconds and peak resident memory per RQ, the exact overrides,
          and the RQ reports under <out>/results/, every one headed "REHEARSAL: random weights".

What it does, with the project's own writers and loaders:

1. writes a CO3Dv2-format root (``write_co3d_category``: several categories, a train and a test subset,
   sequences of 50 frames at different aspect ratios, so VGGT's ``min_num_images`` filter and crop apply)
   and a DTU-format root (``write_dtu_scan``: MVSNet cams, depth .npy, masks) from synthetic scenes;
2. saves a VGGT checkpoint (default: the VGGT-1B architecture) with seeded random weights and its config to
   real files (a bare ``weights.safetensors`` + ``config.json`` passed as ``model.config``), and a π³ one;
3. runs ``hess.reproduce.reproduce([rq], "paper", ...)`` for every RQ — the ``paper`` presets exactly, with
   only counts shrunk (scenes, frames, latency repeats) plus what this machine forces (``model.device=cpu``,
   ``model.dtype=float32``, and for the default run a smaller frame size: ``SHRUNK``), timing each RQ and
   sampling the process's resident memory.

Numbers from random weights are labelled as a rehearsal everywhere: they test the code path, never the method.
"""
from __future__ import annotations

import gc
import json
import platform
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:
    import argparse

REHEARSAL_BANNER = ("> **REHEARSAL** — random weights on synthetic data written in the CO3Dv2 / DTU formats: these "
                    "numbers check the `paper` code path (`hess rehearse` / `ablations/rehearse_paper.py`); they are "
                    "not results.\n\n")


@dataclass
class RehearsalSpec:
    """Sizes of a rehearsal.  Counts: scenes, frames, latency repeats; sizes: frame height / width.

    Attributes:
        vggt_config / pi3_config: architecture presets or config dicts of the random-weight checkpoints.
        categories: CO3D categories written; sequences_per_subset: train and test sequences per category.
        co3d_sizes: (H, W) of the written CO3D sequences, cycled (different aspect ratios).
        dtu_scans: DTU scan ids written; dtu_views: images per scan (stride-5 views: ceil(n / 5)).
        overrides: dotted overrides added to every RQ (counts, device, sizes).
    """

    vggt_config: Any = "vggt-1b"
    pi3_config: Any = "pi3"
    categories: tuple[str, ...] = ("apple", "bench", "hydrant")
    sequences_per_subset: int = 1
    co3d_sizes: tuple[tuple[int, int], ...] = ((42, 56), (56, 42), (42, 70))
    dtu_scans: tuple[int, ...] = (1, 4)
    dtu_views: int = 6
    dtu_size: tuple[int, int] = (42, 56)
    overrides: tuple[str, ...] = ()
    rqs: tuple[str, ...] = ("rq1", "rq2", "rq3", "rq4", "latency", "rq5")
    seed: int = 0


#: counts shrunk + what a CPU machine forces, applied to every RQ of a rehearsal
SHRUNK = ("data.num_scenes=2", "data.num_frames=2", "calib.num_scenes=1", "calib.num_frames=2",
          "eval.latency_warmup=0", "eval.latency_repeats=1", "model.device=cpu", "model.dtype=float32",
          "data.height=28", "data.width=28", "calib.height=28", "calib.width=28")


def write_co3d_root(root: Path, spec: RehearsalSpec) -> Path:
    """CO3Dv2 layout: per category ``sequences_per_subset`` train and test sequences of 50 frames."""
    from hess.data import make_scene, scene_key
    from hess.data.co3d import write_co3d_category

    k = 0
    for c, cat in enumerate(spec.categories):
        sequences, subsets = {}, {}
        for subset in ("train", "test"):
            for i in range(spec.sequences_per_subset):
                h, w = spec.co3d_sizes[k % len(spec.co3d_sizes)]
                name = f"{100 + c}_{subset}_{i}"
                sequences[name] = make_scene(scene_key("val", 1000 + k, spec.seed), preset="orbit", num_frames=50,
                                             height=h, width=w, arc_deg=(60.0, 180.0))
                subsets[name] = subset
                k += 1
        write_co3d_category(root, cat, sequences, subsets)
    return root


def write_dtu_root(root: Path, spec: RehearsalSpec) -> Path:
    """DTU layout (MVSNet cams, depths in mm, binary masks) for ``spec.dtu_scans``."""
    from hess.data import make_scene, scene_key
    from hess.data.dtu import write_dtu_scan

    h, w = spec.dtu_size
    for i, scan in enumerate(spec.dtu_scans):
        scene = make_scene(scene_key("val", 2000 + i, spec.seed), preset="grid", num_frames=spec.dtu_views,
                           height=h, width=w, units="mm")
        write_dtu_scan(root, scan, scene)
    return root


def save_random_checkpoint(folder: Path, config: Any, family: str, seed: int = 0) -> tuple[Path, Path]:
    """A bare weights file (seeded random init of ``config``) and the architecture as a JSON file.

    Returns (weights.safetensors, config.json) — pass them as ``model.checkpoint`` and ``model.config``.
    """
    import torch
    from safetensors.torch import save_file

    from hess.models import PI3_PRESETS, VGGT_PRESETS, build_model

    folder.mkdir(parents=True, exist_ok=True)
    arch = config if isinstance(config, dict) else {**(PI3_PRESETS if family == "pi3" else VGGT_PRESETS)[config]}
    torch.manual_seed(seed)
    model = build_model(json.loads(json.dumps(arch)), family=family)
    weights, cfg_path = folder / "weights.safetensors", folder / "config.json"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights))
    cfg_path.write_text(json.dumps(arch, indent=1))
    del model
    gc.collect()
    return weights, cfg_path


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class _PeakSampler:
    """Samples this process's resident memory every ``interval`` seconds; ``peak`` is the maximum seen."""

    interval: float = 0.2
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> "_PeakSampler":
        self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def rehearse(out: str | Path, spec: Optional[RehearsalSpec] = None, *, progress: bool = True,
             wandb: bool = False) -> dict[str, Any]:
    """Write the data roots and checkpoints, run every RQ's ``paper`` preset, record time and peak memory.

    Returns {"rqs": {rq: {"seconds", "peak_rss_gib", "skipped", "failed"}}, "overrides": {rq: [...]},
    "co3d_root", "dtu_root", "report_dir", "machine", "date"}; also written to <out>/rehearsal.json and
    <out>/REHEARSAL.md.  The data roots reach the loaders through ``data.root`` / ``calib.root``.
    """
    import os

    from hess.reproduce import reproduce
    from hess.rq.pipeline import Pipeline

    spec = spec or RehearsalSpec()
    out = Path(out)
    started = time.perf_counter()
    co3d = write_co3d_root(out / "co3d", spec)
    dtu = write_dtu_root(out / "dtu", spec)
    vggt_w, vggt_c = save_random_checkpoint(out / "vggt", spec.vggt_config, "vggt", spec.seed)
    pi3_w, pi3_c = save_random_checkpoint(out / "pi3", spec.pi3_config, "pi3", spec.seed)
    setup_s = time.perf_counter() - started
    report_dir = out / "results"
    summary: dict[str, Any] = {"rqs": {}, "overrides": {}, "co3d_root": str(co3d), "dtu_root": str(dtu),
                               "report_dir": str(report_dir), "setup_seconds": round(setup_s, 1),
                               "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
                               "load_avg_start": os.getloadavg()[0],
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    pipe: Optional[Pipeline] = None
    for rq in spec.rqs:
        pi3 = rq == "rq5"
        dataset = "dtu" if rq in ("rq3", "rq5") else "co3d"
        overrides = [f"model.checkpoint={pi3_w if pi3 else vggt_w}", f"model.config={pi3_c if pi3 else vggt_c}",
                     f"data.root={dtu if dataset == 'dtu' else co3d}", f"calib.root={co3d}",
                     *(["data.scans=" + json.dumps(list(spec.dtu_scans))] if dataset == "dtu" else []),
                     *spec.overrides]
        summary["overrides"][rq] = overrides
        if pi3 and pipe is not None:            # π³ runs alone: drop the VGGT weights first
            pipe = None
            gc.collect()
        pipe = pipe or Pipeline(out / "runs" / "cache", progress=progress)
        start = time.perf_counter()
        with _PeakSampler() as mem:
            result = reproduce([rq], "paper", out=out / "runs", report_dir=report_dir, overrides=overrides,
                               wandb=wandb, progress=progress, pipeline=pipe, raise_single=False)
        summary["rqs"][rq] = {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gib": round(mem.peak / 2**30, 2),
                              "skipped": result["skipped"].get(rq), "failed": result["failed"].get(rq)}
        if pi3:
            pipe = None
            gc.collect()
    summary["total_seconds"] = round(time.perf_counter() - started, 1)
    _label_reports(report_dir)
    (out / "rehearsal.json").write_text(json.dumps(summary, indent=1))
    (out / "REHEARSAL.md").write_text(rehearsal_markdown(summary, spec))
    return summary


def _label_reports(report_dir: Path) -> None:
    for md in Path(report_dir).glob("*.md"):
        text = md.read_text()
        if not text.startswith(REHEARSAL_BANNER):
            md.write_text(REHEARSAL_BANNER + text)


def rehearsal_markdown(summary: dict[str, Any], spec: RehearsalSpec) -> str:
    """The table of seconds and peak resident memory per RQ, with how the rehearsal was sized."""
    rows = ["| RQ | seconds | peak RSS (GiB) | outcome |", "|---|---:|---:|---|"]
    for rq, r in summary["rqs"].items():
        outcome = "FAILED: " + r["failed"] if r["failed"] else ("skipped: " + r["skipped"] if r["skipped"] else "ran")
        rows.append(f"| {rq} | {r['seconds']:.0f} | {r['peak_rss_gib']:.2f} | {outcome} |")
    arch = lambda c: c if isinstance(c, str) else "custom config"  # noqa: E731
    return (REHEARSAL_BANNER + f"# Rehearsal of `hess reproduce all --preset paper`\n\n"
            f"{summary['date']}, {summary['machine']}, load average {summary['load_avg_start']:.1f} at start; "
            f"models: VGGT `{arch(spec.vggt_config)}` and π³ `{arch(spec.pi3_config)}` with seeded random weights; "
            f"setup (data roots + checkpoints) {summary['setup_seconds']:.0f} s, total {summary['total_seconds']:.0f} s.\n\n"
            + "\n".join(rows) + "\n\nOverrides on top of each `paper` preset:\n\n"
            + "\n".join(f"- {rq}: `{' '.join(o)}`" for rq, o in summary["overrides"].items()) + "\n")


def configure_cli(p: "argparse.ArgumentParser") -> None:
    """Arguments of ``hess rehearse`` / ``ablations/rehearse_paper.py``."""
    p.add_argument("--out", default="ablations/outputs/rehearsal", help="work folder (data roots, checkpoints, runs)")
    p.add_argument("--vggt", default="vggt-1b", help="VGGT architecture preset of the random checkpoint")
    p.add_argument("--pi3", default="pi3", help="π³ architecture preset of the random checkpoint")
    p.add_argument("--rqs", default="rq1,rq2,rq3,rq4,latency,rq5", help="comma-separated RQs")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="added after the rehearsal's SHRUNK overrides")


def run_cli(args: "argparse.Namespace") -> int:
    """Rehearse; prints the table; exit 1 if an RQ failed."""
    from hess.runtime import set_threads

    set_threads(args.threads)
    spec = RehearsalSpec(vggt_config=args.vggt, pi3_config=args.pi3, rqs=tuple(args.rqs.split(",")),
                         overrides=SHRUNK + tuple(args.overrides or ()))
    summary = rehearse(args.out, spec, progress=not args.quiet)
    print(rehearsal_markdown(summary, spec))
    return 1 if any(r["failed"] for r in summary["rqs"].values()) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``ablations/rehearse_paper.py``: the command line of ``rehearse``."""
    import argparse

    parser = argparse.ArgumentParser(description="Rehearse hess reproduce all --preset paper on CPU with random weights")
    configure_cli(parser)
    return run_cli(parser.parse_args(argv))
