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
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from nlnet.detection.models import NONLOCAL_PREFIXES
from nlnet.models.io import read_state_dict as _read_state_dict


def read_state_dict(
    source: str | os.PathLike[str] | Mapping[str, Any], *, model_dir: str | None = None
) -> dict[str, Tensor]:
    """A state dict from a mapping, a local file or a URL (cached by ``torch.hub``), read by
    :func:`nlnet.models.io.read_state_dict` (container sniffing, ``weights_only`` loading).

    Checkpoints that wrap the weights (``{"model": ...}``, ``{"state_dict": ...}``) are unwrapped,
    and a DistributedDataParallel ``module.`` prefix is removed.
    """
    state = _read_state_dict(source, model_dir=model_dir)
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"{source!r} does not hold a state dict (a mapping of parameter names to tensors)"
        )
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
