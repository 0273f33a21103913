"""Converters from other projects' checkpoints to self-describing nlnet files, and ``nlnet convert``.

The layouts and their key names are in :mod:`nlnet.models.layouts`. A converter detects from
the file itself what it can (the format from its keys, frozen BN from missing statistics, NL
normalisation, mmcv's sub-sampling and Gaussian mode, PySlowFast's arch from the ``cfg`` stored
in a ``.pyth``, the arch name from the shapes); what the weights cannot tell must be given and is
never guessed from the file name:

=============  ===================================================================================
source         required when the file cannot tell
=============  ===================================================================================
caffe2         ``variant``: ``original`` (the release's 32×2, 128×1), ``speed`` (its 8×8, 32×4),
               ``slowfast`` (PySlowFast's I3D / I3D_NLN ``.pkl``) or ``slowfast_nopool``
               (PySlowFast's ``C2D_NOPOOL``)
slowfast       ``variant``: ``slowfast`` or ``slowfast_nopool`` (read from the ``cfg`` if present)
mmaction2      ``pairwise``: ``embedded_gaussian`` or ``dot_product`` (``gaussian`` is detected)
=============  ===================================================================================

:func:`convert_checkpoint` writes the self-describing file of ``docs/models.md`` (arch,
model_kwargs, num_classes, classes, preprocessing, source), which
``nlnet.create_model(weights=FILE)`` rebuilds exactly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from nlnet.models.io import (
    CheckpointFormatError,
    read_checkpoint,
    save_weights,
    unwrap_state_dict,
    weights_file,
)
from nlnet.models.layouts import (
    FORMATS,
    LAYOUT_VARIANTS,
    detect_format,
    has_nonlocal,
    nonlocal_has_bn,
    slowfast_config,
    to_nlnet_names,
)
from nlnet.models.registry import get_model_builder
from nlnet.models.settings import WeightsMismatchError
from nlnet.models.weights import load_weights
from nlnet.models.zoo import DEPTHS, nonlocal_placement

__all__ = [
    "CONVERTERS",
    "FORMATS",
    "Conversion",
    "convert_caffe2",
    "convert_checkpoint",
    "convert_mmaction2",
    "convert_slowfast",
    "detect_format",
    "infer_arch",
    "to_nlnet_names",
]

Source = str | os.PathLike[str] | Mapping[str, Any]


@dataclass
class Conversion:
    """A converted checkpoint: our state dict plus the model it needs (arch and settings)."""

    state_dict: dict[str, Tensor]
    source_format: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    arch: str | None = None
    #: NL placement kwargs the inferred ``arch`` needs (blocks not at the registered positions).
    placement: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int | None:
        w = self.state_dict.get("head.fc.weight")
        return None if w is None else int(w.shape[0])


_OURS = re.compile(r"(stem|head|res\d+)\.|^res\d+\.\d+\.|^res\d+\.nonlocal\d+\.")


def _read(source: Source, expected: str) -> tuple[dict[str, Any], dict[str, Any], Conversion]:
    """(whole checkpoint, raw state dict, conversion with the renamed state dict)."""
    checkpoint = read_checkpoint(source)
    raw = unwrap_state_dict(checkpoint)
    state, fmt, ignored = to_nlnet_names(raw)
    if fmt != expected:
        raise CheckpointFormatError(
            f"this checkpoint looks like the {fmt!r} layout, not {expected!r}"
            + ("" if fmt == "unknown" else f": convert it with --from {fmt} (or --from auto)")
        )
    unmapped = sorted(k for k in state if not _OURS.match(k))
    conv = Conversion(state, fmt, ignored=ignored, unmapped=unmapped)
    conv.arch, conv.placement = infer_arch(state)
    return checkpoint, raw, conv


def infer_arch(state: Mapping[str, Tensor]) -> tuple[str | None, dict[str, Any]]:
    """The registered arch a state dict (our names) fills, from its shapes and keys, plus the
    placement kwargs it needs when its NL blocks are not at the registered positions.

    C2D vs I3D from conv1's temporal kernel (1 vs 5); depth from the number of res4 blocks
    (6: R50, 23: R101); 0/1/5/10 NL blocks from the ``res{s}.nonlocal{i}`` keys.
    """
    stem = state.get("stem.conv.weight")
    if stem is None or stem.dim() not in (4, 5):
        return None, {}
    temporal = "i3d" if stem.dim() == 5 and stem.shape[2] > 1 else "c2d"
    res4 = {int(m[1]) for k in state if (m := re.match(r"res4\.(\d+)\.", k))}
    depth = next((d for d, blocks in DEPTHS.items() if len(res4) == blocks[2]), None)
    if depth is None:
        return None, {}
    found: dict[str, list[int]] = {}
    for k in state:
        if m := re.match(r"(res\d+)\.nonlocal(\d+)\.", k):
            found.setdefault(m[1], [])
            if int(m[2]) not in found[m[1]]:
                found[m[1]].append(int(m[2]))
    found = {k: sorted(v) for k, v in sorted(found.items())}
    count = sum(len(v) for v in found.values())
    base = f"{temporal}_r{depth}"
    if count == 0:
        return base, {}
    if count in (5, 10) and nonlocal_placement(depth, count) == found:
        return f"{base}_nl{count}", {}
    if count == 1:
        (stage,) = found
        placed = nonlocal_placement(depth, 1, stage)
        if placed == found:
            return f"{base}_nl1", ({} if stage == "res4" else {"nonlocal_stage": int(stage[3:])})
    return f"{base}_nl{count}" if count in (1, 5, 10) else f"{base}_nl5", {
        "nonlocal_blocks": {int(s[3:]): v for s, v in found.items()}
    }


_VARIANT_HELP = {
    "original": "the release's 32x2 / 128x1 models",
    "speed": "its 8x8 / 32x4 models",
    "slowfast": "PySlowFast's C2D / I3D / I3D_NLN 8x8",
    "slowfast_nopool": "PySlowFast's C2D_NOPOOL / I3D_NOPOOL (no temporal pool after res2)",
}


def _variant_error(fmt: str, why: str) -> ValueError:
    choices = LAYOUT_VARIANTS[fmt]
    return ValueError(
        f"the {fmt} weights do not tell their temporal layout ({why}): pass it explicitly, "
        f"variant=... in Python or --variant {{{','.join(choices)}}} to nlnet convert. "
        + "; ".join(f"{v}: {_VARIANT_HELP[v]}" for v in choices)
    )


def _nl_note(conv: Conversion) -> None:
    conv.notes.append(
        "NL blocks: pool x before phi/g (pool_before_conv=True), softmax scale dim_inner^-1/2 "
        "(the defaults)"
    )


def convert_caffe2(source: Source, *, variant: str | None = None) -> Conversion:
    """The original release's ``.pkl`` (reference §5.5), or PySlowFast's Caffe2-format ``.pkl``.

    ``variant`` is required: the blobs are the same for every temporal layout (``original``: the
    release's 32×2 and 128×1 models; ``speed``: its 8×8 and 32×4; ``slowfast``: PySlowFast's
    I3D / I3D_NLN; ``slowfast_nopool``: PySlowFast's C2D_NOPOOL). Frozen BN ("affine" models:
    no ``_bn_rm``/``_bn_riv``), the NL blocks' BN and the arch are read from the blobs.
    """
    _, _, conv = _read(source, "caffe2")
    state = conv.state_dict
    if variant is None:
        raise _variant_error("caffe2", "a Caffe2 .pkl stores no strides or pools")
    if variant not in LAYOUT_VARIANTS["caffe2"]:
        raise ValueError(
            f"variant={variant!r} is not a layout of Caffe2 weights; expected one of "
            f"{LAYOUT_VARIANTS['caffe2']}"
        )
    conv.model_kwargs["variant"] = variant
    frozen = "stem.bn.weight" in state and "stem.bn.running_mean" not in state
    if frozen:
        conv.model_kwargs["freeze_bn"] = True
        conv.notes.append(
            "frozen-BN ('affine') model: no BN statistics in the file (freeze_bn=True)"
        )
    if has_nonlocal(state):
        conv.model_kwargs["norm"] = "batch" if nonlocal_has_bn(state) else None
        if frozen and any(k.startswith("res3.nonlocal") for k in state):
            conv.model_kwargs["temporal_groups"] = {3: 4}
            conv.notes.append(
                "affine NL model: the original code attends within groups of 4 frames in res3 "
                "(temporal_groups={3: 4}); res4 blocks are full spacetime"
            )
        _nl_note(conv)
    conv.notes.append("the head's softmax (val/test) is not part of the model: it returns logits")
    return conv


def convert_slowfast(source: Source, *, variant: str | None = None) -> Conversion:
    """A PySlowFast ``.pyth`` (``model_state``) of C2D / I3D / I3D-NLN ResNets → our layout.

    ``variant``: ``slowfast`` (archs c2d, i3d, slow: a 2×1×1 pool after res2) or
    ``slowfast_nopool`` (c2d_nopool, i3d_nopool). Read from the ``cfg`` the checkpoint stores
    (``MODEL.ARCH``) when it has one; otherwise required (the weights are the same).
    """
    checkpoint, _, conv = _read(source, "slowfast")
    found = slowfast_config(checkpoint)
    if variant is None:
        if "variant" not in found:
            raise _variant_error("slowfast", "the checkpoint has no cfg naming MODEL.ARCH")
        variant = found["variant"]
        conv.notes.append(f"variant={variant!r} from the checkpoint's cfg (MODEL.ARCH)")
    elif "variant" in found and found["variant"] != variant:
        raise WeightsMismatchError(
            f"variant={variant!r} contradicts the checkpoint's cfg (MODEL.ARCH gives "
            f"{found['variant']!r})",
            [("variant", (found["variant"],), variant)],
        )
    if variant not in LAYOUT_VARIANTS["slowfast"]:
        raise ValueError(
            f"variant={variant!r}: PySlowFast weights have variant 'slowfast' or 'slowfast_nopool'"
        )
    conv.model_kwargs["variant"] = variant
    conv.notes.append(
        f"variant={variant!r}: conv1 temporal stride 1, pool1 1x3x3 stride 1x2x2 padded, "
        + ("2x1x1 pool after res2" if variant == "slowfast" else "no pool after res2 (nopool)")
    )
    if has_nonlocal(conv.state_dict):
        conv.model_kwargs["norm"] = "batch" if nonlocal_has_bn(conv.state_dict) else None
        if found.get("pairwise", "embedded_gaussian") != "embedded_gaussian":
            conv.model_kwargs["pairwise"] = found["pairwise"]
        _nl_note(conv)
    conv.notes.append("PySlowFast's head applies a softmax in eval mode; our model returns logits")
    return conv


def convert_mmaction2(
    source: Source, *, pairwise: str | None = None, scale: float | None = 1.0
) -> Conversion:
    """An mmaction2 ResNet3d (I3D, optionally with mmcv NonLocal3d blocks) ``.pth`` → our layout.

    ``pairwise``: ``gaussian`` is detected (mmcv's Gaussian mode has no θ/φ convs); the weights
    cannot tell ``embedded_gaussian`` from ``dot_product``, so for those it is required (the
    config's ``mode``). ``scale``: mmaction2's I3D NL configs set ``use_scale=False`` (1.0, the
    default here); ``None`` means ``use_scale=True`` (dim_inner^-1/2). Sub-sampling and the
    conv_out BN are read from the keys.
    """
    _, raw, conv = _read(source, "mmaction2")
    state = conv.state_dict
    conv.model_kwargs["variant"] = "mmaction2"
    if has_nonlocal(state):
        gaussian = not any(".non_local_block.theta." in k for k in raw)
        if gaussian:
            if pairwise not in (None, "gaussian"):
                raise WeightsMismatchError(
                    f"pairwise={pairwise!r}, but the NL blocks have no theta/phi convs: they are "
                    "mmcv's 'gaussian' mode (pass pairwise='gaussian' or nothing)",
                    [("pairwise", ("gaussian",), pairwise)],
                )
            pairwise = "gaussian"
        elif pairwise is None:
            raise ValueError(
                "the mmaction2 NL weights do not tell their pairwise function (embedded_gaussian "
                "and dot_product have the same convs): pass pairwise=... in Python or --pairwise "
                "{embedded_gaussian,dot_product} to nlnet convert (the config's non_local_cfg "
                "mode; 'nl-dot-product' / 'nl-embedded-gaussian' in the released file names)"
            )
        subsampled = any(".non_local_block.g.0." in k for k in raw)
        conv.model_kwargs.update(pairwise=pairwise, pool_before_conv=False)
        if not subsampled:
            conv.model_kwargs["subsample"] = False
        if pairwise != "dot_product":
            conv.model_kwargs["scale"] = scale
        conv.model_kwargs["norm"] = "batch" if nonlocal_has_bn(state) else None
        for k in [k for k in state if k.endswith(".out.weight") and ".nonlocal" in k]:
            bias = k[: -len("weight")] + "bias"
            if bias not in state:  # mmcv's conv_out has no bias when a norm follows it
                state[bias] = torch.zeros(state[k].shape[0], dtype=state[k].dtype)
        conv.notes.append(
            "NL blocks: mmcv pools AFTER the phi/g convs (pool_before_conv=False); "
            f"pairwise={pairwise!r}, scale={scale!r} (mmaction2's I3D NL configs: use_scale=False "
            "-> scale=1.0); conv_out has no bias (ours set to 0)"
        )
    conv.notes.append("variant='mmaction2': pool1 1x3x3 stride 2x2x2 padded, 2x1x1 pool after res2")
    return conv


CONVERTERS: dict[str, Callable[..., Conversion]] = {
    "caffe2": convert_caffe2,
    "slowfast": convert_slowfast,
    "mmaction2": convert_mmaction2,
}


def convert_checkpoint(
    fmt: str,
    src: Source,
    dst: str | os.PathLike[str] | None,
    arch: str | None = None,
    *,
    classes: list[str] | tuple[str, ...] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    source: str | None = None,
    **options: Any,
) -> tuple[Conversion, Any, Any]:
    """Convert ``src``, check it fills ``create_model(arch, **settings)`` exactly, write ``dst``.

    ``fmt``: ``caffe2``, ``slowfast``, ``mmaction2`` or ``auto`` (from the keys). ``arch``:
    the registered model name; by default inferred from the weights (:func:`infer_arch`).
    ``options``: the converter's (``variant``, ``pairwise``, ``scale``). Any missing,
    unexpected or mismatched key raises ``ValueError`` naming them. ``dst`` gets the
    self-describing file of ``docs/models.md`` (written atomically). Returns the conversion,
    the load report and the loaded model.
    """
    checkpoint = read_checkpoint(src)
    if fmt == "auto":
        fmt = detect_format(unwrap_state_dict(checkpoint))
        if fmt not in CONVERTERS:
            raise CheckpointFormatError(
                f"cannot tell the layout of {src if not isinstance(src, Mapping) else 'the dict'}"
                f" (detected {fmt!r}); pass --from one of {FORMATS}"
            )
    if fmt not in CONVERTERS:
        raise ValueError(f"unknown source format {fmt!r}; expected one of {FORMATS} or 'auto'")
    conv = CONVERTERS[fmt](checkpoint, **options)
    if conv.num_classes is None:
        raise ValueError("the checkpoint has no classifier weights (head)")
    if arch is None:
        if conv.arch is None:
            raise ValueError("cannot infer the arch from the weights: pass arch= (--arch)")
        arch = conv.arch
        conv.model_kwargs.update(conv.placement)
    elif conv.arch is not None and conv.arch != arch and not conv.placement:
        conv.notes.append(f"arch {arch!r} given; the weights look like {conv.arch!r}")
    model = get_model_builder(arch)(num_classes=conv.num_classes, **conv.model_kwargs)
    report = load_weights(model, conv.state_dict, check_settings=False)
    if not report.complete or report.inflated:
        raise ValueError(
            f"the {fmt} checkpoint does not match {arch} with {conv.model_kwargs}:\n{report}"
        )
    classes = None if classes is None else [str(c) for c in classes]
    if source is None and not isinstance(src, Mapping):
        source = os.path.basename(os.fspath(src))
    if dst is not None:
        save_weights(
            weights_file(
                model.state_dict(),
                arch=arch,
                model_kwargs=conv.model_kwargs,
                num_classes=conv.num_classes,
                classes=classes,
                preprocessing=preprocessing,
                converted_from=fmt,
                source=source,
                notes=conv.notes,
            ),
            dst,
        )
    model.pretrained_cfg = {  # type: ignore[assignment]
        "arch": arch,
        "model_kwargs": dict(conv.model_kwargs),
        "num_classes": conv.num_classes,
        "classes": classes,
        "preprocessing": None if preprocessing is None else dict(preprocessing),
        "source": source,
    }
    conv.arch = arch
    return conv, report, model
