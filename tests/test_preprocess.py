"""load_and_preprocess_images: sizes, crop/pad geometry, white background, input kinds (official rules)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hess.models.preprocess import load_and_preprocess_images


def save(tmp_path, name: str, array: np.ndarray):
    path = tmp_path / name
    Image.fromarray(array).save(path)
    return path


def gradient(h: int, w: int) -> np.ndarray:
    """uint8 RGB with distinct rows and columns."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), np.full_like(x, 77)], -1).astype(np.uint8)


def pil_resized(array: np.ndarray, size_wh) -> torch.Tensor:
    img = Image.fromarray(array).resize(size_wh, Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def test_crop_landscape_resizes_to_width_518(tmp_path):
    arr = gradient(480, 640)
    out = load_and_preprocess_images([save(tmp_path, "a.png", arr)])
    assert out.shape == (1, 3, 392, 518) and out.dtype == torch.float32  # round(480·518/640/14)·14 = 392
    torch.testing.assert_close(out[0], pil_resized(arr, (518, 392)))


def test_crop_uses_python_rounding():
    # 33·518/74/14 = 16.5 exactly: Python's round gives 16 (banker's), so height 224, not 238
    out = load_and_preprocess_images([gradient(33, 74)])
    assert out.shape == (1, 3, 224, 518)


def test_crop_portrait_is_center_cropped(tmp_path):
    arr = gradient(700, 480)
    out = load_and_preprocess_images([save(tmp_path, "p.png", arr)], mode="crop")
    assert out.shape == (1, 3, 518, 518)
    full = pil_resized(arr, (518, 756))  # round(700·518/480/14)·14 = 756
    top = (756 - 518) // 2
    torch.testing.assert_close(out[0], full[:, top : top + 518])


def test_pad_portrait_is_centred_on_white(tmp_path):
    arr = gradient(700, 480)
    out = load_and_preprocess_images([save(tmp_path, "p.png", arr)], mode="pad")
    assert out.shape == (1, 3, 518, 518)
    new_w = 350  # round(480·518/700/14)·14
    left = (518 - new_w) // 2
    assert torch.all(out[0, :, :, :left] == 1.0) and torch.all(out[0, :, :, left + new_w :] == 1.0)
    torch.testing.assert_close(out[0, :, :, left : left + new_w], pil_resized(arr, (new_w, 518)))


def test_pad_landscape():
    arr = gradient(480, 640)
    out = load_and_preprocess_images([arr], mode="pad")
    assert out.shape == (1, 3, 518, 518)
    assert torch.all(out[0, :, :63] == 1.0) and torch.all(out[0, :, 63 + 392 :] == 1.0)  # (518-392)/2 = 63
    torch.testing.assert_close(out[0, :, 63 : 63 + 392], pil_resized(arr, (518, 392)))


def test_rgba_is_composited_onto_white(tmp_path):
    rgba = np.zeros((140, 140, 4), np.uint8)
    rgba[..., 0] = 255  # red
    rgba[:70, :, 3] = 0  # transparent top half
    rgba[70:, :, 3] = 255
    out = load_and_preprocess_images([save(tmp_path, "t.png", rgba)])[0]
    assert out.shape == (3, 518, 518)
    torch.testing.assert_close(out[:, :200], torch.ones(3, 200, 518))  # white, far from the seam
    torch.testing.assert_close(out[:, 320:], torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, 198, 518))


def test_mixed_sizes_are_padded_with_white(tmp_path):
    a = save(tmp_path, "a.png", gradient(480, 640))  # → 392×518
    b = save(tmp_path, "b.png", gradient(640, 480))  # → 518×518 (cropped)
    out = load_and_preprocess_images([a, b])
    assert out.shape == (2, 3, 518, 518)
    assert torch.all(out[0, :, :63] == 1.0) and torch.all(out[0, :, 455:] == 1.0)
    torch.testing.assert_close(out[0, :, 63:455], load_and_preprocess_images([a])[0])


def test_array_and_pil_inputs_match_files(tmp_path):
    arr = gradient(300, 400)
    from_file = load_and_preprocess_images([save(tmp_path, "g.png", arr)])
    torch.testing.assert_close(load_and_preprocess_images([arr]), from_file)
    torch.testing.assert_close(load_and_preprocess_images([Image.fromarray(arr)]), from_file)
    # float arrays are resized without quantisation: a constant stays exactly constant
    flat = np.full((300, 400, 3), 0.3, np.float32)
    out = load_and_preprocess_images([flat])
    assert out.shape == from_file.shape
    torch.testing.assert_close(out, torch.full_like(out, 0.3))
    # grayscale
    assert load_and_preprocess_images([arr[..., 0]]).shape == from_file.shape


def test_output_sizes_are_patch_multiples_in_unit_range():
    for h, w in [(123, 457), (1000, 333), (518, 518), (50, 900)]:
        for mode in ("crop", "pad"):
            out = load_and_preprocess_images([gradient(h, w)], mode=mode)
            assert out.shape[-1] % 14 == 0 and out.shape[-2] % 14 == 0
            assert out.shape[-1] <= 518 and out.shape[-2] <= 518
            assert out.min() >= 0.0 and out.max() <= 1.0


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        load_and_preprocess_images([gradient(20, 20)], mode="stretch")
    with pytest.raises(ValueError, match="no images"):
        load_and_preprocess_images([])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_and_preprocess_images([tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="shape"):
        load_and_preprocess_images([np.zeros((4, 4, 2), np.uint8)])
    with pytest.raises(ValueError, match="dtype"):
        load_and_preprocess_images([np.zeros((4, 4, 3), np.int32)])
    with pytest.raises(TypeError, match="int"):
        load_and_preprocess_images([3])
