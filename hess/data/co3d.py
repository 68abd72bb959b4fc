"""CO3Dv2 loader (``evaluation.md`` §1): real layout, PyTorch3D NDC → OpenCV, VGGT's filters and RNG
path, frozen frame-id maps, crop preprocessing to width 518.

    CO3DV2_ROOT/<category>/{frame_annotations.jgz, sequence_annotations.jgz,
                            set_lists/set_lists_<set_list>.json, <sequence>/images/...}

    scenes = build_scenes("co3d", root=..., categories=["apple"], frame_id_map="co3d_ids.json")

The root comes from ``root=`` or ``$HESS_CO3D_ROOT``. ``write_co3d_category`` writes scenes in exactly
this layout (the format adapter that the tests load back).
"""
from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from hess.data.preprocess import crop_resize, load_rgb, stack_views
from hess.data.scene import DATASETS, Scene
from hess.data.splits import check_disjoint

SEEN_CATEGORIES = (
    "apple", "backpack", "banana", "baseballbat", "baseballglove", "bench", "bicycle", "bottle", "bowl",
    "broccoli", "cake", "car", "carrot", "cellphone", "chair", "cup", "donut", "hairdryer", "handbag",
    "hydrant", "keyboard", "laptop", "microwave", "motorcycle", "mouse", "orange", "parkingmeter", "pizza",
    "plant", "stopsign", "teddybear", "toaster", "toilet", "toybus", "toyplane", "toytrain", "toytruck",
    "tv", "umbrella", "vase", "wineglass")
UNSEEN_CATEGORIES = ("ball", "book", "couch", "frisbee", "hotdog", "kite", "remote", "sandwich",
                     "skateboard", "suitcase")
F = np.diag([-1.0, -1.0, 1.0])          # PyTorch3D (+X left, +Y up) <-> OpenCV (+X right, +Y down)
_SUBSET = {"test": "test", "train": "train", "calib": "train"}

# NDC scale per axis (s_x, s_y) of each intrinsics format, for an image of H×W pixels.
NDC_SCALES = {
    "ndc_isotropic": lambda H, W: (min(H, W) / 2, min(H, W) / 2),
    "ndc_norm_image_bounds": lambda H, W: (W / 2, H / 2),
}


# ---------------------------------------------------------------------------------------- conversions
def pt3d_to_opencv_extrinsics(R: np.ndarray, T: np.ndarray) -> np.ndarray:
    """PyTorch3D row-vector pose (X_cam = X·R + T) -> OpenCV world-to-camera [3, 4]: R_cv = F·Rᵀ, t = F·T."""
    R, T = np.asarray(R, np.float64), np.asarray(T, np.float64)
    return np.concatenate([F @ R.T, (F @ T)[:, None]], axis=1)


def opencv_to_pt3d_extrinsics(E: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``pt3d_to_opencv_extrinsics``: E [3, 4] -> (R = (F·R_cv)ᵀ, T = F·t_cv)."""
    E = np.asarray(E, np.float64)
    return (F @ E[:, :3]).T, F @ E[:, 3]


def ndc_to_pixel_intrinsics(focal_length: Sequence[float], principal_point: Sequence[float],
                            image_size_hw: Sequence[int], intrinsics_format: str) -> np.ndarray:
    """CO3D NDC intrinsics -> pixel K [3, 3] (no half-pixel offset, as PyTorch3D's
    ``opencv_from_cameras_projection``): f = f_ndc·s, c = size/2 - p_ndc·s per axis."""
    if intrinsics_format not in NDC_SCALES:
        raise ValueError(f"unknown intrinsics_format {intrinsics_format!r}; known: {', '.join(NDC_SCALES)}")
    H, W = image_size_hw
    sx, sy = NDC_SCALES[intrinsics_format](H, W)
    (fx, fy), (px, py) = focal_length, principal_point
    return np.array([[fx * sx, 0, W / 2 - px * sx], [0, fy * sy, H / 2 - py * sy], [0, 0, 1.0]])


def pixel_to_ndc_intrinsics(K: np.ndarray, image_size_hw: Sequence[int],
                            intrinsics_format: str = "ndc_isotropic") -> tuple[list[float], list[float]]:
    """Inverse of ``ndc_to_pixel_intrinsics``: K -> (focal_length, principal_point) in NDC."""
    H, W = image_size_hw
    sx, sy = NDC_SCALES[intrinsics_format](H, W)
    return [K[0, 0] / sx, K[1, 1] / sy], [(W / 2 - K[0, 2]) / sx, (H / 2 - K[1, 2]) / sy]


# ---------------------------------------------------------------------------------------- annotations
def read_jgz(path: Path) -> Any:
    """A gzipped JSON file; missing, non-gzip or non-JSON content raises an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CO3D annotation file not found: {path}")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed CO3D annotation file {path}: {exc}") from exc


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"CO3D set list not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed CO3D set list {path}: {exc}") from exc


