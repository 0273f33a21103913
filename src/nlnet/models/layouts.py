"""Foreign checkpoint layouts: recognising them and renaming their keys to nlnet's.

Recognised layouts (``checkpoint-formats.md`` in the reference material):

* ``caffe2``: the original release (video-nonlocal-net) — ``conv1_w``, ``res{s}_{i}_branch2{a,b,c}_w``,
  ``..._bn_{s,b,rm,riv}`` (``_rm``/``_riv`` absent in the frozen-BN "affine" models),
  ``nonlocal_conv{s}_{i}_{theta,phi,g,out}_{w,b}``, ``nonlocal_conv{s}_{i}_bn_*``, ``pred_{w,b}``.
  Also its 2D ImageNet ResNets (4-D kernels, inflated on load) and PySlowFast's Caffe2-format
  ``.pkl`` files (same names).
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

:func:`implied_settings` says which model settings a layout implies by itself (e.g. a PySlowFast
dict needs ``variant='slowfast'`` or ``'slowfast_nopool'``); loading checks them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from nlnet.models.io import to_tensor

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


# -- what a layout implies about the model ------------------------------------------------------
#: The temporal layouts each foreign source can have been trained with (``variant=``).
LAYOUT_VARIANTS: dict[str, tuple[str, ...]] = {
    # The release's 32×2 / 128×1 ("original") and 8×8 / 32×4 ("speed") models; PySlowFast's
    # Caffe2-format .pkl files use its own layouts.
    "caffe2": ("original", "speed", "slowfast", "slowfast_nopool"),
    "slowfast": ("slowfast", "slowfast_nopool"),
    "mmaction2": ("mmaction2",),
}
#: PySlowFast ``MODEL.ARCH`` → our variant.
SLOWFAST_ARCH_VARIANT = {
    "c2d": "slowfast",
    "i3d": "slowfast",
    "slow": "slowfast",
    "c2d_nopool": "slowfast_nopool",
    "i3d_nopool": "slowfast_nopool",
}


def has_nonlocal(state: Mapping[str, Any]) -> bool:
    """Does a state dict in our names hold non-local blocks?"""
    return any(re.match(r"res\d+\.nonlocal\d+\.", k) for k in state)


def nonlocal_has_bn(state: Mapping[str, Any]) -> bool:
    return any(re.match(r"res\d+\.nonlocal\d+\.bn\.", k) for k in state)


def slowfast_config(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Settings read from the ``cfg`` YAML string PySlowFast stores in its ``.pyth`` files:
    ``variant`` (from ``MODEL.ARCH``) and ``pairwise`` (from ``NONLOCAL.INSTANTIATION``)."""
    import yaml

    text = obj.get("cfg")
    if not isinstance(text, str):
        return {}
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    out: dict[str, Any] = {}
    if not isinstance(cfg, dict):
        return out
    arch = str((cfg.get("MODEL") or {}).get("ARCH", "")).lower()
    if arch in SLOWFAST_ARCH_VARIANT:
        out["variant"] = SLOWFAST_ARCH_VARIANT[arch]
    inst = (cfg.get("NONLOCAL") or {}).get("INSTANTIATION")
    if inst in ("softmax", "dot_product"):
        out["pairwise"] = "embedded_gaussian" if inst == "softmax" else "dot_product"
    return out


def implied_settings(
    fmt: str, raw: Mapping[str, Any], state: Mapping[str, Any], checkpoint: Mapping[str, Any]
) -> dict[str, tuple[Any, ...]]:
    """The model settings a foreign layout implies: ``{setting: allowed values}``.

    ``raw``: the source's own names; ``state``: renamed to ours; ``checkpoint``: the whole file
    (PySlowFast's ``cfg`` string). Only what the file itself proves is listed: e.g. a PySlowFast
    dict cannot tell ``c2d`` from ``c2d_nopool``, so both variants are allowed unless its ``cfg``
    names the arch.
    """
    out: dict[str, tuple[Any, ...]] = {}
    if fmt not in LAYOUT_VARIANTS:
        return out
    out["variant"] = LAYOUT_VARIANTS[fmt]
    nl = has_nonlocal(state)
    if nl:
        out["norm"] = ("batch",) if nonlocal_has_bn(state) else (None,)
    if fmt in ("caffe2", "slowfast") and nl:
        out["pool_before_conv"] = (True,)
        out["subsample"] = (True,)
    if fmt == "slowfast":
        for k, v in slowfast_config(checkpoint).items():
            if k == "variant" or nl:
                out[k] = (v,)
    if fmt == "mmaction2" and nl:
        out["pool_before_conv"] = (False,)
        out["subsample"] = (any(".non_local_block.g.0." in k for k in raw),)
        if not any(".non_local_block.theta." in k for k in raw):
            out["pairwise"] = ("gaussian",)
        else:
            out["pairwise"] = ("embedded_gaussian", "dot_product")
    return out
