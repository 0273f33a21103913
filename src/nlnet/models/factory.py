"""``create_model(name, ..., weights=...)``: build a registered model, optionally from weights.

``create_model(weights=FILE)`` builds exactly the network a self-describing weight file
(``docs/models.md``) was made for: its arch, its ``model_kwargs`` and its number of classes.
A keyword that contradicts the file raises
:class:`~nlnet.models.settings.WeightsMismatchError` naming the setting and both values.
A string that is neither a file nor a URL is a released-weights name (:mod:`nlnet.models.hub`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from nlnet.models import hub
from nlnet.models import settings as _settings
from nlnet.models.io import checkpoint_metadata, is_url, read_checkpoint, unwrap_state_dict
from nlnet.models.layouts import to_nlnet_names
from nlnet.models.registry import get_model_builder
from nlnet.models.weights import load_weights

#: ``create_model`` keywords that are not checked against a weight file's settings.
UNCHECKED_KWARGS: frozenset[str] = frozenset(
    {"device", "dtype", "backend", "dropout", "test_head", "freeze_bn", "zero_init_residual"}
)


def resolve_weights_spec(spec: Any) -> Any:
    """A mapping, an existing file, or a URL stays as it is; any other string is a released-
    weights name resolved by :func:`nlnet.models.hub.resolve_weights` to a local file."""
    if isinstance(spec, Mapping):
        return spec
    text = os.fspath(spec)
    if is_url(text) or Path(text).exists():
        return text
    looks_like_path = os.sep in text or text.endswith((".pth", ".pt", ".pyth", ".pkl"))
    if looks_like_path:
        raise FileNotFoundError(f"weights file not found: {text}")
    return hub.resolve_weights(text)


def create_model(
    name: str | None = None,
    *,
    weights: Any = None,
    num_classes: int | None = None,
    pretrained: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: a registered name (``list_models()``); optional with ``weights`` that name their
            arch (every file nlnet writes does).
        weights: a path, URL, checkpoint dict or released-weights name. The model is built with
            the file's ``model_kwargs`` and ``num_classes`` and every tensor must load (a
            different ``num_classes`` keeps the classifier at its init and says so in
            ``model.load_report``). A keyword or ``name`` that contradicts the file raises
            :class:`~nlnet.models.settings.WeightsMismatchError`.
        num_classes: classifier outputs (default: the file's, else 400).
        pretrained: initialisation weights (e.g. an ImageNet 2D ResNet to inflate, a baseline
            for an NL model): loaded leniently with :func:`~nlnet.models.load_weights` (missing
            NL blocks stay identity, the report is ``model.load_report``), but foreign or
            self-describing settings are still checked.
        kwargs: the builder's keyword arguments (``variant``, ``pairwise``, ...).

    The model gets ``model.pretrained_cfg``: arch, model_kwargs, num_classes, classes,
    preprocessing, source (``None`` when unknown).
    """
    if weights is not None and pretrained is not None:
        raise ValueError("pass weights= (exact weights) or pretrained= (initialisation), not both")
    meta: dict[str, Any] | None = None
    checkpoint: dict[str, Any] | None = None
    explicit_classes = num_classes is not None
    source = weights if weights is not None else pretrained
    if weights is not None:
        resolved = resolve_weights_spec(weights)
        checkpoint = read_checkpoint(resolved)
        meta = checkpoint_metadata(checkpoint)
        if meta is None:
            if name is None:
                raise ValueError(
                    f"the weights {_label(weights)} do not name their model (not a "
                    "self-describing nlnet file): pass the model name, e.g. "
                    "create_model('i3d_r50_nl5', weights=...), or convert them with nlnet convert"
                )
            if num_classes is None:
                fc = to_nlnet_names(unwrap_state_dict(checkpoint))[0].get("head.fc.weight")
                num_classes = None if fc is None else int(fc.shape[0])
        else:
            arch = meta.get("arch")
            if name is None:
                if not arch:
                    raise ValueError(f"the weights {_label(weights)} do not name their arch")
                name = arch
            elif arch and arch != name:
                raise _settings.WeightsMismatchError(
                    f"the weights {_label(weights)} are for arch {arch!r}, not {name!r}: call "
                    f"create_model({arch!r}, weights=...) or create_model(weights=...)",
                    [("arch", (arch,), name)],
                )
            stored = dict(meta["model_kwargs"])
            diffs = []
            for key, value in kwargs.items():
                if key in UNCHECKED_KWARGS or key not in stored:
                    continue
                if _settings.canonical(key, value) != _settings.canonical(key, stored[key]):
                    diffs.append((key, (stored[key],), value))
            if diffs:
                raise _settings.WeightsMismatchError(
                    f"create_model(weights={_label(weights)}): these keywords contradict the file:\n"
                    + "\n".join(
                        f"  {k}: the file has {want[0]!r}, you passed {have!r} -> drop the "
                        f"keyword (the file's value is used)"
                        for k, want, have in diffs
                    ),
                    diffs,
                )
            kwargs = {**stored, **kwargs}
            if num_classes is None:
                num_classes = meta.get("num_classes")
    if name is None:
        raise ValueError("create_model needs a model name (or weights that name their arch)")
    builder = get_model_builder(name)
    if pretrained is not None:  # the builder loads it (or says it has no weights)
        kwargs["pretrained"] = pretrained
    model = builder(num_classes=400 if num_classes is None else num_classes, **kwargs)
    kwargs.pop("pretrained", None)
    report = None
    if weights is not None:
        assert checkpoint is not None
        report = load_weights(model, checkpoint, strict=False)
        head_only = explicit_classes and all(n.startswith("head.") for n, _, _ in report.mismatched)
        bad_shapes = bool(report.mismatched) and not head_only
        if report.missing or report.unexpected or report.nonlocal_identity or bad_shapes:
            raise ValueError(f"the weights {_label(weights)} do not fill {name} exactly:\n{report}")
        if report.mismatched:
            report.notes.append(
                f"num_classes={num_classes} differs from the file's: the classifier keeps its init"
            )
    elif pretrained is not None:
        report = getattr(model, "load_report", None)
    if report is not None:
        model.load_report = report  # type: ignore[assignment]
    meta = meta or {}
    if meta.get("num_classes") not in (None, num_classes):
        meta["classes"] = None  # the classifier was replaced
    model.pretrained_cfg = {  # type: ignore[assignment]
        "arch": name,
        "model_kwargs": {k: v for k, v in kwargs.items() if k not in ("device", "dtype")},
        "num_classes": num_classes if num_classes is not None else 400,
        "classes": meta.get("classes"),
        "preprocessing": meta.get("preprocessing"),
        "source": meta.get("source") or _source_name(source),
    }
    return model


def _source_name(source: Any) -> str | None:
    return None if source is None or isinstance(source, Mapping) else os.fspath(source)


def _label(weights: Any) -> str:
    return "(a dict)" if isinstance(weights, Mapping) else repr(os.fspath(weights))
