"""Weights in: reading checkpoints safely, 2D→3D inflation (§4), and loading with a full report.

* :func:`read_state_dict` reads a path, URL or in-memory dict: torch files always with
  ``weights_only=True``; Caffe2 pickles only through :class:`RestrictedUnpickler`, which rebuilds
  numpy arrays and plain containers and refuses every other object.
* :func:`load_weights` maps any recognised layout (ours, torchvision's 2D ResNet, the original
  Caffe2 release, PySlowFast, mmaction2) onto our names, inflates 2D kernels (repeat over time,
  divide by T: a static clip then gives the 2D network's output), folds BN statistics into
  frozen affines, and reports every key it did not load by name.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from nlnet.models.resnet import FrozenBatchNorm, nonlocal_blocks


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A pickle asked for an object other than numpy arrays and plain containers."""


# (module, name) pairs a Caffe2 blob pickle legitimately needs: numpy array/scalar rebuilders
# (numpy ≥ 2 spells the module ``numpy._core``) and OrderedDict.  Nothing here can run code.
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds numpy arrays, dtypes and plain containers."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing to load {module}.{name} from a pickle: only numpy arrays and plain "
            f"containers are allowed in a weight file (it may be malicious or not a checkpoint)"
        )


def read_pickle(path: str | os.PathLike[str] | bytes) -> Any:
    """Read a (Python 2 or 3) pickle of numpy arrays with :class:`RestrictedUnpickler`."""
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _fetch(url: str) -> Path:
    """Download ``url`` into torch hub's cache once (with a progress bar) and return the path."""
    from urllib.parse import urlparse

    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    dst = cache / os.path.basename(urlparse(url).path)
    if not dst.exists():
        torch.hub.download_url_to_file(url, str(dst), progress=True)
    return dst


def _unwrap(obj: Any) -> dict[str, Any]:
    """The state dict inside a checkpoint dict (``model``, ``state_dict``, ``model_state``, ``blobs``)."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"a checkpoint must hold a dict of tensors, got {type(obj).__name__}")
    for key in ("model", "state_dict", "model_state", "blobs"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner:
            return dict(inner)
    return dict(obj)


def read_state_dict(source: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """The raw ``{name: tensor or array}`` of a checkpoint path, URL or dict (no renaming).

    ``.pkl`` files are Caffe2 pickles (read with the restricted unpickler); anything else goes
    through ``torch.load(weights_only=True)``.
    """
    if isinstance(source, Mapping):
        return _unwrap(source)
    text = os.fspath(source)
    path = _fetch(text) if _is_url(text) else Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {text}")
    if path.suffix in (".pkl", ".pickle"):
        return _unwrap(read_pickle(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path} is not a plain tensor checkpoint (torch.load with weights_only=True "
            f"refused it): {err}"
        ) from err
    return _unwrap(obj)


def to_tensor(value: Any, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"{name}: object arrays are not weights")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"{name}: expected a tensor or numpy array, got {type(value).__name__}")


@dataclass
class LoadReport:
    """What :func:`load_weights` did, by parameter name."""

    source_format: str = "nlnet"
    loaded: list[str] = field(default_factory=list)
    inflated: list[str] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    nonlocal_identity: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every model key was loaded (NL blocks included) and every source key was used."""
        return not (self.missing or self.unexpected or self.mismatched or self.nonlocal_identity)

    def __str__(self) -> str:
        lines = [
            f"format {self.source_format}: loaded {len(self.loaded)} tensors "
            f"({len(self.inflated)} inflated 2D→3D, {len(self.folded)} BN folded into frozen affines)"
        ]
        if self.nonlocal_identity:
            lines.append(
                "non-local blocks not in the checkpoint, left at their identity init: "
                + ", ".join(self.nonlocal_identity)
            )
        if self.missing:
            lines.append("missing (kept at init): " + ", ".join(self.missing))
        if self.mismatched:
            lines.append(
                "shape mismatch (kept at init): "
                + ", ".join(f"{n} {tuple(s)} vs model {tuple(d)}" for n, s, d in self.mismatched)
            )
        if self.unexpected:
            lines.append("unexpected (not used): " + ", ".join(self.unexpected))
        if self.ignored:
            lines.append(f"ignored non-weight entries: {', '.join(self.ignored)}")
        lines.extend(self.notes)
        return "\n".join(lines)