def _frame_record(f: Mapping[str, Any], filepath: str, where: str) -> dict[str, Any]:
    """The fields the loader needs from one FrameAnnotation, validated."""
    try:
        vp, depth = f["viewpoint"], f.get("depth") or {}
        rec = {"filepath": filepath, "frame_number": f["frame_number"], "R": vp["R"], "T": vp["T"],
               "focal_length": vp["focal_length"], "principal_point": vp["principal_point"],
               "intrinsics_format": vp.get("intrinsics_format", "ndc_norm_image_bounds"),
               "image_size": f["image"]["size"], "depth_path": depth.get("path"),
               "depth_scale": depth.get("scale_adjustment", 1.0), "depth_mask_path": depth.get("mask_path")}
        shapes = {"R": (3, 3), "T": (3,), "focal_length": (2,), "principal_point": (2,), "image_size": (2,)}
        for key, shape in shapes.items():
            if np.asarray(rec[key], dtype=np.float64).shape != shape:
                raise ValueError(f"{key} must have shape {shape}, got {rec[key]!r}")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed frame annotation in {where}: {exc!r}") from exc
    if rec["intrinsics_format"] not in NDC_SCALES:
        raise ValueError(f"unknown intrinsics_format {rec['intrinsics_format']!r} in {where}")
    return rec


def read_category(root: Path, category: str, set_list: str = "fewview_dev",
                  min_quality: float = 0.5) -> dict[str, dict[str, list[dict]]]:
    """VGGT's ``preprocess_co3d.py`` for one category: {"train"|"test": {sequence: [frames in set-list
    order]}}, keeping sequences with viewpoint_quality_score > min_quality."""
    cat_dir = Path(root) / category
    frames_path, seqs_path = cat_dir / "frame_annotations.jgz", cat_dir / "sequence_annotations.jgz"
    set_path = cat_dir / "set_lists" / f"set_lists_{set_list}.json"
    set_lists, seqs, frames = _read_json(set_path), read_jgz(seqs_path), read_jgz(frames_path)
    try:
        by_seq: dict[str, dict[int, dict]] = {}
        for f in frames:
            by_seq.setdefault(f["sequence_name"], {})[f["frame_number"]] = f
        good = {s["sequence_name"] for s in seqs if s["viewpoint_quality_score"] > min_quality}
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed CO3D annotations in {cat_dir}: missing field {exc}") from exc
    out: dict[str, dict[str, list[dict]]] = {}
    for subset in ("train", "test"):
        if subset not in set_lists:
            raise ValueError(f"malformed CO3D set list {set_path}: no {subset!r} subset")
        data: dict[str, list[dict]] = {}
        for entry in set_lists[subset]:
            if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                raise ValueError(f"malformed CO3D set list {set_path}: entry {entry!r} is not [seq, frame, path]")
            seq, number, filepath = entry
            if seq not in good:
                continue
            if number not in by_seq.get(seq, {}):
                raise ValueError(f"{frames_path} has no frame {number} of sequence {seq!r} listed in {set_path}")
            where = f"{frames_path} ({seq}, frame {number})"
            data.setdefault(seq, []).append(_frame_record(by_seq[seq][number], filepath, where))
        out[subset] = data
    return out


