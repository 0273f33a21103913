"""Checkpoints: atomic writes, discovery of the newest, RNG capture, weight initialisation.

A checkpoint is a ``torch.save`` dict of tensors and plain Python values only, so it loads with
``torch.load(weights_only=True)``: ``model``, ``optimizer``, ``schedule``, ``scaler``, ``rng``
(one entry per process), ``iteration`` (the data position follows from it, see
``engine/samplers.py``), ``config`` and ``nlnet_checkpoint`` (format version).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT_VERSION = 1
_NAME = re.compile(r"^iter_(\d+)\.pt$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_path(output_dir: str | Path, iteration: int) -> Path:
    return checkpoint_dir(output_dir) / f"iter_{iteration:08d}.pt"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints of a run directory, oldest first."""
    d = checkpoint_dir(output_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    if keep <= 0:
        return
    for p in list_checkpoints(output_dir)[:-keep]:
        p.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a file written by :func:`nlnet.io.atomic_save` (tensors and plain values only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, got {type(obj).__name__}")
    return obj


def is_engine_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and "nlnet_checkpoint" in obj and "model" in obj


def rng_state() -> dict[str, Any]:
    """This process's random states (torch CPU and CUDA, numpy, Python) as tensors/plain values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gauss": float(np_state[4]),
        },
        "python": _py_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gauss"],
        )
    )
    random.setstate(_py_state_from_plain(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_plain(s: tuple) -> list:
    return [s[0], list(s[1]), s[2]]


def _py_state_from_plain(s: list) -> tuple:
    return (s[0], tuple(s[1]), s[2])


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers (state-dict names without prefixes)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def weights_metadata(cfg: Any, model: nn.Module) -> dict[str, Any]:
    """The self-describing fields of a training checkpoint (``docs/models.md``): arch, every
    model kwarg, num_classes, class names and the preprocessing of ``cfg``'s recipe."""
    from nlnet.models.io import FORMAT, FORMAT_VERSION, plain

    m, d, e = cfg.model, cfg.data, cfg.eval
    net = unwrap(model)
    kwargs: dict[str, Any] = dict(getattr(net, "settings", None) or m.kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("device", "dtype", "pretrained")}
    if m.freeze_bn:
        kwargs["freeze_bn"] = True
    fc = getattr(getattr(net, "head", None), "fc", None) or getattr(net, "fc", None)
    num_classes = getattr(fc, "out_features", None) or m.num_classes
    classes = d.classes if isinstance(d.classes, list | tuple) else None
    from nlnet.data.transforms import NORMALIZATIONS

    mean, std = NORMALIZATIONS.get(d.normalization, (None, None))
    preprocessing = {
        "mean": None if mean is None else list(mean),
        "std": None if std is None else list(std),
        "frames": d.clip_length,
        "stride": d.sampling_rate,
        "test_scale": d.test_scale,
        "crop": d.crop_size,
        "clips": e.num_clips,
        "crops": e.test_crop,
    }
    try:
        kwargs, preprocessing = plain(kwargs), plain(preprocessing)
    except TypeError:
        kwargs = {k: v for k, v in kwargs.items() if _is_plain(v)}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": m.name,
        "model_kwargs": kwargs,
        "num_classes": num_classes,
        "classes": None if classes is None else [str(c) for c in classes],
        "preprocessing": preprocessing,
        "converted_from": None,
        "source": None,
        "notes": [],
    }


def _is_plain(value: Any) -> bool:
    from nlnet.models.io import plain

    try:
        plain(value)
    except TypeError:
        return False
    return True
