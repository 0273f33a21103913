"""Converters from other projects' checkpoints to nlnet's layout, and ``nlnet convert``.

Recognised layouts (``checkpoint-formats.md`` in the reference material):

* ``caffe2``: the original release (video-nonlocal-net) — ``conv1_w``, ``res{s}_{i}_branch2{a,b,c}_w``,
  ``..._bn_{s,b,rm,riv}`` (``_rm``/``_riv`` absent in the frozen-BN "affine" models),
  ``nonlocal_conv{s}_{i}_{theta,phi,g,out}_{w,b}``, ``nonlocal_conv{s}_{i}_bn_*``, ``pred_{w,b}``.
  Also its 2D ImageNet ResNets (4-D kernels, inflated on load).
* ``slowfast``: PySlowFast ``.pyth`` — ``s1.pathway0_stem.{conv,bn}``,
  ``s{s}.pathway0_res{i}.branch1/branch2.{a,b,c}`` (+ ``_bn``),
  ``s{s}.pathway0_nonlocal{i}.conv_{theta,phi,g,out}`` / ``.bn``, ``head.projection``.
* ``mmaction2``: ``backbone.conv1.{conv,bn}``, ``backbone.layer{k}.{i}.conv{1,2,3}.{conv,bn}``,
  ``...downsample.{conv,bn}``, ``...non_local_block.{theta,phi(.0),g(.0),conv_out}.{conv,bn}``
  (mmcv's NonLocal3d; ``.0`` when it sub-samples), ``cls_head.fc_cls``.
* ``torchvision``: a 2D ResNet (``conv1``, ``bn1``, ``layer{k}.{i}.conv{1,2,3}``, ``downsample.{0,1}``,
  ``fc``), inflated on load (§4).

Every source key is either mapped, listed as ignored (iteration counters, momentum buffers,
shape blobs) or kept under its own name so that loading reports it as unexpected.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nlnet.models.weights import UnsafeCheckpointError, read_state_dict, to_tensor

FORMATS: tuple[str, ...] = ("caffe2", "slowfast", "mmaction2")
_BN = {"s": "weight", "b": "bias", "rm": "running_mean", "riv": "running_var"}

_CAFFE2_RULES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(r"conv1_w"), lambda m: "stem.conv.weight"),
    (re.compile(r"res_conv1_bn_(s|b|rm|riv)"), lambda m: f"stem.bn.{_BN[m[1]]}"),
    (
        re.compile(r"res(\d)_(\d+)_branch2([abc])_w"),
        lambda m: f"res{m[1]}.{m[2]}.conv_{m[3]}.weight",
    ),
    (
        re.compile(r"res(\d)_(\d+)_branch2([abc])_bn_(s|b|rm|riv)"),
        lambda m: f"res{m[1]}.{m[2]}.bn_{m[3]}.{_BN[m[4]]}",
    ),
    (re.compile(r"res(\d)_(\d+)_branch1_w"), lambda m: f"res{m[1]}.{m[2]}.shortcut_conv.weight"),
    (
        re.compile(r"res(\d)_(\d+)_branch1_bn_(s|b|rm|riv)"),
        lambda m: f"res{m[1]}.{m[2]}.shortcut_bn.{_BN[m[3]]}",
    ),
    (
        re.compile(r"nonlocal_conv(\d)_(\d+)_(theta|phi|g|out)_([wb])"),
        lambda m: f"res{m[1]}.nonlocal{m[2]}.{m[3]}.{'weight' if m[4] == 'w' else 'bias'}",
    ),
    (
        re.compile(r"nonlocal_conv(\d)_(\d+)_bn_(s|b|rm|riv)"),
        lambda m: f"res{m[1]}.nonlocal{m[2]}.bn.{_BN[m[3]]}",
    ),
    (re.compile(r"pred_([wb])"), lambda m: f"head.fc.{'weight' if m[1] == 'w' else 'bias'}"),
]

_PT_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"

_SLOWFAST_RULES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(r"s1\.pathway0_stem\.conv\.weight"), lambda m: "stem.conv.weight"),
    (re.compile(rf"s1\.pathway0_stem\.bn\.{_PT_BN}"), lambda m: f"stem.bn.{m[1]}"),
    (
        re.compile(r"s(\d)\.pathway0_res(\d+)\.branch1\.weight"),
        lambda m: f"res{m[1]}.{m[2]}.shortcut_conv.weight",
    ),
    (
        re.compile(rf"s(\d)\.pathway0_res(\d+)\.branch1_bn\.{_PT_BN}"),
        lambda m: f"res{m[1]}.{m[2]}.shortcut_bn.{m[3]}",
    ),
    (
        re.compile(r"s(\d)\.pathway0_res(\d+)\.branch2\.([abc])\.weight"),
        lambda m: f"res{m[1]}.{m[2]}.conv_{m[3]}.weight",
    ),
    (
        re.compile(rf"s(\d)\.pathway0_res(\d+)\.branch2\.([abc])_bn\.{_PT_BN}"),
        lambda m: f"res{m[1]}.{m[2]}.bn_{m[3]}.{m[4]}",
    ),
    (
        re.compile(r"s(\d)\.pathway0_nonlocal(\d+)\.conv_(theta|phi|g|out)\.(weight|bias)"),
        lambda m: f"res{m[1]}.nonlocal{m[2]}.{m[3]}.{m[4]}",
    ),
    (
        re.compile(rf"s(\d)\.pathway0_nonlocal(\d+)\.bn\.{_PT_BN}"),
        lambda m: f"res{m[1]}.nonlocal{m[2]}.bn.{m[3]}",
    ),
    (re.compile(r"head\.projection\.(weight|bias)"), lambda m: f"head.fc.{m[1]}"),
]

_ABC = {"1": "a", "2": "b", "3": "c"}

_MMACTION2_RULES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(r"conv1\.conv\.weight"), lambda m: "stem.conv.weight"),
    (re.compile(rf"conv1\.bn\.{_PT_BN}"), lambda m: f"stem.bn.{m[1]}"),
    (
        re.compile(r"layer(\d)\.(\d+)\.conv([123])\.conv\.weight"),
        lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv_{_ABC[m[3]]}.weight",
    ),
    (
        re.compile(rf"layer(\d)\.(\d+)\.conv([123])\.bn\.{_PT_BN}"),
        lambda m: f"res{int(m[1]) + 1}.{m[2]}.bn_{_ABC[m[3]]}.{m[4]}",
    ),
    (
        re.compile(r"layer(\d)\.(\d+)\.downsample\.conv\.weight"),
        lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut_conv.weight",
    ),
    (
        re.compile(rf"layer(\d)\.(\d+)\.downsample\.bn\.{_PT_BN}"),
        lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut_bn.{m[3]}",
    ),
    (
        re.compile(
            r"layer(\d)\.(\d+)\.non_local_block\.(theta|phi|g)(?:\.0)?\.conv\.(weight|bias)"
        ),
        lambda m: f"res{int(m[1]) + 1}.nonlocal{m[2]}.{m[3]}.{m[4]}",
    ),
    (
        re.compile(r"layer(\d)\.(\d+)\.non_local_block\.conv_out\.conv\.(weight|bias)"),
        lambda m: f"res{int(m[1]) + 1}.nonlocal{m[2]}.out.{m[3]}",
    ),
    (
        re.compile(rf"layer(\d)\.(\d+)\.non_local_block\.conv_out\.bn\.{_PT_BN}"),
        lambda m: f"res{int(m[1]) + 1}.nonlocal{m[2]}.bn.{m[3]}",
    ),
    (re.compile(r"fc_cls\.(weight|bias)"), lambda m: f"head.fc.{m[1]}"),
]

_TORCHVISION_RULES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(r"conv1\.weight"), lambda m: "stem.conv.weight"),
    (re.compile(rf"bn1\.{_PT_BN}"), lambda m: f"stem.bn.{m[1]}"),
    (
        re.compile(r"layer(\d)\.(\d+)\.conv([123])\.weight"),
        lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv_{_ABC[m[3]]}.weight",
    ),
    (
        re.compile(rf"layer(\d)\.(\d+)\.bn([123])\.{_PT_BN}"),
        lambda m: f"res{int(m[1]) + 1}.{m[2]}.bn_{_ABC[m[3]]}.{m[4]}",
    ),
    (
        re.compile(r"layer(\d)\.(\d+)\.downsample\.0\.weight"),
        lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut_conv.weight",
    ),
    (
        re.compile(rf"layer(\d)\.(\d+)\.downsample\.1\.{_PT_BN}"),
        lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut_bn.{m[3]}",
    ),
    (re.compile(r"fc\.(weight|bias)"), lambda m: f"head.fc.{m[1]}"),
]

_RULES = {
    "caffe2": _CAFFE2_RULES,
    "slowfast": _SLOWFAST_RULES,
    "mmaction2": _MMACTION2_RULES,
    "torchvision": _TORCHVISION_RULES,
}


def detect_format(keys: Mapping[str, Any]) -> str:
    """``nlnet``, ``caffe2``, ``slowfast``, ``mmaction2``, ``torchvision`` or ``unknown``."""
    names = set(keys)
    if "stem.conv.weight" in names:
        return "nlnet"
    if "conv1_w" in names or "res_conv1_bn_s" in names:
        return "caffe2"
    if any(k.startswith("s1.pathway0_stem.") for k in names):
        return "slowfast"
    if "backbone.conv1.conv.weight" in names or "conv1.conv.weight" in names:
        return "mmaction2"
    if "conv1.weight" in names and "layer1.0.conv1.weight" in names:
        return "torchvision"
    return "unknown"


def _is_ignored(fmt: str, name: str, value: Any) -> bool:
    if fmt == "caffe2":
        if name in ("model_iter", "lr") or name.endswith("_momentum"):
            return True
        # Shape blobs of the in-place reshapes and other non-float bookkeeping.
        return not hasattr(value, "dtype") or not str(value.dtype).startswith(
            ("float", "torch.float")
        )
    return False


def to_nlnet_names(raw: Mapping[str, Any]) -> tuple[dict[str, Tensor], str, list[str]]:
    """Rename a raw state dict of any recognised layout to ours.

    Returns (state dict, detected format, ignored names).  Unrecognised keys keep their names
    (so :func:`~nlnet.models.load_weights` reports them as unexpected).
    """
    fmt = detect_format(raw)
    out: dict[str, Tensor] = {}
    ignored: list[str] = []
    rules = _RULES.get(fmt)
    for key, value in raw.items():
        name = key
        if fmt == "mmaction2":
            name = re.sub(r"^(backbone|cls_head)\.", "", name)
        if _is_ignored(fmt, key, value):
            ignored.append(key)
            continue
        if not hasattr(value, "shape"):
            ignored.append(key)
            continue
        tensor = to_tensor(value, key)
        if rules is not None:
            for pattern, rename in rules:
                m = pattern.fullmatch(name)
                if m:
                    name = rename(m)
                    break
        if name == "head.fc.weight" and tensor.dim() > 2:  # Caffe2's test-time 1×1×1 conv
            tensor = tensor.flatten(1)
        if name in out:
            raise ValueError(f"two checkpoint entries map to {name!r} (second: {key!r})")
        out[name] = tensor
    return out, fmt, sorted(ignored)


@dataclass
class Conversion:
    """A converted checkpoint: our state dict plus the model settings it needs."""

    state_dict: dict[str, Tensor]
    source_format: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int | None:
        w = self.state_dict.get("head.fc.weight")
        return None if w is None else int(w.shape[0])


_OURS = re.compile(r"(stem|head|res\d+)\.|^res\d+\.\d+\.|^res\d+\.nonlocal\d+\.")


def _finish(state: dict[str, Tensor], fmt: str, ignored: list[str], expected: str) -> Conversion:
    if fmt != expected:
        raise ValueError(f"this checkpoint looks like the {fmt!r} layout, not {expected!r}")
    unmapped = sorted(k for k in state if not _OURS.match(k))
    return Conversion(state, fmt, ignored=ignored, unmapped=unmapped)


def _has_nonlocal(state: Mapping[str, Tensor]) -> bool:
    return any(".nonlocal" in k for k in state)


def convert_caffe2(
    source: str | os.PathLike[str] | Mapping[str, Any], *, variant: str | None = None
) -> Conversion:
    """The original release's ``.pkl`` (reference §5.5) → our layout.

    ``variant``: the temporal layout the weights were trained with; by default ``speed`` when the
    file name says 8×8 or 32×4 (the release's speed models), else ``original``.
    """
    raw = read_state_dict(source)
    state, fmt, ignored = to_nlnet_names(raw)
    conv = _finish(state, fmt, ignored, "caffe2")
    name = "" if isinstance(source, Mapping) else os.path.basename(os.fspath(source))
    if variant is None:
        variant = "speed" if re.search(r"8x8|32x4", name) else "original"
        conv.notes.append(
            f"variant={variant!r} (from the file name {name!r}: 8x8/32x4 are the release's speed "
            "models); pass --variant to override"
        )
    conv.model_kwargs["variant"] = variant
    frozen = "stem.bn.weight" in state and "stem.bn.running_mean" not in state
    if frozen:
        conv.model_kwargs["freeze_bn"] = True
        conv.notes.append("frozen-BN ('affine') model: build it with freeze_bn=True")
    if _has_nonlocal(state):
        nl_bn = any(re.match(r"res\d+\.nonlocal\d+\.bn\.", k) for k in state)
        conv.model_kwargs["norm"] = "batch" if nl_bn else None
        if frozen and any(k.startswith("res3.nonlocal") for k in state):
            conv.model_kwargs["temporal_groups"] = {3: 4}
            conv.notes.append(
                "affine NL model: the original code attends within groups of 4 frames in res3 "
                "(temporal_groups={3: 4}); res4 blocks are full spacetime"
            )
        conv.notes.append(
            "NL blocks: pool x before phi/g (pool_before_conv=True), softmax scale dim_inner^-1/2 "
            "(the defaults)"
        )
    conv.notes.append("the head's softmax (val/test) is not part of the model: it returns logits")
    return conv


def convert_slowfast(source: str | os.PathLike[str] | Mapping[str, Any]) -> Conversion:
    """A PySlowFast ``.pyth`` (``model_state``) of C2D / I3D / I3D-NLN ResNets → our layout."""
    raw = read_state_dict(source)
    state, fmt, ignored = to_nlnet_names(raw)
    conv = _finish(state, fmt, ignored, "slowfast")
    conv.model_kwargs["variant"] = "slowfast"
    conv.notes.append(
        "variant='slowfast': conv1 temporal stride 1, pool1 1x3x3 stride 1x2x2 padded, 2x1x1 "
        "pool after res2 (PySlowFast's 8x8 models)"
    )
    if _has_nonlocal(state):
        conv.notes.append(
            "NL blocks: pool x before phi/g (pool_before_conv=True), softmax scale dim_inner^-1/2 "
            "(the defaults)"
        )
    conv.notes.append("PySlowFast's head applies a softmax in eval mode; our model returns logits")
    return conv


def convert_mmaction2(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    pairwise: str = "embedded_gaussian",
    scale: float | None = 1.0,
) -> Conversion:
    """An mmaction2 ResNet3d (I3D, optionally with mmcv NonLocal3d blocks) ``.pth`` → our layout.

    The weights cannot tell the pairwise function or mmcv's ``use_scale``: its I3D non-local
    configs use ``embedded_gaussian`` with ``use_scale=False`` (``scale=1.0``, the default here)
    or ``dot_product``; pass the config's values.  ``scale=None`` means use_scale=True.
    """
    raw = read_state_dict(source)
    state, fmt, ignored = to_nlnet_names(raw)
    conv = _finish(state, fmt, ignored, "mmaction2")
    conv.model_kwargs["variant"] = "mmaction2"
    if _has_nonlocal(state):
        subsampled = any(".non_local_block.g.0." in k for k in raw)
        conv.model_kwargs.update(pairwise=pairwise, pool_before_conv=False)
        if not subsampled:
            conv.model_kwargs["subsample"] = False
        if pairwise == "embedded_gaussian":
            conv.model_kwargs["scale"] = scale
        has_bn = any(re.match(r"res\d+\.nonlocal\d+\.bn\.", k) for k in state)
        conv.model_kwargs["norm"] = "batch" if has_bn else None
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


def save_checkpoint(obj: Mapping[str, Any], dst: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace`` (atomic)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    try:
        torch.save(dict(obj), tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def convert_checkpoint(
    fmt: str,
    src: str | os.PathLike[str] | Mapping[str, Any],
    dst: str | os.PathLike[str] | None,
    arch: str,
    *,
    classes: list[str] | tuple[str, ...] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    source: str | None = None,
    **options: Any,
) -> tuple[Conversion, Any, Any]:
    """Convert ``src`` and check it against ``create_model(arch, **settings)``; write ``dst``.

    The checkpoint must fill the model exactly: any missing, unexpected or mismatched key raises
    ``ValueError`` naming them (nothing is silently dropped).  The file is the self-describing
    nlnet weight file: ``{"format": "nlnet", "format_version": 1, "model", "arch",
    "model_kwargs", "num_classes", "classes", "preprocessing", "converted_from", "source",
    "notes"}``; ``classes`` (label names in output order) must have ``num_classes`` entries.
    Returns the conversion, the load report and the loaded model.
    """
    from nlnet.models import create_model, load_weights

    if fmt not in CONVERTERS:
        raise ValueError(f"unknown source format {fmt!r}; expected one of {FORMATS}")
    conv = CONVERTERS[fmt](src, **options)
    if conv.num_classes is None:
        raise ValueError("the checkpoint has no classifier weights (head)")
    model = create_model(arch, num_classes=conv.num_classes, **conv.model_kwargs)
    report = load_weights(model, conv.state_dict)
    if not report.complete or report.inflated:
        raise ValueError(
            f"the {fmt} checkpoint does not match {arch} with {conv.model_kwargs}:\n{report}"
        )
    if classes is not None and len(classes) != conv.num_classes:
        raise ValueError(
            f"{len(classes)} class names given for a checkpoint with {conv.num_classes} classes"
        )
    if dst is not None:
        save_checkpoint(
            {
                "format": "nlnet",
                "format_version": 1,
                "model": model.state_dict(),
                "arch": arch,
                "num_classes": conv.num_classes,
                "model_kwargs": conv.model_kwargs,
                "classes": None if classes is None else [str(c) for c in classes],
                "preprocessing": None if preprocessing is None else dict(preprocessing),
                "converted_from": fmt,
                "source": source,
                "notes": conv.notes,
            },
            dst,
        )
    return conv, report, model


# -- the ``nlnet convert`` command ------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="fmt", choices=FORMATS, required=True, help="source layout")
    parser.add_argument("src", help="source checkpoint (path or URL)")
    parser.add_argument("dst", help="output file (nlnet layout, torch.save)")
    parser.add_argument("--arch", required=True, help="nlnet model name, e.g. i3d_r50_nl5")
    parser.add_argument(
        "--variant", default=None, help="caffe2 only: temporal layout (original/speed)"
    )
    parser.add_argument(
        "--pairwise",
        default="embedded_gaussian",
        help="mmaction2 only: the config's NL mode (embedded_gaussian or dot_product)",
    )
    parser.add_argument(
        "--use-scale",
        action="store_true",
        help="mmaction2 only: the config sets use_scale=True (scale dim_inner^-1/2)",
    )


def run(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {}
    if args.fmt == "caffe2":
        options["variant"] = args.variant
    elif args.fmt == "mmaction2":
        options["pairwise"] = args.pairwise
        options["scale"] = None if args.use_scale else 1.0
    try:
        conv, report, _ = convert_checkpoint(args.fmt, args.src, args.dst, args.arch, **options)
    except (ValueError, TypeError, FileNotFoundError, UnsafeCheckpointError) as err:
        print(f"nlnet convert: error: {err}")
        return 1
    print(f"wrote {args.dst}: {args.arch}, {conv.num_classes} classes, {report}")
    print(
        "build it with: create_model("
        + repr(args.arch)
        + f", num_classes={conv.num_classes}"
        + "".join(f", {k}={v!r}" for k, v in conv.model_kwargs.items())
        + ")"
    )
    for note in conv.notes:
        print(f"note: {note}")
    return 0
