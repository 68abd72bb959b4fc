"""hess.objectives / hess.losses_pi3: the head-averaged match loss, π³'s frame-free losses, π³ training."""
import json
import math

import pytest
import torch

from hess.data.bank import render_bank
from hess.losses import attention_match_loss
from hess.losses_pi3 import gt_local_points, local_point_loss, optimal_scale, relative_pose_loss
from hess.models import build_pi3, load_pi3
from hess.models.pose import closed_form_inverse_se3, quat_to_mat
from hess.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(height=42, width=42, num_frames=3, arc_deg=(10.0, 20.0))
TINY_PI3 = {
    "patch_size": 14, "pos_type": "rope100", "num_register_tokens": 2,
    "encoder": dict(img_size=42, patch_size=14, embed_dim=32, depth=1, num_heads=2, num_register_tokens=0,
                    init_values=1.0),
    "decoder": dict(dec_embed_dim=32, dec_num_heads=4, mlp_ratio=2, dec_depth=4),
    "point_decoder": dict(in_dim=64, out_dim=16, dec_embed_dim=16, depth=1, dec_num_heads=2, mlp_ratio=2,
                          need_project=True, use_checkpoint=False),
    "point_head": dict(patch_size=14, dec_embed_dim=16, output_dim=3),
    "conf_head": dict(patch_size=14, dec_embed_dim=16, output_dim=1),
    "camera_decoder": dict(in_dim=64, out_dim=16, dec_embed_dim=16, depth=1, dec_num_heads=2, mlp_ratio=2,
                           need_project=True, use_checkpoint=False),
    "camera_head": dict(dim=16),
}
from test_train import TINY_MODEL as TINY_VGGT  # noqa: E402  (the same tiny VGGT)


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bank")
    render_bank(d / "shard_000000.pt", "train", 0, 3, options=SMALL)
    return d


def test_head_mean_pool_known_answer():
    """Two heads: one puts all attention on the match, one is uniform → -log((1 + 1/N) / 2)."""
    S, ns, Pi = 2, 1, 2
    P, N = ns + Pi, S * (ns + Pi)
    match = torch.full((1, S, Pi, S), -1)
    match[0, 0, 0, 1] = 1
    logits = torch.zeros(1, 2, N, N)
    logits[0, 0, ns + 0, P + ns + 1] = 60.0
    mean = attention_match_loss(logits, match, ns, pool="mean")
    assert torch.allclose(mean, torch.tensor(-math.log((1 + 1 / N) / 2)), atol=1e-6)
    each = attention_match_loss(logits, match, ns, pool="each")          # per head: 0 and log N
    assert torch.allclose(each, torch.tensor(math.log(N) / 2), atol=1e-6)
    # pooled: which head carries the match does not matter
    swapped = logits.flip(1)
    assert torch.allclose(attention_match_loss(swapped, match, ns, pool="mean"), mean)
    with pytest.raises(ValueError, match="attention pool must be one of"):
        attention_match_loss(logits, match, ns, pool="max")


def _random_w2c(B: int, S: int, gen: torch.Generator) -> torch.Tensor:
    q = torch.nn.functional.normalize(torch.randn(B, S, 4, generator=gen), dim=-1)
    return torch.cat([quat_to_mat(q), torch.randn(B, S, 3, 1, generator=gen)], -1)


