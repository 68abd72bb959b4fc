"""hess.train / hess.losses: targets against exact correspondences, loss falls, deterministic resume."""
import csv
import json

import pytest
import torch

from hess.data import exact_correspondences, make_scene, normalize_scene, scene_key
from hess.losses import attention_match_loss, make_batch
from hess.data.bank import load_bank, render_bank
from hess.train import SCENE_OPTIONS, TrainConfig, train

SMALL = dict(height=42, width=42, num_frames=3, arc_deg=(10.0, 20.0))
TINY_MODEL = {
    "aggregator": dict(img_size=42, patch_size=14, embed_dim=32, depth=2, num_heads=2, num_register_tokens=1,
                       patch_embed="conv", init_values=1.0),
    "camera_head": dict(trunk_depth=1, num_heads=2, init_values=1.0),
    "point_head": dict(features=8, out_channels=[8, 8, 8, 8], intermediate_layer_idx=[0, 1, 0, 1]),
    "depth_head": None, "track_head": None,
}


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bank")
    render_bank(d / "shard_000000.pt", "train", 0, 3, options=SMALL)
    return d


def _bank_scene(k: int):
    return make_scene(scene_key("train", k), **{**SCENE_OPTIONS, **SMALL})


def test_batch_targets_match_exact_correspondences(bank_dir):
    bank = load_bank(bank_dir)
    b = make_batch(bank, torch.tensor([1]), torch.tensor([[2, 0]]), torch.tensor([False]))
    # pose of the reference frame is the identity; points are in its camera frame, mean distance 1
    assert torch.allclose(b["pose_enc"][0, 0, :7], torch.tensor([0, 0, 0, 0, 0, 0, 1.0]), atol=1e-5)
    pts, valid = b["points"][0], b["valid"][0]
    assert abs(pts[valid].norm(dim=-1).mean().item() - 1) < 1e-4
    # the match target of each frame-0 patch centre is the patch holding its exact correspondence in frame 1
    scene = _bank_scene(1).subset([2, 0])
    uv, vis = exact_correspondences(scene, 0, 1)
    centres = uv[7::14, 7::14].reshape(-1, 2)
    seen = vis[7::14, 7::14].reshape(-1)
    match = b["match"][0, 0, :, 1]
    expect = (torch.floor((centres[:, 1] + 0.5) / 14) * 3 + torch.floor((centres[:, 0] + 0.5) / 14)).long()
    both = seen & (match >= 0)
    assert both.sum() >= 3 and both.sum() >= 0.7 * seen.sum()
    assert torch.equal(match[both], expect[both])
    assert (b["match"][0, 0, :, 0] == -1).all()                                  # never matched to itself


def test_mirror_is_a_consistent_camera(bank_dir):
    """Mirrored points of frame 0 project back onto their own pixels with the mirrored intrinsics."""
    bank = load_bank(bank_dir)
    b = make_batch(bank, torch.tensor([0]), torch.tensor([[0, 1]]), torch.tensor([True]))
    K, pts, valid = b["intrinsics"][0, 0].double(), b["points"][0, 0].double(), b["valid"][0, 0]
    uvw = pts @ K.T
    uv = uvw[..., :2] / uvw[..., 2:]
    v, u = torch.meshgrid(torch.arange(42.0), torch.arange(42.0), indexing="ij")
    err = (uv - torch.stack([u, v], -1).double()).norm(dim=-1)[valid]
    assert err.max() < 1e-2
    # and the relative pose still maps frame-0 points onto frame-1 pixels of the mirrored image
    E1 = b["extrinsics"][0, 1].double()
    cam1 = pts @ E1[:, :3].T + E1[:, 3]
    assert (cam1[valid][:, 2] > 0).all()


def test_attention_match_loss_known_answer():
    S, ns, Pi = 2, 1, 2
    P, N = ns + Pi, S * (ns + Pi)
    match = torch.full((1, S, Pi, S), -1)
    match[0, 0, 0, 1] = 1                                                        # frame0 patch0 -> frame1 patch1
    logits = torch.zeros(1, 1, N, N)
    assert torch.allclose(attention_match_loss(logits, match, ns), torch.tensor(float(torch.log(torch.tensor(N * 1.0)))))
    logits[0, 0, ns + 0, P + ns + 1] = 50.0                                      # put all attention on the match
    assert attention_match_loss(logits, match, ns) < 1e-6


