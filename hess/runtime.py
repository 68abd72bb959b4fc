"""Process-level runtime helpers: seeding, device/dtype, threads, timing, git SHA, loading by name.

    seed_everything(0)
    device = resolve_device("auto"); dtype = resolve_dtype("bf16")
    timing = time_fn(lambda: model(images), warmup=1, repeats=5)   # timing.median_ms
    git_sha()                                                      # "3f2c…" or "unknown"
    load_object("sweeps/spaces.py:BUDGET")                         # FILE.py:NAME or MODULE:NAME

torch is imported lazily so that light entry points (``hess --help``, sweep workers) stay fast.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Optional

if TYPE_CHECKING:
    import torch

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float64": "float64", "fp64": "float64", "double": "float64",
}


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every CUDA device).

    Args:
        seed: a non-negative int.
        deterministic: also ask torch for deterministic algorithms (may be slower; raises at run
            time on ops that have no deterministic implementation).
    """
    import numpy as np
    import torch

    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def resolve_device(name: str = "auto") -> "torch.device":
    """``"auto"`` -> cuda if available, else cpu; ``"cuda"``/``"cuda:1"``/``"cpu"`` checked to exist."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N): {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def resolve_dtype(name: "str | torch.dtype") -> "torch.dtype":
    """``"float32" | "fp32" | "bfloat16" | "bf16" | "float16" | "fp16" | "float64"`` (or a dtype) -> dtype."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(sorted(_DTYPES))}")
    return getattr(torch, _DTYPES[key])


def autocast(device: "torch.device", dtype: "torch.dtype") -> ContextManager[Any]:
    """``torch.autocast`` for reduced precision, a no-op context for float32/float64."""
    import torch

    if dtype in (torch.float32, torch.float64):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_threads(num_threads: Optional[int]) -> int:
    """Set torch's intra-op thread count (None leaves it); returns the previous count."""
    import torch

    previous = torch.get_num_threads()
    if num_threads is not None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        torch.set_num_threads(num_threads)
    return previous


@dataclass(frozen=True)
class Timing:
    """Wall-clock times of repeated calls, in milliseconds (warm-up calls excluded)."""

    times_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    @property
    def std_ms(self) -> float:
        return statistics.stdev(self.times_ms) if len(self.times_ms) > 1 else 0.0


def _synchronize() -> None:
    torch = sys.modules.get("torch")  # only synchronise if torch is in use at all
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5,
            sync: Optional[Callable[[], None]] = _synchronize) -> Timing:
    """Time ``fn()`` with ``time.perf_counter``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    ``sync`` runs before each clock read (default: CUDA synchronise when CUDA is in use), so that
    asynchronous GPU work is counted.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(tuple(times))


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.elapsed_ms`` (perf_counter based)."""

    def __enter__(self) -> "Stopwatch":
        self._start = time.perf_counter()
        self.elapsed_ms = float("nan")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.elapsed_ms = (time.perf_counter() - self._start) * 1e3


def _git(args: list[str], cwd: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _repo_dir(path: Optional[str | Path]) -> Path:
    return Path(path) if path is not None else Path(__file__).resolve().parent


def git_sha(path: Optional[str | Path] = None) -> str:
    """Commit SHA of the git checkout holding ``path`` (default: this package), or ``"unknown"``."""
    return _git(["rev-parse", "HEAD"], _repo_dir(path)) or "unknown"


def git_dirty(path: Optional[str | Path] = None) -> Optional[bool]:
    """Whether tracked files differ from HEAD (None outside git)."""
    out = _git(["status", "--porcelain", "--untracked-files=no"], _repo_dir(path))
    return None if out is None else bool(out)


def load_object(spec: str) -> Any:
    """``"package.module:attr"`` or ``"path/to/file.py:attr"`` -> the object."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(f"expected MODULE:NAME or FILE.py:NAME, got {spec!r}")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"{spec!r}: file {path} not found (paths are relative to {Path.cwd()})")
        name = f"_hess_loaded_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(name)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    if not hasattr(module, attr):
        raise AttributeError(f"{spec!r}: {target} has no attribute {attr!r}")
    return getattr(module, attr)
