"""The training bank of ``hess train``: synthetic scenes pre-rendered into ``shard_*.pt`` files.

    render_bank("bank/shard_000000.pt", "train", start=0, count=256)   # scenes 0..255 of the split
    bank = load_bank("bank", {"arc_deg": (25.0, 90.0)})                 # checks the shards' options

A shard records the scene options it was rendered with; ``load_bank`` refuses shards of another
distribution than the run asks for.
"""
from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from hess.data.splits import scene_key
from hess.data.synthetic import EMBEDDED_SCENE_OPTIONS, SyntheticOptions


def render_bank(path: str | os.PathLike, split: str, start: int, count: int, seed: int = 0,
                options: Optional[dict] = None) -> Path:
    """Render scenes ``start..start+count-1`` of ``split`` into one shard file.

    A shard holds ``images`` [N, S, 3, H, W] uint8, ``depth`` [N, S, H, W] float32, ``extrinsics``
    [N, S, 3, 4], ``intrinsics`` [N, S, 3, 3] (raw world units) and the scene keys.
    """
    from hess.data.synthetic import make_scene

    opts = {**EMBEDDED_SCENE_OPTIONS, **(options or {})}
    imgs, depth, ext, intr, keys = [], [], [], [], []
    for k in range(start, start + count):
        key = scene_key(split, k, seed)
        sc = make_scene(key, **opts)
        imgs.append((sc.images * 255).round().to(torch.uint8))
        depth.append(sc.depth.float())
        ext.append(sc.extrinsics.float())
        intr.append(sc.intrinsics.float())
        keys.append(list(key))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save({"images": torch.stack(imgs), "depth": torch.stack(depth), "extrinsics": torch.stack(ext),
                "intrinsics": torch.stack(intr), "keys": keys, "options": opts}, tmp)
    tmp.replace(out)
    return out


def load_bank(directory: str | os.PathLike, options: Optional[dict] = None) -> dict[str, Tensor]:
    """Concatenate every ``shard_*.pt`` of ``directory`` (sorted by name).

    With ``options`` (scene options the run asks for, e.g. ``{"arc_deg": (15, 60)}``), every shard must
    have been rendered with those values: a bank of another distribution raises instead of silently
    training on it.  Options not named are not checked.
    """
    shards = sorted(Path(directory).glob("shard_*.pt"))
    if not shards:
        raise FileNotFoundError(f"no shard_*.pt in {directory}; render them with hess.data.bank.render_bank (hess train does)")
    parts = [torch.load(s, weights_only=False) for s in shards]
    for shard, part in zip(shards, parts):
        have = {**_OPTION_DEFAULTS, **{k: _plain(v) for k, v in part.get("options", EMBEDDED_SCENE_OPTIONS).items()}}
        want = {k: _plain(v) for k, v in (options or {}).items()}
        diff = sorted(k for k in want if have.get(k) != want[k])
        if diff:
            raise ValueError(f"bank shard {shard} was rendered with other scene options: "
                             + ", ".join(f"{k}: shard {have.get(k)!r} vs run {want.get(k)!r}" for k in diff))
    return {k: torch.cat([p[k] for p in parts]) for k in ("images", "depth", "extrinsics", "intrinsics")}


def _option_defaults() -> dict[str, Any]:
    return {f.name: _plain(f.default) for f in fields(SyntheticOptions)}


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal (JSON round trips turn one into the other)."""
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


_OPTION_DEFAULTS = _option_defaults()  # shards rendered before an option existed had its default
