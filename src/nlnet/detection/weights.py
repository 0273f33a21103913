"""Weights for the detectors (§6: "fine-tuned from ImageNet").

* :func:`load_backbone_weights` — an ImageNet ResNet in torchvision's format (``conv1.weight``,
  ``layer3.5.conv2.weight``, ..., ``fc.*``), from a path or URL, into the backbone's ResNet body.
* :func:`load_detector_weights` — a whole detector (a torchvision Mask R-CNN / keypoint R-CNN
  state dict, or a checkpoint written by this project's engine).  Loading a *baseline* checkpoint
  into a non-local model is allowed: only the non-local blocks are missing, and they keep their
  identity initialisation, so the model computes exactly what the baseline computed.

Files are read with ``torch.load(..., weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nlnet.detection.models import NONLOCAL_PREFIXES


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https", "file")


def read_state_dict(
    source: str | os.PathLike[str] | Mapping[str, Any], *, model_dir: str | None = None
) -> dict[str, Tensor]:
    """A state dict from a mapping, a local file or a URL (cached by ``torch.hub``).

    Checkpoints that wrap the weights (``{"model": ...}``, ``{"state_dict": ...}``) are unwrapped,
    and a DistributedDataParallel ``module.`` prefix is removed.
    """
    if isinstance(source, Mapping):
        obj: Any = source
    else:
        text = os.fspath(source)
        if _is_url(text):
            obj = torch.hub.load_state_dict_from_url(
                text, model_dir=model_dir, map_location="cpu", progress=True, weights_only=True
            )
        else:
            path = Path(text)
            if not path.is_file():
                raise FileNotFoundError(f"weights file not found: {path}")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"{source!r} does not hold a state dict (a mapping of parameter names to tensors)"
        )
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_backbone_weights(
    model: nn.Module,
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    model_dir: str | None = None,
) -> None:
    """Load an ImageNet ResNet (torchvision format, path or URL) into ``model.backbone.body``.

    The classifier (``fc.*``) is dropped; every other backbone tensor must be present and match
    (a ResNet-50 file for an R101 detector fails with the offending names).
    """
    body = model.backbone.body
    state = read_state_dict(source, model_dir=model_dir)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    # FrozenBatchNorm2d drops num_batches_tracked itself; keep the comparison to real tensors.
    expected = {k for k in body.state_dict() if not k.endswith("num_batches_tracked")}
    given = {k for k in state if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source!r} is not a torchvision ResNet-{model.backbone.depth} state dict: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    body.load_state_dict(state, strict=True)


def load_detector_weights(
    model: nn.Module,
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    model_dir: str | None = None,
) -> list[str]:
    """Load a detector checkpoint; returns the names left at their initial values.

    Only non-local block parameters may be missing (a baseline checkpoint in a non-local model);
    any other missing or unexpected name raises ``ValueError``.
    """
    state = read_state_dict(source, model_dir=model_dir)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(NONLOCAL_PREFIXES)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{source if not isinstance(source, Mapping) else 'state dict'} does not fit "
            f"{type(model).__name__}: missing {missing[:8]}, unexpected "
            f"{list(result.unexpected_keys)[:8]}"
        )
    return list(result.missing_keys)