# ------------------------------------------------------------------------------------ frame-id maps
def build_frame_id_map(annotations: Mapping[str, Mapping[str, Sequence[Mapping]]], seed: int = 0,
                       num_frames: int = 10, min_num_images: int = 50,
                       fast_eval: bool = False) -> dict[str, list[int]]:
    """VGGT ``test_co3d.py``'s sampling as a frozen map {"category/sequence": [ids]}.

    Python ``random`` and NumPy are seeded once; categories in the given order; sequences sorted (with
    fast_eval and ≥ 10 of them, ``random.sample(…, 10)`` then sorted again); a sequence with fewer than
    ``min_num_images`` frames, or any frame with T[0]+T[1]+T[2] > 1e5, is skipped *without* an RNG draw;
    otherwise ``np.random.choice(len, num_frames, replace=False)``; ids index the set-list order.
    """
    py_rng, np_rng = random.Random(seed), np.random.RandomState(seed)
    out: dict[str, list[int]] = {}
    for category, sequences in annotations.items():
        names = sorted(sequences)
        if fast_eval and len(names) >= 10:
            names = sorted(py_rng.sample(names, 10))
        for name in names:
            frames = sequences[name]
            if len(frames) < min_num_images or any(sum(fr["T"]) > 1e5 for fr in frames):
                continue
            out[f"{category}/{name}"] = np_rng.choice(len(frames), num_frames, replace=False).tolist()
    return out


def save_frame_id_map(path: Path, id_map: Mapping[str, Sequence[int]]) -> None:
    Path(path).write_text(json.dumps({k: [int(i) for i in v] for k, v in id_map.items()}, indent=1))


def load_frame_id_map(path: Path) -> dict[str, list[int]]:
    """Read a frozen map; a missing file or a malformed entry raises an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"frame-id map not found: {path}")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(i, int) for i in v)
                                                  for v in data.values()):
            raise ValueError("expected {\"category/sequence\": [int, ...]}")
    except (json.JSONDecodeError, ValueError) as exc:
        raise ValueError(f"malformed frame-id map {path}: {exc}") from exc
    return data


# ------------------------------------------------------------------------------------------ loading
def read_co3d_depth(path: Path, scale_adjustment: float = 1.0) -> np.ndarray:
    """CO3D depth: a 16-bit PNG holding float16 bits, times scale_adjustment; non-finite -> 0."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"CO3D depth map not found: {path}")
    with Image.open(path) as im:
        raw = np.array(im, dtype=np.uint16)
    depth = raw.view(np.float16).astype(np.float32) * np.float32(scale_adjustment)
    return np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)


def _read_mask(path: Path) -> np.ndarray:
    if not Path(path).is_file():
        raise FileNotFoundError(f"CO3D depth mask not found: {path}")
    with Image.open(path) as im:
        return np.array(im) > 0


def load_sequence(root: Path, category: str, sequence: str, frames: Sequence[Mapping], ids: Sequence[int],
                  image_width: int = 518, load_depth: bool = True, max_height: int | None = None) -> Scene:
    """One Scene from the frames ``ids`` (set-list indices, in that order) of a sequence."""
    root = Path(root)
    images, depths, valids, Ks, Es = [], [], [], [], []
    for i in ids:
        fr = frames[i]
        img = load_rgb(root / fr["filepath"])
        H, W = fr["image_size"]
        if img.size != (W, H):
            raise ValueError(f"{root / fr['filepath']} is {img.size[0]}x{img.size[1]} but its annotation says {W}x{H}")
        K = ndc_to_pixel_intrinsics(fr["focal_length"], fr["principal_point"], (H, W), fr["intrinsics_format"])
        depth = valid = None
        if load_depth:
            if not fr["depth_path"]:
                raise ValueError(f"frame {fr['frame_number']} of {category}/{sequence} has no depth path")
            depth = read_co3d_depth(root / fr["depth_path"], fr["depth_scale"])
            valid = _read_mask(root / fr["depth_mask_path"]) if fr["depth_mask_path"] else np.ones_like(depth, bool)
        image, depth, valid, K = crop_resize(img, depth, valid, K, image_width, max_height)
        images.append(image)
        depths.append(np.zeros(image.shape[:2], np.float32) if depth is None else depth)
        valids.append(np.zeros(image.shape[:2], bool) if valid is None else valid)
        Ks.append(K)
        Es.append(pt3d_to_opencv_extrinsics(fr["R"], fr["T"]))
    fields = stack_views(images, depths, valids, Ks, Es)
    return Scene(**fields, scene_id=f"co3d/{category}/{sequence}", frame_ids=[int(i) for i in ids],
                 category=category, dataset="co3d", meta={"sequence": sequence})


