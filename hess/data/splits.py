"""Seeded scene splits that are disjoint by construction.

A synthetic scene is identified by the key ``(TAG, split_code, seed, index)``, four 32-bit words that
seed ``np.random.default_rng`` directly. Keys of different splits differ in the split word, and all
keys have the same length with a non-zero tag: ``np.random.SeedSequence`` pads short entropy with zeros
(so ``5`` and ``(5, 0)`` seed the same stream), and fixed-length keys rule that collision out.
Real datasets use ``check_disjoint`` on sequence names (CO3Dv2 calibration vs evaluation).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

SPLITS: dict[str, int] = {"train": 1, "val": 2, "test": 3, "calib": 4}
_TAG = 0x4E55_0001        # constant first word of every split key
_MAX_WORD = 2 ** 32


def scene_key(split: str, index: int, seed: int = 0) -> tuple[int, int, int, int]:
    """The seed of scene ``index`` of ``split`` under the split-level ``seed`` (0 ≤ seed, index < 2³²)."""
    if split not in SPLITS:
        raise KeyError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    for name, value in (("seed", seed), ("index", index)):
        if int(value) != value or not 0 <= value < _MAX_WORD:
            raise ValueError(f"{name} must be an integer in [0, 2**32), got {value!r}")
    return (_TAG, SPLITS[split], int(seed), int(index))


def split_of(key: tuple[int, ...]) -> str:
    """The split a key was made for (inverse of ``scene_key``'s split word)."""
    if len(key) != 4 or key[0] != _TAG:
        raise ValueError(f"{key!r} is not a split key")
    return {code: name for name, code in SPLITS.items()}[key[1]]


def frame_order_rng(key: tuple[int, ...]) -> np.random.Generator:
    """An RNG for a scene's frame shuffle, independent of the stream that built the scene."""
    return np.random.default_rng(np.random.SeedSequence(list(key)).spawn(1)[0])


def check_disjoint(first: Iterable[str], second: Iterable[str], what: str = "splits") -> None:
    """Raise ValueError naming the shared items when two collections of ids overlap."""
    shared = sorted(set(first) & set(second))
    if shared:
        more = f" (and {len(shared) - 5} more)" if len(shared) > 5 else ""
        raise ValueError(f"{what} overlap: {', '.join(map(str, shared[:5]))}{more}")