def inflate_weight(weight: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inflate a 2D kernel (C_out, C_in, kH, kW) or (…, 1, kH, kW) to (C_out, C_in, T, kH, kW).

    §4: each of the T planes is the 2D kernel divided by T, so a static clip gives the 2D output.
    """
    if weight.dim() == 4:
        weight = weight.unsqueeze(2)
    t = shape[2]
    return weight if t == 1 else weight.expand(-1, -1, t, -1, -1) / t


def _can_inflate(src: Tensor, dst: Tensor) -> bool:
    if dst.dim() != 5:
        return False
    if src.dim() == 4:
        return tuple(src.shape) == (dst.shape[0], dst.shape[1], dst.shape[3], dst.shape[4])
    return (
        src.dim() == 5
        and src.shape[2] == 1
        and dst.shape[2] > 1
        and (src.shape[:2] == dst.shape[:2] and src.shape[3:] == dst.shape[3:])
    )


def load_weights(
    model: nn.Module,
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    strict: bool = False,
) -> LoadReport:
    """Load a checkpoint into ``model`` and report what happened to every key.

    ``source``: a path, URL or state dict in our layout, a torchvision 2D ResNet, or one of the
    layouts :mod:`nlnet.models.convert` recognises (Caffe2, PySlowFast, mmaction2).  2D kernels
    are inflated; BN statistics are folded into :class:`FrozenBatchNorm` layers; a checkpoint
    without non-local blocks leaves the model's NL blocks at their identity init (the paper's
    fine-tuning path), which the report says.  Shape mismatches (e.g. a 1000-class fc) keep the
    model's init.  ``strict=True`` raises ``ValueError`` on any missing, unexpected or mismatched
    key (NL blocks left at identity are allowed: that is the documented fine-tuning path).
    """
    from nlnet.models.convert import to_nlnet_names

    raw = read_state_dict(source)
    state, fmt, ignored = to_nlnet_names(raw)
    report = LoadReport(source_format=fmt, ignored=ignored)
    used: set[str] = set()
    target = model.state_dict()
    frozen = {n for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm)}
    new: dict[str, Tensor] = {}

    # Frozen affines from BN statistics (reference §5.4: scale = γ/√(var+eps), shift = β − μ·scale).
    for prefix in frozen:
        keys = {k: f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var")}
        if keys["running_mean"] in state and keys["running_var"] in state:
            mod = model.get_submodule(prefix)
            assert isinstance(mod, FrozenBatchNorm)
            var = state[keys["running_var"]].double()
            scale = torch.rsqrt(var + mod.eps)
            if keys["weight"] in state:
                scale = scale * state[keys["weight"]].double()
            shift = -state[keys["running_mean"]].double() * scale
            if keys["bias"] in state:
                shift = shift + state[keys["bias"]].double()
            new[keys["weight"]], new[keys["bias"]] = scale, shift
            used.update(k for k in keys.values() if k in state)
            used.add(f"{prefix}.num_batches_tracked")
            report.folded.append(prefix)

    # BN layers from a frozen-affine checkpoint: x·s + b is BN with mean 0, var 1 − eps.
    bn_prefixes = {
        n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    for prefix in bn_prefixes:
        stats = (f"{prefix}.running_mean", f"{prefix}.running_var")
        if f"{prefix}.weight" in state and not any(k in state for k in stats):
            mod = model.get_submodule(prefix)
            new[f"{prefix}.running_mean"] = torch.zeros_like(target[f"{prefix}.running_mean"])
            new[f"{prefix}.running_var"] = torch.full_like(
                target[f"{prefix}.running_var"], 1.0 - mod.eps
            )
            report.notes.append(
                f"{prefix}: affine (frozen-BN) weights loaded into a BatchNorm with mean 0, var 1-eps"
            )

    for name, dst in target.items():
        if name in new:
            report.loaded.append(name)
            continue
        if name.endswith("num_batches_tracked"):
            if name in state:
                new[name] = state[name]
                used.add(name)
            continue
        if name not in state:
            report.missing.append(name)
            continue
        src = state[name]
        used.add(name)
        if tuple(src.shape) == tuple(dst.shape):
            new[name] = src
            report.loaded.append(name)
        elif _can_inflate(src, dst):
            new[name] = inflate_weight(src, dst.shape)
            report.loaded.append(name)
            report.inflated.append(name)
        else:
            report.mismatched.append((name, tuple(src.shape), tuple(dst.shape)))
    report.unexpected = sorted(set(state) - used)

    # NL blocks the checkpoint knows nothing of stay at their init (listed once, as blocks).
    missing = set(report.missing)
    for block_name, block in nonlocal_blocks(model).items():
        keys = [k for k in target if k.startswith(block_name + ".")]
        if keys and all(k in missing or k.endswith("num_batches_tracked") for k in keys):
            report.nonlocal_identity.append(block_name)
            missing -= set(keys)
            if not block.zero_init:
                report.notes.append(f"{block_name} has zero_init=False: it is not an identity")
    report.missing = [k for k in report.missing if k in missing]
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise ValueError(f"checkpoint does not match the model exactly:\n{report}")

    with torch.no_grad():
        for name, value in new.items():
            dst = target[name]
            dst.copy_(value.to(dst.dtype))
    return report