def resolve_root(root: str | Path | None, env: str, name: str) -> Path:
    """``root`` or ``$env``, which must exist; a clear error otherwise."""
    value = root if root is not None else os.environ.get(env)
    if not value:
        raise FileNotFoundError(f"{name} root not given: pass root=... or set {env}")
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"{name} root {path} does not exist (from {'root=' if root is not None else env})")
    return path


@DATASETS.register("co3d")
def build_co3d(root: str | Path | None = None, categories: Sequence[str] | None = None, split: str = "test",
               set_list: str = "fewview_dev", num_frames: int = 10, min_num_images: int = 50, seed: int = 0,
               fast_eval: bool = False, min_quality: float = 0.5,
               frame_id_map: str | Path | Mapping[str, Sequence[int]] | None = None,
               image_width: int = 518, load_depth: bool = True, max_scenes: int | None = None,
               max_height: int | None = None, spread: bool = False) -> list[Scene]:
    """CO3Dv2 scenes, one per sampled sequence, frames in the map's order (frame 0 = ids[0]).

    split "test" reads the set list's test subset; "train" and "calib" its train subset ("calib"
    checks that no sequence is shared with the test subset). Without ``frame_id_map`` the ids follow
    ``build_frame_id_map`` (VGGT's RNG path); with one (a dict or a JSON path), exactly its entries of
    the requested categories are loaded. ``categories`` defaults to the 41 seen categories present under
    root (absent ones are skipped, as VGGT does); named categories must exist.

    ``max_scenes`` loads only that many sequences (annotations are read for every category, images only
    for the sequences used); ``spread=True`` takes them round-robin over the categories (the first sequence
    of every category, then the second, ...) so that a subset still covers the protocol's categories.
    ``image_width`` / ``max_height``: ``crop_resize`` (VGGT: width 518, centre crop to at most 518).
    """
    if split not in _SUBSET:
        raise KeyError(f"unknown CO3D split {split!r}; known: {', '.join(_SUBSET)}")
    root = resolve_root(root, "HESS_CO3D_ROOT", "CO3D")
    if categories is None:
        categories = [c for c in SEEN_CATEGORIES if (root / c).is_dir()]
        if not categories:
            raise FileNotFoundError(f"no CO3D category folder under {root}")
    annotations = {}
    for cat in categories:
        if not (root / cat).is_dir():
            raise FileNotFoundError(f"CO3D category folder not found: {root / cat}")
        per_subset = read_category(root, cat, set_list, min_quality)
        if split == "calib":
            check_disjoint(per_subset["train"], per_subset["test"], f"CO3D {cat} calibration and test sequences")
        annotations[cat] = per_subset[_SUBSET[split]]
    if frame_id_map is None:
        ids = build_frame_id_map(annotations, seed, num_frames, min_num_images, fast_eval)
    else:
        ids = dict(frame_id_map) if isinstance(frame_id_map, Mapping) else load_frame_id_map(Path(frame_id_map))
        ids = {k: v for k, v in ids.items() if k.split("/", 1)[0] in annotations}
    keys = spread_over_categories(list(ids), max_scenes) if spread else list(ids)[:max_scenes]
    scenes = []
    for key in keys:
        frame_ids = ids[key]
        cat, seq = key.split("/", 1)
        frames = annotations[cat].get(seq)
        if frames is None or max(frame_ids, default=0) >= len(frames):
            raise ValueError(f"frame-id map entry {key!r} does not match the annotations of {root / cat}")
        scenes.append(load_sequence(root, cat, seq, frames, frame_ids, image_width, load_depth, max_height))
    return scenes