def _rows(path):
    with open(path) as f:
        return [[float(x) for x in r] for r in csv.reader(f)]


def test_train_loss_falls_and_resume_is_exact(bank_dir, tmp_path):
    common = dict(bank_dir=str(bank_dir), steps=30, batch_size=2, curriculum_steps=10, warmup=3, lr=2e-3,
                  eval_scenes=0, wandb=False, threads=1, model=TINY_MODEL)
    path = train(TrainConfig(out_dir=str(tmp_path / "a"), **common))
    assert path.exists() and json.loads((path.parent / "config.json").read_text())["aggregator"]["embed_dim"] == 32
    rows = _rows(tmp_path / "a" / "log.csv")
    first = sum(r[3] for r in rows[:5]) / 5
    last = sum(r[3] for r in rows[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    # stop at step 4 and resume: identical to running 6 steps straight
    short = dict(common, steps=6)
    train(TrainConfig(out_dir=str(tmp_path / "b"), **short))
    train(TrainConfig(out_dir=str(tmp_path / "c"), stop_at=4, **short))
    train(TrainConfig(out_dir=str(tmp_path / "c"), **short))
    sb = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["model"]
    sc = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(sb[k], sc[k]) for k in sb)


def test_bank_of_other_arcs_is_refused(bank_dir):
    assert load_bank(bank_dir, {"arc_deg": [10.0, 20.0]})["images"].shape[0] == 3  # tuple vs list: same
    with pytest.raises(ValueError, match=r"arc_deg: shard \[10.0, 20.0\] vs run \[15.0, 60.0\]"):
        load_bank(bank_dir, {"arc_deg": (15.0, 60.0)})


def test_init_from_starts_at_the_given_weights(bank_dir, tmp_path):
    common = dict(bank_dir=str(bank_dir), batch_size=2, curriculum_steps=1, warmup=1, eval_scenes=0,
                  wandb=False, threads=1, model=TINY_MODEL)
    src = train(TrainConfig(out_dir=str(tmp_path / "src"), steps=3, seed=1, **common))
    # lr 0: the fine-tuned export must equal the source weights exactly (and differ from a seed-0 init)
    tuned = train(TrainConfig(out_dir=str(tmp_path / "ft"), steps=1, lr=0.0, init_from=str(src), **common))
    fresh = train(TrainConfig(out_dir=str(tmp_path / "fresh"), steps=1, lr=0.0, **common))
    from safetensors.torch import load_file
    a, b, c = load_file(str(src)), load_file(str(tuned)), load_file(str(fresh))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        train(TrainConfig(out_dir=str(tmp_path / "bad"), steps=1, init_from=str(tmp_path / "nope.safetensors"), **common))
    with pytest.raises(ValueError, match="other scene options"):
        train(TrainConfig(out_dir=str(tmp_path / "arcs"), steps=1, arc_deg=(15.0, 60.0), **common))


def test_init_reset_grows_a_head_and_mismatches_are_named(bank_dir, tmp_path):
    common = dict(bank_dir=str(bank_dir), batch_size=2, curriculum_steps=1, warmup=1, eval_scenes=0,
                  wandb=False, threads=1, steps=1, lr=0.0)
    src = train(TrainConfig(out_dir=str(tmp_path / "src"), model=TINY_MODEL, seed=1, **common))
    wider = json.loads(json.dumps(TINY_MODEL))
    wider["point_head"].update(features=16, out_channels=[16, 16, 16, 16])
    with pytest.raises(KeyError, match=r"shape \(checkpoint vs model\) \['point_head\..*--init-reset"):
        train(TrainConfig(out_dir=str(tmp_path / "bad"), model=wider, init_from=str(src), **common))
    grown = train(TrainConfig(out_dir=str(tmp_path / "grown"), model=wider, init_from=str(src),
                              init_reset=("point_head.",), **common))
    from safetensors.torch import load_file
    a, b = load_file(str(src)), load_file(str(grown))
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("point_head."))
    assert any(b[k].shape != a[k].shape for k in a if k.startswith("point_head."))