def test_pi3_losses_vanish_for_any_world_frame_and_scale():
    """π³ may answer in any world frame and scale: a rigidly moved, scaled copy of GT has zero loss."""
    gen = torch.Generator().manual_seed(0)
    B, S, H, W = 2, 3, 4, 5
    w2c = _random_w2c(B, S, gen).double()
    world = torch.randn(B, S, H, W, 3, generator=gen, dtype=torch.float64) + torch.tensor([0, 0, 6.0])
    gt = gt_local_points(world, w2c)
    valid = gt[..., 2] > 0.1
    G = closed_form_inverse_se3(_random_w2c(1, 1, gen).double()[0, 0])               # another world frame
    c2w = closed_form_inverse_se3(w2c)
    pred_c2w = G @ c2w
    pred_c2w[..., :3, 3] = pred_c2w[..., :3, 3] * 0.5                                 # and half the scale
    pred_local = gt * 0.5
    s = optimal_scale(pred_local, gt, valid)
    assert torch.allclose(s, torch.full((B,), 2.0, dtype=torch.float64))
    assert local_point_loss(pred_local, gt, valid, s) < 1e-9
    assert relative_pose_loss(pred_c2w, w2c, s) < 1e-5                                # (√1e-12 guard)
    # a wrong relative rotation is penalised
    bad = pred_c2w.clone()
    bad[:, 1, :3, :3] = bad[:, 1, :3, :3] @ quat_to_mat(torch.tensor([0.0, 0.0, 0.2588, 0.9659]).double())
    assert relative_pose_loss(bad, w2c, s) > 0.1


def test_pi3_trains_exports_a_loadable_model_and_stays_equivariant(bank_dir, tmp_path):
    common = dict(bank_dir=str(bank_dir), batch_size=2, curriculum_steps=5, warmup=3, lr=2e-3, eval_scenes=0,
                  wandb=False, threads=1, family="pi3", model=TINY_PI3, w_loc=0.0, attn_heads=None, attn_pool="mean")
    path = train(TrainConfig(out_dir=str(tmp_path / "p"), steps=25, **common))
    cfg = json.loads((path.parent / "config.json").read_text())
    assert cfg["decoder"]["dec_num_heads"] == 4
    rows = [line.split(",") for line in (tmp_path / "p" / "log.csv").read_text().splitlines()]
    first, last = (sum(float(r[3]) for r in part) / 5 for part in (rows[:5], rows[-5:]))
    assert last < first, (first, last)
    model = load_pi3(path.parent)                                   # a folder: model.safetensors + config.json
    x = torch.rand(1, 3, 3, 42, 42)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        out, permuted = model(x), model(x[:, perm])
    for name in ("local_points", "conf"):
        torch.testing.assert_close(permuted[name], out[name][:, perm], rtol=1e-4, atol=1e-4)


def test_init_reset_globs_change_the_head_count(bank_dir, tmp_path):
    """A 2-head model warm-starts a 4-head one of the same width: only the per-head q/k norms are new."""
    common = dict(bank_dir=str(bank_dir), batch_size=2, curriculum_steps=1, warmup=1, eval_scenes=0,
                  wandb=False, threads=1, steps=1, lr=0.0)
    src = train(TrainConfig(out_dir=str(tmp_path / "src"), model=TINY_VGGT, seed=1, **common))
    more = json.loads(json.dumps(TINY_VGGT))
    more["aggregator"]["num_heads"] = 4
    with pytest.raises(KeyError, match="q_norm"):
        train(TrainConfig(out_dir=str(tmp_path / "bad"), model=more, init_from=str(src), **common))
    grown = train(TrainConfig(out_dir=str(tmp_path / "g"), model=more, init_from=str(src),
                              init_reset=("*.q_norm.*", "*.k_norm.*"), **common))
    from safetensors.torch import load_file
    a, b = load_file(str(src)), load_file(str(grown))
    reset = [k for k in a if ".q_norm." in k or ".k_norm." in k]
    assert reset and all(b[k].shape != a[k].shape for k in reset)
    assert all(torch.equal(a[k], b[k]) for k in a if k not in reset)


def test_tiny_pi3_architecture_builds_with_eight_global_heads():
    from hess.objectives import TINY_PI3_CONFIG

    model = build_pi3(TINY_PI3_CONFIG)
    layers = model.global_attention_layers()
    assert len(layers) == 4 and all(a.num_heads == 8 for a in layers)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000              # ≤ 20 MB in fp32
