"""Weights into a model: 2D→3D inflation (§4), BN folding, the settings check, a full report.

Reading files (container sniffing, the restricted unpickler, URLs) is :mod:`nlnet.models.io`;
renaming foreign layouts is :mod:`nlnet.models.layouts`.

* :func:`load_weights` maps any recognised layout (ours, torchvision's 2D ResNet, the original
  Caffe2 release, PySlowFast, mmaction2) onto our names, inflates 2D kernels (repeat over time,
  divide by T: a static clip then gives the 2D network's output), folds BN statistics into
  frozen affines, and reports every key it did not load by name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from nlnet.block import find_nonlocal_blocks
from nlnet.models import settings as _settings
from nlnet.models.io import (
    CheckpointFormatError,
    RestrictedUnpickler,
    UnsafeCheckpointError,
    checkpoint_metadata,
    read_checkpoint,
    read_pickle,
    read_state_dict,
    to_tensor,
    unwrap_state_dict,
)
from nlnet.models.layouts import has_nonlocal, implied_settings, to_nlnet_names
from nlnet.models.resnet import FrozenBatchNorm
from nlnet.models.settings import WeightsMismatchError

__all__ = [
    "CheckpointFormatError",
    "LoadReport",
    "RestrictedUnpickler",
    "UnsafeCheckpointError",
    "WeightsMismatchError",
    "check_weights_settings",
    "inflate_weight",
    "load_weights",
    "read_pickle",
    "read_state_dict",
    "to_tensor",
    "weights_settings",
]


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


def weights_settings(
    checkpoint: Mapping[str, Any], raw: Mapping[str, Any], state: Mapping[str, Any], fmt: str
) -> tuple[dict[str, tuple[Any, ...]], str]:
    """``({setting: allowed values}, why)`` for a checkpoint: its stored ``model_kwargs`` when it
    is self-describing, else what its layout implies (:func:`~nlnet.models.layouts.implied_settings`)."""
    meta = checkpoint_metadata(checkpoint)
    if meta is not None:
        arch = meta.get("arch") or ""
        temporal = "i3d" if arch.startswith("i3d") else "c2d" if arch.startswith("c2d") else None
        resolved = _settings.resolve(meta["model_kwargs"], temporal)
        if temporal is None and "inflate" not in meta["model_kwargs"]:
            resolved.pop("inflate")
        if arch and not arch.startswith(("c2d", "i3d")):
            return {}, ""  # another family (demo models): its own kwargs
        return {k: (v,) for k, v in resolved.items()}, f" (stored in the file, arch {arch!r})"
    return implied_settings(fmt, raw, state, checkpoint), f" (implied by its {fmt} layout)"


def _describe(source: Any) -> str:
    return "(a state dict)" if isinstance(source, Mapping) else repr(os.fspath(source))


def _check(
    model: nn.Module,
    checkpoint: Mapping[str, Any],
    raw: Mapping[str, Any],
    state: Mapping[str, Any],
    fmt: str,
    source: str,
) -> None:
    model_settings = getattr(model, "settings", None)
    if not isinstance(model_settings, Mapping):
        return
    wanted, why = weights_settings(checkpoint, raw, state, fmt)
    _settings.check_settings(
        model_settings,
        wanted,
        source=source,
        model_has_nonlocal=bool(find_nonlocal_blocks(model)),
        weights_have_nonlocal=has_nonlocal(state),
        why=why,
    )


def check_weights_settings(
    model: nn.Module, source: str | os.PathLike[str] | Mapping[str, Any]
) -> None:
    """Raise :class:`~nlnet.models.settings.WeightsMismatchError` when the weights of ``source``
    (a path or a checkpoint dict) were made for other settings than ``model.settings``."""
    checkpoint = read_checkpoint(source)
    raw = unwrap_state_dict(checkpoint)
    state, fmt, _ = to_nlnet_names(raw)
    _check(model, checkpoint, raw, state, fmt, _describe(source))


def load_weights(
    model: nn.Module,
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    strict: bool = False,
    check_settings: bool = True,
) -> LoadReport:
    """Load a checkpoint into ``model`` and report what happened to every key.

    ``source``: a path, URL or (checkpoint or state) dict in our layout, a torchvision 2D ResNet,
    or one of the layouts :mod:`nlnet.models.layouts` recognises (Caffe2, PySlowFast, mmaction2).
    2D kernels are inflated; BN statistics are folded into :class:`FrozenBatchNorm` layers; a
    checkpoint without non-local blocks leaves the model's NL blocks at their identity init (the
    paper's fine-tuning path), which the report says.  Shape mismatches (e.g. a 1000-class fc)
    keep the model's init.  ``strict=True`` raises ``ValueError`` on any missing, unexpected or
    mismatched key (NL blocks left at identity are allowed: that is the documented fine-tuning
    path).

    Settings: when ``model`` knows its settings (``model.settings``, set by the video ResNet
    builders) and the weights name or imply others (variant, pairwise, scale, ...), this raises
    :class:`~nlnet.models.settings.WeightsMismatchError` naming each one, unless
    ``check_settings=False`` (e.g. initialising a training run from another layout on purpose).
    """
    checkpoint = read_checkpoint(source)
    raw = unwrap_state_dict(checkpoint)
    state, fmt, ignored = to_nlnet_names(raw)
    if check_settings:
        _check(model, checkpoint, raw, state, fmt, _describe(source))
    report = LoadReport(source_format=fmt, ignored=ignored)
    implied = implied_settings(fmt, raw, state, checkpoint)
    if implied:
        report.notes.append(
            f"the {fmt} layout implies "
            + ", ".join(
                f"{k}={v[0]!r}" if len(v) == 1 else f"{k} in {list(v)}" for k, v in implied.items()
            )
        )
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
    for block_name, block in find_nonlocal_blocks(model).items():
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
