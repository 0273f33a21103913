"""Foreign checkpoints written from nlnet's own models, for the converter / loader / registry tests.

Each writer maps nlnet's parameter names to one project's documented names and shapes
(``checkpoint-formats.md`` of the reference material): the original Caffe2 release, PySlowFast and
mmaction2 (mmcv's NonLocal3d).  Converting the result back must give the source model's logits.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from nlnet.models.resnet import VideoResNet


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(7)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith(("running_mean", ".bias")):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            elif t.dim() == 1:  # BN γ; small in NL blocks (the dot-product form is cubic in x)
                scale = 0.05 if ".nonlocal" in name else 0.5
                t.copy_(torch.rand(t.shape, generator=gen) * scale + scale)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * (1.0 / t[0].numel()) ** 0.5)
    return model.eval()


def _units(model: VideoResNet):
    """(stage number, child name, module) for every residual and NL block, in order."""
    for s, stage in enumerate(model.stages()):
        for name, child in stage.named_children():
            yield s + 2, name, child


# -- writers: our model → each source layout, from the documented names ------------------------
def to_caffe2(model: VideoResNet) -> dict[str, np.ndarray]:
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    frozen = model.freeze_bn
    blobs: dict[str, np.ndarray] = {}

    def bn(c2: str, ours: str, with_stats: bool) -> None:
        blobs[f"{c2}_bn_s"], blobs[f"{c2}_bn_b"] = sd[f"{ours}.weight"], sd[f"{ours}.bias"]
        if with_stats:
            blobs[f"{c2}_bn_rm"] = sd[f"{ours}.running_mean"]
            blobs[f"{c2}_bn_riv"] = sd[f"{ours}.running_var"]

    blobs["conv1_w"] = sd["stem.conv.weight"]
    bn("res_conv1", "stem.bn", not frozen)
    for s, name, unit in _units(model):
        if name.isdigit():
            ours, c2 = f"res{s}.{name}", f"res{s}_{name}"
            for x in "abc":
                blobs[f"{c2}_branch2{x}_w"] = sd[f"{ours}.conv_{x}.weight"]
                bn(f"{c2}_branch2{x}", f"{ours}.bn_{x}", not frozen)
            if unit.shortcut_conv is not None:
                blobs[f"{c2}_branch1_w"] = sd[f"{ours}.shortcut_conv.weight"]
                bn(f"{c2}_branch1", f"{ours}.shortcut_bn", not frozen)
        else:
            ours, c2 = f"res{s}.{name}", f"nonlocal_conv{s}_{name[len('nonlocal') :]}"
            for x in ("theta", "phi", "g", "out"):
                blobs[f"{c2}_{x}_w"] = sd[f"{ours}.{x}.weight"]
                blobs[f"{c2}_{x}_b"] = sd[f"{ours}.{x}.bias"]
            if unit.norm == "batch":
                bn(c2, f"{ours}.bn", True)
    blobs["pred_w"], blobs["pred_b"] = sd["head.fc.weight"], sd["head.fc.bias"]
    # Non-weights the release also holds: the iteration, the LR, momentum buffers, shape blobs.
    blobs["model_iter"] = np.array(400000)
    blobs["lr"] = np.array(0.0001, dtype=np.float32)
    blobs["pred_w_momentum"] = np.zeros_like(blobs["pred_w"])
    blobs["nonlocal_conv4_1_theta_shape5d"] = np.array([8, 512, 4, 14, 14], dtype=np.int64)
    return blobs


def to_slowfast(model: VideoResNet) -> dict[str, Tensor]:
    sd = model.state_dict()
    out: dict[str, Tensor] = {}
    bn_keys = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def bn(src: str, dst: str) -> None:
        out.update({f"{dst}.{k}": sd[f"{src}.{k}"] for k in bn_keys})

    out["s1.pathway0_stem.conv.weight"] = sd["stem.conv.weight"]
    bn("stem.bn", "s1.pathway0_stem.bn")
    for s, name, unit in _units(model):
        if name.isdigit():
            ours, sf = f"res{s}.{name}", f"s{s}.pathway0_res{name}"
            for x in "abc":
                out[f"{sf}.branch2.{x}.weight"] = sd[f"{ours}.conv_{x}.weight"]
                bn(f"{ours}.bn_{x}", f"{sf}.branch2.{x}_bn")
            if unit.shortcut_conv is not None:
                out[f"{sf}.branch1.weight"] = sd[f"{ours}.shortcut_conv.weight"]
                bn(f"{ours}.shortcut_bn", f"{sf}.branch1_bn")
        else:
            ours, sf = f"res{s}.{name}", f"s{s}.pathway0_{name}"
            for x in ("theta", "phi", "g", "out"):
                for p in ("weight", "bias"):
                    out[f"{sf}.conv_{x}.{p}"] = sd[f"{ours}.{x}.{p}"]
            bn(f"{ours}.bn", f"{sf}.bn")
    out["head.projection.weight"], out["head.projection.bias"] = (
        sd["head.fc.weight"],
        sd["head.fc.bias"],
    )
    return out


def to_mmaction2(model: VideoResNet) -> dict[str, Tensor]:
    sd = model.state_dict()
    out: dict[str, Tensor] = {}
    bn_keys = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def bn(src: str, dst: str) -> None:
        out.update({f"backbone.{dst}.{k}": sd[f"{src}.{k}"] for k in bn_keys})

    out["backbone.conv1.conv.weight"] = sd["stem.conv.weight"]
    bn("stem.bn", "conv1.bn")
    for s, name, unit in _units(model):
        layer = f"layer{s - 1}"
        if name.isdigit():
            ours, mm = f"res{s}.{name}", f"{layer}.{name}"
            for j, x in zip("123", "abc"):
                out[f"backbone.{mm}.conv{j}.conv.weight"] = sd[f"{ours}.conv_{x}.weight"]
                bn(f"{ours}.bn_{x}", f"{mm}.conv{j}.bn")
            if unit.shortcut_conv is not None:
                out[f"backbone.{mm}.downsample.conv.weight"] = sd[f"{ours}.shortcut_conv.weight"]
                bn(f"{ours}.shortcut_bn", f"{mm}.downsample.bn")
        else:  # mmaction2 keeps the NL block inside the residual block it follows
            ours, mm = f"res{s}.{name}", f"{layer}.{name[len('nonlocal') :]}.non_local_block"
            for x, key in (("theta", "theta"), ("phi", "phi.0"), ("g", "g.0")):
                for p in ("weight", "bias"):
                    if f"{ours}.{x}.{p}" in sd:  # the Gaussian form has no θ / φ convs
                        out[f"backbone.{mm}.{key}.conv.{p}"] = sd[f"{ours}.{x}.{p}"]
            out[f"backbone.{mm}.conv_out.conv.weight"] = sd[f"{ours}.out.weight"]  # no bias
            bn(f"{ours}.bn", f"{mm}.conv_out.bn")
    out["cls_head.fc_cls.weight"], out["cls_head.fc_cls.bias"] = (
        sd["head.fc.weight"],
        sd["head.fc.bias"],
    )
    return out


# -- hand-written references of the source projects' non-local blocks -------------------------


def to_caffe2_names(model: VideoResNet) -> list[str]:
    """Caffe2 blob names of a model (works on meta: names only)."""
    names = ["conv1_w"]
    for s, name, _ in _units(model):
        if not name.isdigit():
            i = name[len("nonlocal") :]
            names += [f"nonlocal_conv{s}_{i}_{x}_w" for x in ("theta", "phi", "g", "out")]
    return names
