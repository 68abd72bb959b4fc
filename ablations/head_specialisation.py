"""Which global-attention heads of a trained tiny model specialised in cross-view matching?

Per (global layer, head), over held-out test scenes (frame order shuffled), for every patch query:
* ``match_mass``: attention probability on the key patches of OTHER frames that hold the query's exact GT
  correspondence (``hess.losses.make_batch``'s ``match``), summed over those frames, averaged over queries
  with at least one visible match;
* ``cross_mass``: probability on patch keys of other frames (any patch);
* ``entropy``: attention entropy over all keys, divided by log N (1 = uniform).

    python ablations/head_specialisation.py runs/tiny8/model.safetensors --frames 8 --num-test 16 \
        --out hess/assets/hess_tiny_heads.json --figure hess/assets/hess_tiny_heads.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny import family_of, load, model_config  # noqa: E402

from hess.evaluate import eval_scenes_default  # noqa: E402
from hess.losses import AttentionProbe, make_batch  # noqa: E402
from hess.train import TrainConfig  # noqa: E402


def scenes_as_bank(scenes) -> dict[str, torch.Tensor]:
    """Scenes (normalised or not) → the bank dict ``make_batch`` reads (one scene per row)."""
    return {"images": torch.stack([(s.images * 255).round().to(torch.uint8) for s in scenes]),
            "depth": torch.stack([s.depth.float() for s in scenes]),
            "extrinsics": torch.stack([s.extrinsics.float() for s in scenes]),
            "intrinsics": torch.stack([s.intrinsics.float() for s in scenes])}


@torch.no_grad()
def head_statistics(model: torch.nn.Module, scenes) -> dict[str, list[list[float]]]:
    """→ ``match_mass``, ``cross_mass``, ``entropy``: each [L][H] (means over scenes and queries)."""
    layers = model.global_attention_layers()
    previous = [a.core for a in layers]
    probes = [AttentionProbe(None) for _ in layers]
    for a, p in zip(layers, probes):
        a.core = p
    bank = scenes_as_bank(scenes)
    S = bank["images"].shape[1]
    ns = model.num_special_tokens
    L, H = len(layers), layers[0].num_heads
    sums = {k: torch.zeros(L, H, dtype=torch.float64) for k in ("match_mass", "cross_mass", "entropy")}
    try:
        for i in range(len(scenes)):
            b = make_batch(bank, torch.tensor([i]), torch.arange(S)[None], torch.tensor([False]))
            model(b["images"])
            match = b["match"][0]                                                  # [S, Pi, S]
            Pi = match.shape[1]
            P = ns + Pi
            ok = match >= 0
            key = torch.arange(S)[None, None, :] * P + ns + match.clamp(min=0)     # [S, Pi, S]
            frame_of_key = torch.arange(S * P) // P
            patch_key = (torch.arange(S * P) % P) >= ns
            for li, p in enumerate(probes):
                prob = p.logits[0].float().softmax(-1).reshape(H, S, P, S * P)[:, :, ns:]   # [H, S, Pi, N]
                picked = prob.gather(-1, key[None].expand(H, S, Pi, S)) * ok[None]
                has = ok.any(-1)                                                   # [S, Pi]
                sums["match_mass"][li] += (picked.sum(-1)[:, has]).mean(-1).double()
                other = (frame_of_key[None, :] != torch.arange(S)[:, None]) & patch_key[None, :]   # [S, N]
                sums["cross_mass"][li] += (prob * other[None, :, None, :]).sum(-1).mean((1, 2)).double()
                ent = -(prob * prob.clamp(min=1e-12).log()).sum(-1) / torch.log(torch.tensor(float(S * P)))
                sums["entropy"][li] += ent.mean((1, 2)).double()
    finally:
        for a, core in zip(layers, previous):
            a.core = core
    return {k: (v / len(scenes)).tolist() for k, v in sums.items()}


def figure(stats: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("match_mass", "cross_mass", "entropy")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, k in zip(axes, keys):
        m = torch.tensor(stats[k])
        im = ax.imshow(m, cmap="viridis", aspect="auto", vmin=0, vmax=max(1e-6, float(m.max())) if k != "entropy" else 1)
        ax.set_title(k.replace("_", " "))
        ax.set_xlabel("head")
        ax.set_ylabel("global layer")
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
        for (r, c), v in zip(((r, c) for r in range(m.shape[0]) for c in range(m.shape[1])), m.flatten()):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--num-test", type=int, default=16)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--figure", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    scenes = eval_scenes_default("test", a.num_test, options=TrainConfig(views=a.frames).scene_overrides())
    model = load(a.checkpoint)
    stats = head_statistics(model, scenes)
    result = {"checkpoint": str(a.checkpoint), "family": family_of(model_config(a.checkpoint)),
              "num_test_scenes": a.num_test, "frames": scenes[0].num_frames, **stats}
    text = json.dumps(result, indent=1)
    (a.out.write_text(text) if a.out else print(text))
    if a.figure:
        figure(stats, a.figure, f"{a.checkpoint.parent.name}: per-head attention on {a.num_test} test scenes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
