"""hess: head-wise sparse attention (HeSS) for 3D vision transformers.

The pipeline verbs, in data-flow order::

    scenes = hess.build_scenes("synthetic", split="calib", num_scenes=4)
    model  = hess.load_vggt("hess-tiny")
    scores = calibrate(model, scenes, CalibConfig())   # from hess.calibrate import calibrate, CalibConfig
    blocks = hess.allocate(scores.hess(lam=0.5), keep_ratio=0.25, num_key_blocks=n_k)
    model  = hess.sparsify(model, plan)

Exports are resolved lazily so that ``import hess`` stays cheap.  Calibration and evaluation are used
through their modules (``hess.calibrate.calibrate``, ``hess.evaluate.evaluate_model``): a package attribute
named like a submodule is replaced by that submodule as soon as it is imported, so re-exporting a function
under the module's own name would be unreliable.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "build_vggt": "hess.models",
    "load_vggt": "hess.models",
    "build_pi3": "hess.models",
    "load_pi3": "hess.models",
    "build_model": "hess.models",
    "load_model": "hess.models",
    "Scene": "hess.data",
    "build_scenes": "hess.data",
    "head_sparse_attention": "hess.attention",
    "SparsePlan": "hess.patch",
    "sparsify": "hess.patch",
    "densify": "hess.patch",
    "allocate": "hess.budget",
    "CalibConfig": "hess.calibrate",
    "HeadScores": "hess.scoring",
    "SCORERS": "hess.scoring",
    "load_results": "hess.results",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hess' has no attribute {name!r}")
