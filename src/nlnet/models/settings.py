"""A model's non-shape settings, and the check that weights were made for them.

Two networks with the same parameter names and shapes can compute different things: the
temporal layout (``variant``: where time is pooled), the non-local block's pairwise function,
its scale, whether x is pooled before or after φ/g, its normalisation, temporal groups, ...
Loading weights into a network whose settings differ from the ones they were trained with gives
wrong outputs *silently* (e.g. PySlowFast's 8×8 I3D-NLN in the ``speed`` layout: 36% relative
error in the logits). Every video ResNet built by :func:`nlnet.models.zoo.build_video_resnet`
therefore carries ``model.settings``, weight files carry ``model_kwargs`` (or imply settings by
their layout, see :func:`nlnet.models.layouts.implied_settings`), and
:func:`check_settings` raises :class:`WeightsMismatchError` naming every difference.

Not checked: ``freeze_bn`` (BN statistics are folded into frozen affines on load, which computes
the same thing in eval mode; the 128-frame recipe fine-tunes a BN model with frozen BN),
``dropout``, ``backend``, ``zero_init_residual`` (training-only or numerically equivalent),
``test_head`` (a test-protocol choice) and the NL placement (it changes the parameter names, and
a baseline's weights in an NL model is the paper's fine-tuning path).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: Defaults of :func:`nlnet.models.zoo.build_video_resnet` for the settings below.
DEFAULTS: dict[str, Any] = {
    "variant": "original",
    "inflate": None,
    "pairwise": "embedded_gaussian",
    "extent": "spacetime",
    "temporal_groups": None,
    "norm": "batch",
    "scale": None,
    "pool_before_conv": True,
    "subsample": True,
    "freeze_bn": False,
}
#: Settings compared between weights and model (all change the computation, not the shapes).
CHECKED: tuple[str, ...] = (
    "variant",
    "inflate",
    "pairwise",
    "extent",
    "temporal_groups",
    "norm",
    "scale",
    "pool_before_conv",
    "subsample",
)
#: Settings of the non-local blocks: compared only when both sides have NL blocks.
NONLOCAL: frozenset[str] = frozenset(CHECKED) - {"variant", "inflate"}


class WeightsMismatchError(ValueError):
    """Weights were made for a model with other settings (each named with both values)."""

    def __init__(self, message: str, differences: list[tuple[str, Any, Any]]) -> None:
        super().__init__(message)
        #: (setting, the weights' value(s), the model's value)
        self.differences = differences


def resolve(kwargs: Mapping[str, Any], temporal: str | None = None) -> dict[str, Any]:
    """Every setting of :data:`DEFAULTS` with ``kwargs`` applied, as the builder resolves them:
    ``norm`` defaults to ``None`` under ``freeze_bn``; ``inflate`` to ``"3x1x1"`` for I3D."""
    out = {**DEFAULTS, **{k: v for k, v in kwargs.items() if k in DEFAULTS}}
    if kwargs.get("freeze_bn") and "norm" not in kwargs:
        out["norm"] = None
    if out["inflate"] is None and temporal == "i3d":
        out["inflate"] = "3x1x1"
    return out


def canonical(name: str, value: Any) -> Any:
    """A comparable form: stage keys as ``res3``, sequences as tuples, numbers as floats."""
    if isinstance(value, Mapping):
        items = []
        for k, v in value.items():
            key = f"res{k}" if isinstance(k, int) else str(k)
            items.append((key, canonical(name, v)))
        return tuple(sorted(items))
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(canonical(name, v) for v in value)
    if name == "scale" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def _override(name: str, value: Any) -> str:
    yaml = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
    if isinstance(value, Mapping):
        yaml = "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return f"{name}={value!r} (config: model.kwargs.{name}: {yaml})"


def check_settings(
    model_settings: Mapping[str, Any],
    weights_settings: Mapping[str, tuple[Any, ...]],
    *,
    source: str,
    model_has_nonlocal: bool,
    weights_have_nonlocal: bool,
    why: str = "",
) -> None:
    """Raise :class:`WeightsMismatchError` when a setting of the model is not one the weights
    allow. ``weights_settings``: ``{setting: allowed values}`` (one value for a self-describing
    file, several when a layout leaves a choice). Settings either side does not know are skipped.
    """
    diffs: list[tuple[str, Any, Any]] = []
    for name in CHECKED:
        if name not in weights_settings or name not in model_settings:
            continue
        if name in NONLOCAL and not (model_has_nonlocal and weights_have_nonlocal):
            continue
        allowed = weights_settings[name]
        have = model_settings[name]
        if canonical(name, have) not in [canonical(name, a) for a in allowed]:
            diffs.append((name, allowed, have))
    if not diffs:
        return
    lines = [f"the weights {source} were made for a model with other settings{why}:"]
    for name, allowed, have in diffs:
        want = allowed[0] if len(allowed) == 1 else " or ".join(repr(a) for a in allowed)
        want_s = repr(want) if len(allowed) == 1 else want
        lines.append(
            f"  {name}: the weights need {want_s}, the model has {have!r} -> build the model "
            f"with {_override(name, allowed[0])}"
        )
    lines.append(
        "Loading them anyway would give wrong outputs without any missing key. "
        "(To initialise training from weights of another layout on purpose, pass "
        "check_settings=False to load_weights / set model.init_check_settings: false.)"
    )
    raise WeightsMismatchError("\n".join(lines), diffs)