def spread_over_categories(keys: Sequence[str], n: int | None) -> list[str]:
    """The first ``n`` of ``keys`` ("category/sequence", protocol order) taken round-robin over categories:
    every category's first sequence (categories in order of first appearance), then every second, ...
    n None: all keys, in that round-robin order."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.split("/", 1)[0], []).append(key)
    out: list[str] = []
    depth = max((len(g) for g in groups.values()), default=0)
    for i in range(depth):
        out += [g[i] for g in groups.values() if i < len(g)]
    return out if n is None else out[:n]


# ------------------------------------------------------------------------------------ format adapter
def _write_jgz(path: Path, data: Any) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(data, f)


def write_co3d_category(root: Path, category: str, sequences: Mapping[str, Scene],
                        subsets: Mapping[str, str], quality: Mapping[str, float] | None = None,
                        intrinsics_format: str = "ndc_isotropic", set_list: str = "fewview_dev") -> None:
    """Write scenes as one CO3Dv2 category: PNG images, float16-bit depth PNGs, depth masks,
    frame/sequence annotations (PyTorch3D NDC cameras) and a set list. ``subsets`` maps each sequence to
    "train" or "test"; quality defaults to 1.0 per sequence. Frame numbers are 0..S-1."""
    root, frames, seqs = Path(root), [], []
    set_lists: dict[str, list] = {"train": [], "val": [], "test": []}
    for name, scene in sequences.items():
        seq_dir = root / category / name
        for sub in ("images", "depths", "depth_masks"):
            (seq_dir / sub).mkdir(parents=True, exist_ok=True)
        H, W = scene.image_hw
        for k in range(scene.num_frames):
            rel = {sub: f"{category}/{name}/{sub}/frame{k:06d}.png" for sub in ("images", "depths", "depth_masks")}
            rgb = (scene.images[k].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(rgb).save(root / rel["images"])
            Image.fromarray(scene.depth[k].numpy().astype(np.float16).view(np.uint16)).save(root / rel["depths"])
            Image.fromarray((scene.valid[k].numpy() * 255).astype(np.uint8)).save(root / rel["depth_masks"])
            R, T = opencv_to_pt3d_extrinsics(scene.extrinsics[k].double().numpy())
            focal, principal = pixel_to_ndc_intrinsics(scene.intrinsics[k].double().numpy(), (H, W), intrinsics_format)
            frames.append({"sequence_name": name, "frame_number": k, "frame_timestamp": float(k),
                           "image": {"path": rel["images"], "size": [H, W]},
                           "depth": {"path": rel["depths"], "scale_adjustment": 1.0, "mask_path": rel["depth_masks"]},
                           "mask": None, "meta": {},
                           "viewpoint": {"R": R.tolist(), "T": T.tolist(), "focal_length": focal,
                                         "principal_point": principal, "intrinsics_format": intrinsics_format}})
            set_lists[subsets[name]].append([name, k, rel["images"]])
        seqs.append({"sequence_name": name, "category": category, "point_cloud": None,
                     "viewpoint_quality_score": float((quality or {}).get(name, 1.0))})
    (root / category / "set_lists").mkdir(parents=True, exist_ok=True)
    _write_jgz(root / category / "frame_annotations.jgz", frames)
    _write_jgz(root / category / "sequence_annotations.jgz", seqs)
    (root / category / "set_lists" / f"set_lists_{set_list}.json").write_text(json.dumps(set_lists))
