"""load_vggt: file formats, directories, dtypes, strict key checks, HF cache/offline, embedded names."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import hess.models.load as load_mod
from hess.models import (
    EMBEDDED_CHECKPOINTS,
    CheckpointUnavailableError,
    EmbeddedCheckpoint,
    StateDictMismatchError,
    build_vggt,
    load_model,
    load_vggt,
)
from hess.registry import Registry

CONFIG = {
    "aggregator": dict(embed_dim=32, depth=2, num_heads=2, num_register_tokens=1, patch_embed="conv"),
    "camera_head": None, "point_head": None, "depth_head": None, "track_head": None,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = build_vggt(CONFIG)
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(model, sd):
    got = model.state_dict()
    assert list(got) == list(sd)
    for k in sd:
        assert torch.equal(got[k].float(), sd[k].float()), k


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pth-wrapped"])
def test_loads_files_strictly_in_eval_mode(tmp_path, reference, fmt):
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(reference, path)
    elif fmt == "pt":
        path = tmp_path / "w.pt"
        torch.save(reference, path)
    else:
        path = tmp_path / "w.pth"
        torch.save({"model": reference, "epoch": 3}, path)
    model = load_vggt(path, config=CONFIG)
    assert not model.training and model.model_id == str(path)
    assert_same_weights(model, reference)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    torch.testing.assert_close(model.aggregator._resnet_mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        a, _ = model.aggregator(x[None])
        ref = build_vggt(CONFIG).eval()
        ref.load_state_dict(reference)
        b, _ = ref.aggregator(x[None])
    torch.testing.assert_close(a[-1], b[-1], rtol=0, atol=0)


def test_directory_with_config(tmp_path, reference):
    save_file(reference, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    model = load_vggt(tmp_path)
    assert model.aggregator.embed_dim == 32
    assert_same_weights(model, reference)
    assert load_model(str(tmp_path)).aggregator.embed_dim == 32  # registry dispatch
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, "aggregatr": {}}))
    with pytest.raises(ValueError, match="aggregatr.*pass config="):
        load_vggt(tmp_path)
    assert load_vggt(tmp_path, config=CONFIG).aggregator.embed_dim == 32


@pytest.mark.parametrize("dtype, expected", [("bf16", torch.bfloat16), ("fp16", torch.float16), (torch.float16, torch.float16)])
def test_dtype_option(tmp_path, reference, dtype, expected):
    save_file(reference, tmp_path / "w.safetensors")
    model = load_vggt(tmp_path / "w.safetensors", config=CONFIG, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}
    # a low-precision model takes fp32 images in [0, 1] and stays close to the fp32 model
    ref = load_vggt(tmp_path / "w.safetensors", config=CONFIG)
    x = torch.rand(1, 2, 3, 28, 42, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        low, _ = model.aggregator(x)
        full, _ = ref.aggregator(x)
    assert low[-1].dtype == expected
    torch.testing.assert_close(low[-1].float(), full[-1], rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="fp8"):
        load_vggt(tmp_path / "w.safetensors", config=CONFIG, dtype="fp8")


def test_mismatched_checkpoints_list_keys_by_name(tmp_path, reference):
    sd = dict(reference)
    del sd["aggregator.frame_blocks.1.mlp.fc2.bias"]
    sd["aggregator.extra_token"] = torch.zeros(3)
    sd["aggregator.camera_token"] = torch.zeros(1, 2, 1, 16)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(StateDictMismatchError) as err:
        load_vggt(tmp_path / "bad.safetensors", config=CONFIG)
    msg = str(err.value)
    assert "aggregator.frame_blocks.1.mlp.fc2.bias" in msg and "missing" in msg
    assert "aggregator.extra_token" in msg and "unexpected" in msg
    assert "aggregator.camera_token: checkpoint (1, 2, 1, 16) vs model (1, 2, 1, 32)" in msg
    # strict=False: warn, load what matches, keep the rest initialised
    with pytest.warns(UserWarning, match="fc2.bias"):
        model = load_vggt(tmp_path / "bad.safetensors", config=CONFIG, strict=False)
    got = model.state_dict()
    assert torch.equal(got["aggregator.frame_blocks.0.attn.qkv.weight"], reference["aggregator.frame_blocks.0.attn.qkv.weight"])
    assert got["aggregator.camera_token"].shape == (1, 2, 1, 32)


def test_wrong_architecture_is_reported(tmp_path, reference):
    save_file(reference, tmp_path / "w.safetensors")
    with pytest.raises(StateDictMismatchError, match="aggregator.patch_embed.proj.weight"):
        load_vggt(tmp_path / "w.safetensors")  # default config: VGGT-1B


def test_missing_sources_name_the_path(tmp_path):
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_vggt(missing)
    with pytest.raises(FileNotFoundError, match="model.safetensors, model.pt"):
        load_vggt(tmp_path)  # a directory without weights
    with pytest.raises(FileNotFoundError, match=r"hess-huge.*known: hess-tiny"):
        load_vggt("hess-huge")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read checkpoint .*junk.pt"):
        load_vggt(tmp_path / "junk.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        load_vggt(tmp_path / "list.pt")


def test_embedded_checkpoints(tmp_path, reference, monkeypatch):
    assert EMBEDDED_CHECKPOINTS.names() == ["hess-tiny"]  # the shipped default (hess/assets)
    shipped = load_vggt("hess-tiny")
    assert shipped.model_id == "hess-tiny" and not shipped.training
    registry = Registry("embedded checkpoint")
    registry.register("toy")(EmbeddedCheckpoint(path="toy", config=CONFIG, description="test"))
    (tmp_path / "toy").mkdir()
    save_file(reference, tmp_path / "toy" / "model.safetensors")
    monkeypatch.setattr(load_mod, "EMBEDDED_CHECKPOINTS", registry)
    monkeypatch.setattr(load_mod, "ASSETS_DIR", tmp_path)
    model = load_vggt("toy")
    assert model.model_id == "toy"
    assert_same_weights(model, reference)
    with pytest.raises(FileNotFoundError, match="known: toy"):
        load_vggt("tiny")


def fake_hf_cache(hub, repo_id: str, files: dict[str, bytes]) -> None:
    """Lay files out as huggingface_hub's cache does (refs/main → snapshots/<commit>/...)."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    commit = "a" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        (repo / "snapshots" / commit / name).write_bytes(data)


