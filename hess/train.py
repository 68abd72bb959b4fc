"""``hess train``: train the small embedded VGGT (``hess-tiny``) on synthetic orbit scenes.

    cfg = TrainConfig(out_dir="runs/tiny", minutes=60)
    path = train(cfg)                          # -> out_dir/model.safetensors (+ config.json, log.csv)
    python -m hess.train --out-dir runs/tiny --minutes 60

Regime (see ``hess/assets/MODEL_CARD.md``): a bank of pre-rendered 4-view orbit scenes on 25–90° arcs (the first 6,000 steps used 8–40°);
each step samples S frames of B scenes in random order (curriculum: S = 2 first, then 2..4), with a
random horizontal mirror.  Losses (``hess.losses``): VGGT camera loss, frame-0-coordinate point-map loss,
cross-view attention supervision of one head per global layer and a correspondence-location head
(training only, never shipped).  Deterministic by seed; resumable from ``out_dir/ckpt.pt``.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from hess.data.bank import load_bank, render_bank
from hess.data.synthetic import EMBEDDED_SCENE_OPTIONS

#: Synthetic options of the training bank and of the test split (``hess.data.synthetic``).
SCENE_OPTIONS: dict[str, Any] = EMBEDDED_SCENE_OPTIONS  # the embedded model's training distribution


# ------------------------------------------------------------------------------------------- config
from hess.objectives import OBJECTIVES, TINY8_MODEL_CONFIG, TINY_MODEL_CONFIG, TINY_PI3_CONFIG  # noqa: F401 (re-exported)


@dataclass
class TrainConfig:
    """Everything that defines a run (saved beside the checkpoint).

    steps: optimiser steps (the cosine schedule spans them); minutes / stop_at: optional wall-clock or
    step cap (the run saves and stops; rerun the same command to resume).  eval_scenes = 0: no eval.  curriculum_steps: S = 2 adjacent-view pairs
    before it, then S ∈ frames_range with any views.  w_*: loss weights (0 disables a loss); the
    shipped hess-tiny used the defaults (w_dir = w_probe = 0: the deep pose probes and the translation
    direction loss are untested options).  arc_deg: the orbit arc range of the bank and of the val
    curve and walls: corner walls behind the objects (None: as in ``SCENE_OPTIONS``).  init_from: a
    ``.safetensors`` VGGT to start from (fine-tuning; ignored when ``out_dir/ckpt.pt`` exists, which
    resumes instead); its keys must match the model exactly, except those under an ``init_reset``
    prefix (e.g. ``"point_head."``) or matching an ``init_reset`` glob (e.g. ``"*.q_norm.*"``), which keep
    their fresh initialisation (to grow a head, or to change the head count).  family: ``OBJECTIVES`` key
    (``vggt`` or ``pi3``); model: its architecture (None: the family's tiny default).  views: frames per
    bank scene and per val scene (None: ``SCENE_OPTIONS``).  attn_heads: probed heads of every global layer
    (None: all); attn_pool: ``hess.losses.ATTENTION_POOLS`` key (``"mean"`` supervises the head-averaged
    attention, so no head is hard-wired to match).  w_conf: π³'s confidence BCE.
    """

    out_dir: str = "runs/hess-tiny"
    bank_dir: str = "/tmp/hess_bank"
    seed: int = 0
    steps: int = 8000
    minutes: Optional[float] = None
    stop_at: Optional[int] = None
    batch_size: int = 8
    frames_range: tuple[int, int] = (2, 4)
    curriculum_steps: int = 1500
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 100
    clip: float = 1.0
    w_camera: float = 2.0
    w_point: float = 1.0
    w_attn: float = 0.5
    w_loc: float = 1.0
    w_probe: float = 0.0
    w_dir: float = 0.0
    attn_heads: Optional[tuple[int, ...]] = (0,)
    attn_pool: str = "each"
    w_conf: float = 1.0
    family: str = "vggt"
    views: Optional[int] = None
    eval_every: int = 500
    eval_scenes: int = 24
    save_every_s: float = 180.0
    threads: int = 2
    wandb: bool = True
    arc_deg: Optional[tuple[float, float]] = None
    walls: Optional[bool] = None
    init_from: Optional[str] = None
    init_reset: tuple[str, ...] = ()
    model: Optional[dict] = None

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = json.loads(json.dumps(OBJECTIVES.get(self.family).default_model))

    def scene_options(self) -> dict[str, Any]:
        """Synthetic options of this run's bank and val scenes."""
        return {**SCENE_OPTIONS, **self.scene_overrides()}

    def scene_overrides(self) -> dict[str, Any]:
        """The options this run sets on top of ``SCENE_OPTIONS`` (checked against the bank's shards)."""
        out = {"arc_deg": tuple(self.arc_deg)} if self.arc_deg is not None else {}
        out.update({"num_frames": int(self.views)} if self.views is not None else {})
        return {**out, **({"walls": bool(self.walls)} if self.walls is not None else {})}


# ------------------------------------------------------------------------------------------ training
LOG_COLUMNS = ("total", "camera", "point", "attn", "loc", "dir", "probe", "conf", "grad_norm")   # log.csv after step, seconds, S


def _param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "token" in name else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def _sample(gen: torch.Generator, n_bank: int, views: int, cfg: TrainConfig, step: int):
    B = cfg.batch_size
    scene_idx = torch.randint(n_bank, (B,), generator=gen)
    mirror = torch.rand(B, generator=gen) < 0.5
    if step < cfg.curriculum_steps:                                          # adjacent pair, random order
        a = torch.randint(views - 1, (B,), generator=gen)
        swap = torch.rand(B, generator=gen) < 0.5
        frames = torch.stack([torch.where(swap, a + 1, a), torch.where(swap, a, a + 1)], 1)
    else:
        lo, hi = cfg.frames_range
        S = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        frames = torch.stack([torch.randperm(views, generator=gen)[:S] for _ in range(B)])
    return scene_idx, frames, mirror


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    prog = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * prog))


