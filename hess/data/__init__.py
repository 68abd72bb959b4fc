"""Scenes with ground truth: the ``Scene`` type, the ``DATASETS`` registry and its builders.

    scenes = build_scenes("synthetic", split="calib", num_scenes=4)
    scenes = build_scenes("co3d", root="/data/co3d", categories=["apple"])
    scenes = build_scenes("dtu", root="/data/dtu_test")
"""
from hess.data import co3d, dtu, synthetic  # noqa: F401  (register the builders)
from hess.data.geometry import look_at, project_points, reproject_pixels, unproject_depth
from hess.data.scene import DATASETS, Scene, build_scenes, normalize_scene
from hess.data.splits import SPLITS, check_disjoint, scene_key
from hess.data.synthetic import PRESETS, SyntheticOptions, exact_correspondences, make_scene

__all__ = [
    "DATASETS", "PRESETS", "SPLITS", "Scene", "SyntheticOptions", "build_scenes", "check_disjoint",
    "exact_correspondences", "look_at", "make_scene", "normalize_scene", "project_points",
    "reproject_pixels", "scene_key", "unproject_depth",
]