def test_hf_repo_offline_gives_instructions_and_uses_the_cache(tmp_path, monkeypatch, reference):
    """HF_HUB_OFFLINE=1 with an empty temporary HF_HOME (huggingface_hub reads both at import: patched too)."""
    import huggingface_hub.constants as hf_constants
    from safetensors.torch import save

    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    with pytest.raises(CheckpointUnavailableError) as err:
        load_vggt("facebook/VGGT-1B")
    msg = str(err.value)
    assert "facebook/VGGT-1B" in msg and "HF_HUB_OFFLINE is set" in msg
    assert "hf download facebook/VGGT-1B model.safetensors" in msg and str(hf_home) in msg
    assert "load_vggt('/path/to/model.safetensors')" in msg
    # a repo already in the cache loads offline, with the config.json stored beside the weights
    fake_hf_cache(hf_home / "hub", "someone/vggt-toy",
                  {"model.safetensors": save(reference), "config.json": json.dumps(CONFIG).encode()})
    model = load_vggt("someone/vggt-toy")
    assert model.model_id == "someone/vggt-toy" and model.aggregator.embed_dim == 32
    assert_same_weights(model, reference)


HF_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from safetensors.torch import save_file
    import torch
    from hess.models import build_vggt, load_vggt, CheckpointUnavailableError
    cfg = json.loads(sys.argv[1]); hub = sys.argv[2]; result = {}
    try:
        load_vggt("facebook/VGGT-1B")
    except CheckpointUnavailableError as err:
        result["offline_error"] = str(err)
    # a repo already in the cache loads offline
    snap = f"{hub}/models--someone--vggt-toy/snapshots/" + "a" * 40
    import os; os.makedirs(snap); os.makedirs(f"{hub}/models--someone--vggt-toy/refs")
    open(f"{hub}/models--someone--vggt-toy/refs/main", "w").write("a" * 40)
    torch.manual_seed(0); sd = build_vggt(cfg).state_dict()
    save_file(sd, f"{snap}/model.safetensors"); open(f"{snap}/config.json", "w").write(json.dumps(cfg))
    model = load_vggt("someone/vggt-toy")
    result["cached_equal"] = all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    result["model_id"] = model.model_id
    print(json.dumps(result))
    """
)


@pytest.mark.slow
def test_hf_offline_environment_end_to_end(tmp_path):
    """The same through the real environment variables, in a fresh interpreter."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    proc = subprocess.run(
        [sys.executable, "-c", HF_SCRIPT, json.dumps(CONFIG), str(tmp_path / "hf" / "hub")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    msg = result["offline_error"]
    assert "facebook/VGGT-1B" in msg and "hf download facebook/VGGT-1B model.safetensors" in msg
    assert str(tmp_path / "hf") in msg  # where the cache is
    assert "load_vggt('/path/to/model.safetensors')" in msg
    assert result["cached_equal"] is True and result["model_id"] == "someone/vggt-toy"