class Trainer:
    """Model + training-only modules + optimiser; ``step(batch) -> dict of losses``."""

    def __init__(self, cfg: TrainConfig) -> None:
        from hess.losses import AttentionProbe

        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.objective = OBJECTIVES.get(cfg.family)
        self.model = self.objective.build(cfg.model)
        self.aux = torch.nn.ModuleList(self.objective.aux(cfg, self.model))   # training only, never exported
        self.probes = []
        if cfg.w_attn > 0:
            for attn in self.model.global_attention_layers():
                attn.core = AttentionProbe(cfg.attn_heads)
                self.probes.append(attn.core)
        params = _param_groups(self.model, cfg.weight_decay) + _param_groups(self.aux, cfg.weight_decay)
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95))

    def losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        cfg = self.cfg
        out = self.objective.losses(self.model, list(self.aux), self.probes, batch, cfg)
        weights = {"camera": cfg.w_camera, "point": cfg.w_point, "attn": cfg.w_attn, "loc": cfg.w_loc,
                   "dir": cfg.w_dir, "probe": cfg.w_probe, "conf": cfg.w_conf}
        out["total"] = sum(weights[k] * v for k, v in out.items())
        return out

    def step(self, batch: dict[str, Tensor], lr: float) -> dict[str, float]:
        self.model.train()
        for g in self.opt.param_groups:
            g["lr"] = lr
        out = self.losses(batch)
        if not torch.isfinite(out["total"]):
            raise FloatingPointError(f"non-finite loss: { {k: float(v) for k, v in out.items()} }")
        self.opt.zero_grad(set_to_none=True)
        out["total"].backward()
        gn = torch.nn.utils.clip_grad_norm_(list(self.model.parameters()) + list(self.aux.parameters()), self.cfg.clip)
        self.opt.step()
        return {**{k: v.item() for k, v in out.items()}, "grad_norm": gn.item()}

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "aux": self.aux.state_dict(), "opt": self.opt.state_dict()}

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if "aux" in state:
            self.aux.load_state_dict(state["aux"])
        else:                                                                 # checkpoints before PoseProbes
            self.aux[0].load_state_dict(state["loc_head"])
        self.opt.load_state_dict(state["opt"])

    def export(self, path: Path) -> Path:
        """The shipped model only: safetensors (fp32) and ``config.json`` beside it (what ``load_vggt`` /
        ``load_pi3`` read for a directory or a weights file with a config beside it)."""
        from safetensors.torch import save_file

        sd = {k: v.detach().contiguous().clone() for k, v in self.model.state_dict().items()}
        save_file(sd, str(path))
        (path.parent / EXPORT_CONFIG).write_text(json.dumps(self.cfg.model, indent=1))
        return path


#: File name of the architecture written beside an exported model (the loaders' ``config.json``).
EXPORT_CONFIG = "config.json"


def _save(path: Path, trainer: Trainer, step: int, gen: torch.Generator, elapsed: float, history: list) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({**trainer.state(), "step": step, "gen": gen.get_state(), "elapsed": elapsed,
                "history": history, "torch_rng": torch.get_rng_state()}, tmp)
    tmp.replace(path)


def _is_reset(key: str, reset: tuple[str, ...]) -> bool:
    """Whether ``key`` stays freshly initialised: under a prefix, or matching a glob (``*`` or ``?`` in it)."""
    return any(fnmatch.fnmatchcase(key, r) if any(c in r for c in "*?[") else key.startswith(r) for r in reset)


def _init_weights(model: torch.nn.Module, path: Path, reset: tuple[str, ...]) -> None:
    """Load ``path`` into ``model``: every key must match, except those under a ``reset`` prefix (kept)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"--init-from {path}: no such checkpoint file")
    source = {k: v for k, v in load_file(str(path)).items() if not _is_reset(k, reset)}
    mine = model.state_dict()
    missing = [k for k in mine if k not in source and not _is_reset(k, reset)]
    unexpected = [k for k in source if k not in mine]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(mine[k].shape)}" for k, v in source.items()
             if k in mine and v.shape != mine[k].shape]
    if missing or unexpected or wrong:
        raise KeyError(f"--init-from {path} does not match the model config: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}, shape (checkpoint vs model) {wrong[:5]}; "
                       "use --init-reset PREFIX to keep parts freshly initialised")
    model.load_state_dict(source, strict=False)


def train(config: TrainConfig) -> Path:
    """Train (or resume) ``config``; returns the exported ``out_dir/model.safetensors``."""
    from tqdm import tqdm

    from hess.losses import make_batch

    cfg = config
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    bank = load_bank(cfg.bank_dir, cfg.scene_overrides())
    n_bank, views = bank["images"].shape[:2]
    trainer = Trainer(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, elapsed, history = 0, 0.0, []
    ckpt = out / "ckpt.pt"
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        trainer.load(st)
        gen.set_state(st["gen"])
        torch.set_rng_state(st["torch_rng"])
        step, elapsed, history = st["step"], st["elapsed"], st["history"]
    elif cfg.init_from:
        _init_weights(trainer.model, Path(cfg.init_from), tuple(cfg.init_reset))
    run = None
    if cfg.wandb:
        try:
            import wandb

            run = wandb.init(project="hess", name=out.name, config=asdict(cfg), dir=str(out),
                             mode="online" if os.environ.get("WANDB_API_KEY") else "offline")
        except Exception as err:                                              # logging must not kill training
            print(f"wandb disabled: {err}")
    eval_scenes = None
    log = open(out / "log.csv", "a", newline="")
    writer = csv.writer(log)
    bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True)
    t_start, t_save = time.time() - elapsed, time.time()
    while step < cfg.steps:
        if cfg.minutes is not None and time.time() - t_start > cfg.minutes * 60:
            break
        if cfg.stop_at is not None and step >= cfg.stop_at:
            break
        scene_idx, frames, mirror = _sample(gen, n_bank, views, cfg, step)
        batch = make_batch(bank, scene_idx, frames, mirror)
        stats = trainer.step(batch, cfg.lr * _lr_factor(step, cfg))
        step += 1
        writer.writerow([step, round(time.time() - t_start, 1), frames.shape[1]] +
                        [round(stats.get(k, float("nan")), 5) for k in LOG_COLUMNS])
        bar.update(1)
        bar.set_postfix(loss=f"{stats['total']:.3f}", cam=f"{stats['camera']:.3f}")
        if run is not None:
            run.log(stats, step=step)
        if cfg.eval_scenes > 0 and (step % cfg.eval_every == 0 or step == cfg.steps):
            from hess.evaluate import evaluate_model, eval_scenes_default

            if eval_scenes is None:
                eval_scenes = eval_scenes_default("val", cfg.eval_scenes, options=cfg.scene_options())
            trainer.model.eval()
            m = evaluate_model(trainer.model, eval_scenes, attention="dense")
            m.update(step=step, minutes=round((time.time() - t_start) / 60, 2))
            history.append(m)
            (out / "curve.json").write_text(json.dumps(history, indent=1))
            bar.write(f"step {step}: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}))
            if run is not None:
                run.log({f"val/{k}": v for k, v in m.items() if isinstance(v, (int, float))}, step=step)
        if time.time() - t_save > cfg.save_every_s:
            log.flush()
            _save(ckpt, trainer, step, gen, time.time() - t_start, history)
            trainer.export(out / "model.safetensors")
            t_save = time.time()
    log.close()
    _save(ckpt, trainer, step, gen, time.time() - t_start, history)
    path = trainer.export(out / "model.safetensors")
    if run is not None:
        run.finish()
    return path


_CLI_FIELDS = ("out_dir", "bank_dir", "seed", "steps", "minutes", "batch_size", "curriculum_steps", "lr", "w_camera",
               "w_point", "w_attn", "w_loc", "w_dir", "w_probe", "w_conf", "eval_every", "eval_scenes", "threads",
               "family", "attn_pool")


def configure_cli(p: argparse.ArgumentParser) -> None:
    """Arguments of ``hess train`` (every ``TrainConfig`` field listed in ``_CLI_FIELDS``, plus extras)."""
    d = TrainConfig()
    for name in _CLI_FIELDS:
        default = getattr(d, name)
        kind = float if name in ("minutes", "lr") or isinstance(default, float) else (int if isinstance(default, int) else str)
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default)
    p.add_argument("--arc-deg", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="orbit arc range in degrees of the bank and val scenes (default: the embedded distribution)")
    p.add_argument("--walls", action=argparse.BooleanOptionalAction, default=None,
                   help="corner walls behind the objects in the bank and val scenes (default: the embedded distribution)")
    p.add_argument("--init-from", default=None, help="start from this .safetensors model (fine-tuning)")
    p.add_argument("--init-reset", nargs="*", default=[], metavar="PREFIX",
                   help="with --init-from: state-dict key prefixes not loaded (kept freshly initialised), e.g. point_head.")
    p.add_argument("--model-config", type=Path, default=None,
                   help="JSON file of the sectioned build_vggt config (default: hess-tiny's architecture)")
    p.add_argument("--views", type=int, default=None,
                   help="frames per bank and val scene (default: the embedded distribution's)")
    p.add_argument("--frames-range", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="after the curriculum, S is drawn from LO..HI (default 2 4)")
    p.add_argument("--attn-heads", nargs="+", default=None, metavar="H",
                   help="probed heads of every global layer, or 'all' (default: 0)")
    p.add_argument("--stop-at", type=int, default=None, help="save and stop at this step (schedule unchanged)")
    p.add_argument("--no-wandb", action="store_true")
    p.add_argument("--render-bank", default="", metavar="A-B[,C-D]",
                   help="first render train scenes A..B-1 (and C..D-1, ...) into --bank-dir in shards of 100 "
                        "(skipping shards already there), then train; hess-tiny used 0-1200,4000-5200")


def run_cli(a: argparse.Namespace) -> int:
    """Render the requested bank shards, then ``train``; prints the exported checkpoint path."""
    extra: dict[str, Any] = {}
    if a.model_config:
        extra["model"] = json.loads(a.model_config.read_text())
    if a.frames_range:
        extra["frames_range"] = tuple(a.frames_range)
    if a.attn_heads:
        extra["attn_heads"] = None if a.attn_heads == ["all"] else tuple(int(h) for h in a.attn_heads)
    cfg = TrainConfig(**{k: getattr(a, k) for k in _CLI_FIELDS}, stop_at=a.stop_at, wandb=not a.no_wandb,
                      arc_deg=tuple(a.arc_deg) if a.arc_deg else None, walls=a.walls, views=a.views,
                      init_from=a.init_from, init_reset=tuple(a.init_reset), **extra)
    for part in filter(None, a.render_bank.split(",")):
        try:
            first, last = (int(x) for x in part.split("-"))
        except ValueError:
            raise SystemExit(f"--render-bank expects ranges like 0-1200,4000-5200, got {part!r}") from None
        for s in range(first, last, 100):
            shard = Path(cfg.bank_dir) / f"shard_{s:06d}.pt"
            if not shard.exists():
                render_bank(shard, "train", s, min(100, last - s), seed=cfg.seed, options=cfg.scene_options())
    print(train(cfg))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: ``python -m hess.train [--out-dir D] [--steps N] [--stop-at K] [--no-wandb] ...`` (= ``hess train``)."""
    p = argparse.ArgumentParser(prog="hess train", description=__doc__.splitlines()[0])
    configure_cli(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__" and not os.environ.get("HESS_RENDER_ONLY"):
    raise SystemExit(main())

if __name__ == "__main__" and os.environ.get("HESS_RENDER_ONLY"):
    import sys
    d, split, first, last, per = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    for s in range(first, last, per):
        p = Path(d) / f"shard_{s:06d}.pt"
        if not p.exists():
            render_bank(p, split, s, per)
            print("rendered", p, flush=True)
    raise SystemExit(0)
