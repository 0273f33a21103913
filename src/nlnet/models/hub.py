"""Released weights of non-local video models: a registry, and download → verify → convert → cache.

Every model the publishers released for the paper's architectures (§4, Table 2–3) has one
:class:`WeightsEntry`, named ``<arch>.<tag>`` (timm style), e.g. ``i3d_r50_nl5.orig_32x2_k400``:

* ``orig_*``: the original Caffe2 release (facebookresearch/video-nonlocal-net), 15 Kinetics-400
  ``.pkl`` files, CC-BY-NC 4.0; 10 clips × 3 crops of 256, fully-convolutional test.  The 8×8
  and 32×4 models use the code's "speed" layout, 32×2 and 128×1 the "original" one; the
  128×1 and 32×4 models are frozen-BN ("affine") with res3 attention in groups of 4 frames.
* ``pysf_*``: PySlowFast's Caffe2-format 8×8 ``.pkl`` (C2D without the pool after res2, I3D,
  I3D-NLN) and ``pysf_ptv_*``: its PyTorchVideo-layout ``.pyth`` (C2D, I3D; listed for
  reference, no converter for that layout yet).
* ``mmaction2_*``: mmaction2's I3D / NL I3D 32×2 rows (1.x, sha256 prefix in the file name) and
  the three older 0.x NL files (``*_v0``).
* ``*_init``: the original release's ImageNet ResNets and affine I3D baselines, members of
  ``pretrained_model.tar.gz``: initialisations, not classifiers (2D kernels are inflated on load).

:func:`resolve_weights` turns a registry name, a URL (``http``, ``https``, ``file``) or a local path
into a local file.  For a name it downloads the publisher's file into torch hub's cache
(``$TORCH_HOME/hub/checkpoints``, the folder ``torch.hub.load_state_dict_from_url`` uses) with a
progress bar, checks its length and (where the publisher gives one) its sha256 prefix, converts it
once with :func:`nlnet.models.convert.convert_checkpoint` into a self-describing nlnet file
(``<name>.nlnet.pth``: arch, settings, Kinetics class names, preprocessing, source URL) and
returns that; later calls use the cache without touching the network.  ``offline=True`` (or
``NLNET_OFFLINE=1``) never opens a connection.

A failed, interrupted or wrong-hash download leaves nothing in the cache: the bytes go to a
temporary file beside the destination (:func:`nlnet.io.atomic_write`) that is moved into place
only after the checks.  (``torch.hub.download_url_to_file`` is not used for the transfer itself
because it accepts a body shorter than its ``Content-Length`` as complete.)
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from nlnet.models.io import (
    ChecksumError,
    DownloadError,
    WeightsError,
    download,
    hash_prefix_from_name,
    is_url,
    sha256_file,
)

__all__ = [
    "ChecksumError",
    "DownloadError",
    "OfflineError",
    "WeightsEntry",
    "WeightsError",
    "cache_dir",
    "download_weights",
    "get_weights",
    "list_weights",
    "resolve_weights",
]

# -- preprocessing of each publisher (pixels on the 0–255 scale, RGB) -------------------------
#: The original code and PySlowFast: 0.45·255 / 0.225·255 for every channel (reference §4.1).
ORIG_MEAN: tuple[float, float, float] = (114.75, 114.75, 114.75)
ORIG_STD: tuple[float, float, float] = (57.375, 57.375, 57.375)
#: mmaction2's ActionDataPreprocessor (ImageNet statistics, RGB).
MMACTION2_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
MMACTION2_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)

ORIG_PROTOCOL = "10 clips x 3 crops of 256 (short side 256), fully-convolutional, softmax avg"
PYSF_PROTOCOL = "10 clips x 3 crops of 256 (short side 256), softmax avg"
MMACTION2_PROTOCOL = "10 clips x 3 crops of 256 (short side 256), softmax avg"

ORIG_LICENCE = "CC-BY-NC 4.0 (video-nonlocal-net README)"
PYSF_LICENCE = "Apache-2.0 (the PySlowFast repository's licence)"
PTV_LICENCE = "Apache-2.0 (the PySlowFast/PyTorchVideo repositories' licence)"
MMACTION2_LICENCE = "Apache-2.0 (the mmaction2 repository's licence)"

ORIG_BASE = "https://dl.fbaipublicfiles.com/video-nonlocal/"
ORIG_PAGE = "https://github.com/facebookresearch/video-nonlocal-net#main-results"
PYSF_BASE = "https://dl.fbaipublicfiles.com/pyslowfast/model_zoo/kinetics400/"
PYSF_PAGE = "https://github.com/facebookresearch/SlowFast/blob/main/MODEL_ZOO.md"
PTV_BASE = "https://dl.fbaipublicfiles.com/pytorchvideo/pysf_model_zoo/kinetics/"
PTV_PAGE = "https://github.com/facebookresearch/SlowFast/blob/main/projects/pytorchvideo/README.md"
MMA_BASE = "https://download.openmmlab.com/mmaction/v1.0/recognition/i3d/"
MMA0_BASE = "https://download.openmmlab.com/mmaction/recognition/i3d/"
MMA_PAGE = "https://github.com/open-mmlab/mmaction2/tree/main/configs/recognition/i3d"

#: Source formats a registry entry may name; those in ``convert.FORMATS`` have a converter.
SOURCE_FORMATS: tuple[str, ...] = ("caffe2", "slowfast", "mmaction2", "pytorchvideo")


class OfflineError(WeightsError):
    """Offline mode and the file is not in the cache."""


@dataclass(frozen=True, eq=False)
class WeightsEntry:
    """One released weight file and everything needed to use it (timm's ``pretrained_cfg``).

    ``converter_options`` go to the converter (``convert_caffe2(variant=...)``,
    ``convert_mmaction2(pairwise=..., scale=...)``); ``model_kwargs`` are the ``create_model``
    settings the converted file must end up with (checked after conversion: a file that
    converts to different settings is refused rather than cached).
    """

    name: str
    arch: str
    source: str  # publisher: "original", "pyslowfast", "pytorchvideo", "mmaction2"
    fmt: str  # layout of the file: one of SOURCE_FORMATS
    url: str
    kind: str = "classifier"  # or "init": an initialisation, returned as is (not converted)
    member: str | None = None  # path inside a tarball (``url`` then names the tarball)
    converter_options: Mapping[str, Any] = field(default_factory=dict)
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    dataset: str = "kinetics400"
    num_classes: int | None = 400
    classes: str | tuple[str, ...] | None = "kinetics400"
    frames: int | None = None
    stride: int | None = None
    mean: tuple[float, float, float] = ORIG_MEAN
    std: tuple[float, float, float] = ORIG_STD
    test_scale: int | None = 256
    crop: int | None = 256
    clips: int | None = 10
    crops: int | None = 3
    protocol: str = ORIG_PROTOCOL
    top1: float | None = None
    top5: float | None = None
    licence: str = ORIG_LICENCE
    sha256: str | None = None  # the publisher's sha256 (prefix) of the downloaded file
    page: str = ""  # where the file and its numbers are published
    notes: tuple[str, ...] = ()

    @property
    def filename(self) -> str:
        """The downloaded file's name in the cache (the URL's last path component)."""
        return os.path.basename(unquote(urlparse(self.url).path))

    @property
    def convertible(self) -> bool:
        """Whether :func:`resolve_weights` can turn the file into a self-describing nlnet file."""
        from nlnet.models.convert import FORMATS

        return self.kind == "classifier" and self.fmt in FORMATS

    @property
    def cached_name(self) -> str:
        """File name of the converted weights in the cache."""
        return f"{self.name}.nlnet.pth"

    def class_names(self) -> list[str] | None:
        """Label names in output order (``None`` when unknown)."""
        if self.classes is None:
            return None
        if isinstance(self.classes, str):
            from nlnet import classes as class_lists

            try:
                return list(getattr(class_lists, self.classes)())
            except AttributeError:
                raise ValueError(
                    f"{self.name}: unknown class list {self.classes!r}; expected a function of "
                    "nlnet.classes (kinetics400, charades157)"
                ) from None
        return list(self.classes)

    def preprocessing(self) -> dict[str, Any] | None:
        """The contract's preprocessing dict (mean/std on 0–255 RGB, frames × stride, views)."""
        if self.kind != "classifier":
            return None
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "frames": self.frames,
            "stride": self.stride,
            "test_scale": self.test_scale,
            "crop": self.crop,
            "clips": self.clips,
            "crops": self.crops,
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (``nlnet weights --json``)."""
        return {
            "name": self.name,
            "arch": self.arch,
            "source": self.source,
            "format": self.fmt,
            "kind": self.kind,
            "url": self.url,
            "member": self.member,
            "file": self.filename,
            "convertible": self.convertible,
            "converter_options": _jsonable(dict(self.converter_options)),
            "model_kwargs": _jsonable(dict(self.model_kwargs)),
            "dataset": self.dataset,
            "num_classes": self.num_classes,
            "classes": self.classes
            if isinstance(self.classes, str) or self.classes is None
            else list(self.classes),
            "preprocessing": self.preprocessing(),
            "protocol": self.protocol if self.kind == "classifier" else None,
            "top1": self.top1,
            "top5": self.top5,
            "licence": self.licence,
            "sha256": self.sha256,
            "page": self.page,
            "notes": list(self.notes),
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# -- the registry -----------------------------------------------------------------------------
def _orig(
    arch: str,
    file: str,
    frames: int,
    stride: int,
    top1: float,
    top5: float,
    *,
    tag: str | None = None,
    notes: tuple[str, ...] = (),
) -> WeightsEntry:
    """An entry of the original release (reference §5.1)."""
    speed = (frames, stride) in ((8, 8), (32, 4))
    variant = "speed" if speed else "original"
    affine = (frames, stride) in ((128, 1), (32, 4))
    kwargs: dict[str, Any] = {"variant": variant}
    if affine:
        kwargs["freeze_bn"] = True
    if "_nl" in arch:
        kwargs["norm"] = None if affine else "batch"
        if affine:
            kwargs["temporal_groups"] = {3: 4}
    layout = "speed layout (resnet_video.py)" if speed else "original layout (resnet_video_org.py)"
    extra = (f"{layout}",)
    if affine:
        extra += ("frozen-BN ('affine') model, initialised from an I3D baseline",)
        if "_nl" in arch:
            extra += ("NL blocks without BN; res3 attention within groups of 4 frames",)
    return WeightsEntry(
        name=f"{arch}.orig_{frames}x{stride}_k400{'_' + tag if tag else ''}",
        arch=arch,
        source="original",
        fmt="caffe2",
        url=ORIG_BASE + file,
        converter_options={"variant": variant},
        model_kwargs=kwargs,
        frames=frames,
        stride=stride,
        top1=top1,
        top5=top5,
        page=ORIG_PAGE,
        notes=extra + notes,
    )


def _orig_init(arch: str, member: str, tag: str, note: str) -> WeightsEntry:
    """A member of the original release's ``pretrained_model.tar.gz`` (initialisations)."""
    return WeightsEntry(
        name=f"{arch}.{tag}",
        arch=arch,
        source="original",
        fmt="caffe2",
        url=ORIG_BASE + "pretrained_model.tar.gz",
        kind="init",
        member=member,
        dataset="imagenet" if "imagenet" in tag else "kinetics400",
        num_classes=None,
        classes=None,
        frames=None,
        stride=None,
        test_scale=None,
        crop=None,
        clips=None,
        crops=None,
        protocol="",
        page="https://github.com/facebookresearch/video-nonlocal-net#pre-trained-models",
        notes=(
            note,
            "member of pretrained_model.tar.gz: the tarball is downloaded once, the member is "
            "extracted beside it and returned unconverted (load it with pretrained=/load_weights, "
            "which inflates 2D kernels and folds BN)",
        ),
    )


def _pysf(arch: str, file: str, top1: float, top5: float, variant: str, note: str) -> WeightsEntry:
    """PySlowFast's Caffe2-format 8×8 model-zoo files (CHECKPOINT_TYPE caffe2)."""
    kwargs: dict[str, Any] = {"variant": variant}
    if "_nl" in arch:
        kwargs["norm"] = "batch"
    return WeightsEntry(
        name=f"{arch}.pysf_{'nopool_' if 'nopool' in variant else ''}8x8_k400",
        arch=arch,
        source="pyslowfast",
        fmt="caffe2",
        url=PYSF_BASE + file,
        converter_options={"variant": variant},
        model_kwargs=kwargs,
        frames=8,
        stride=8,
        protocol=PYSF_PROTOCOL,
        top1=top1,
        top5=top5,
        licence=PYSF_LICENCE,
        page=PYSF_PAGE,
        notes=(note, "Caffe2 blob names; PySlowFast's head applies a softmax, ours gives logits"),
    )


def _ptv(arch: str, file: str, top1: float, top5: float) -> WeightsEntry:
    """PySlowFast's PyTorchVideo-model files (``model.blocks.*`` keys): listed, not converted."""
    return WeightsEntry(
        name=f"{arch}.pysf_ptv_8x8_k400",
        arch=arch,
        source="pytorchvideo",
        fmt="pytorchvideo",
        url=PTV_BASE + file,
        frames=8,
        stride=8,
        protocol=PYSF_PROTOCOL,
        top1=top1,
        top5=top5,
        licence=PTV_LICENCE,
        page=PTV_PAGE,
        notes=(
            "PyTorchVideo layer names with PySlowFast's 'model.' prefix (model.blocks.*): nlnet "
            "has no converter for this layout yet; `nlnet weights download` fetches the file",
        ),
    )


def _mma(
    arch: str,
    stem: str,
    digest: str,
    top1: float,
    top5: float | None,
    pairwise: str | None,
    *,
    date: str = "20220812",
    v0: bool = False,
) -> WeightsEntry:
    """An mmaction2 I3D 32×2×1 row (ImageNet init); the file name carries the sha256 prefix."""
    url = f"{MMA0_BASE if v0 else MMA_BASE}{stem}/{stem}_{date}-{digest}.pth"
    options: dict[str, Any] = {}
    kwargs: dict[str, Any] = {"variant": "mmaction2"}
    short = ""
    if pairwise is not None:
        options["pairwise"] = pairwise
        if pairwise == "embedded_gaussian":
            options["scale"] = 1.0
            kwargs["scale"] = 1.0
        kwargs.update(pairwise=pairwise, pool_before_conv=False, norm="batch")
        short = {"embedded_gaussian": "eg_", "dot_product": "dot_", "gaussian": "gauss_"}[pairwise]
    return WeightsEntry(
        name=f"{arch}.mmaction2_{short}32x2_k400{'_v0' if v0 else ''}",
        arch=arch,
        source="mmaction2",
        fmt="mmaction2",
        url=url,
        converter_options=options,
        model_kwargs=kwargs,
        frames=32,
        stride=2,
        mean=MMACTION2_MEAN,
        std=MMACTION2_STD,
        protocol=MMACTION2_PROTOCOL,
        top1=top1,
        top5=top5,
        licence=MMACTION2_LICENCE,
        sha256=digest,
        page=MMA_PAGE,
        notes=(
            "mmcv NonLocal3d: pools after the phi/g convs, use_scale=False "
            "(non_local=((0,0,0),(0,1,0,1),(0,1,0,1,0,1),(0,0,0)), sub_sample=True)"
            if pairwise
            else "I3D baseline, mmaction2 ResNet3d layout",
        )
        + (("mmaction2 0.x release (older file of the same recipe)",) if v0 else ()),
    )


_MMA1 = "i3d_imagenet-pretrained-r50{}_8xb8-32x2x1-100e_kinetics400-rgb"
_MMA0 = "i3d_nl_{}_r50_32x2x1_100e_kinetics400_rgb"

RELEASED: tuple[WeightsEntry, ...] = (
    # -- the original release: main results (paper settings) --
    _orig("c2d_r50", "c2d_baseline_32x2_IN_pretrain_400k.pkl", 32, 2, 72.0, 90.0),
    _orig("c2d_r50_nl5", "c2d_nonlocal_32x2_IN_pretrain_400k.pkl", 32, 2, 73.9, 91.0),
    _orig("i3d_r50", "i3d_baseline_32x2_IN_pretrain_400k.pkl", 32, 2, 73.6, 90.8),
    _orig("i3d_r50_nl5", "i3d_nonlocal_32x2_IN_pretrain_400k.pkl", 32, 2, 74.9, 91.6),
    _orig("i3d_r50", "i3d_baseline_128x1_I3D_pretrain_400k.pkl", 128, 1, 75.2, 92.0),
    _orig("i3d_r50_nl5", "i3d_nonlocal_128x1_I3D_pretrain_400k.pkl", 128, 1, 76.5, 92.7),
    # -- the original release: "speed" models --
    _orig("c2d_r50", "c2d_baseline_8x8_IN_pretrain_400k.pkl", 8, 8, 71.9, 90.0),
    _orig("c2d_r50_nl5", "c2d_nonlocal_8x8_IN_pretrain_400k.pkl", 8, 8, 74.4, 91.4),
    _orig("i3d_r50", "i3d_baseline_8x8_IN_pretrain_400k.pkl", 8, 8, 73.4, 90.9),
    _orig("i3d_r50_nl5", "i3d_nonlocal_8x8_IN_pretrain_400k.pkl", 8, 8, 74.7, 91.6),
    _orig("i3d_r50", "i3d_baseline_32x4_I3D_pretrain_400k.pkl", 32, 4, 75.5, 92.0),
    _orig("i3d_r50_nl5", "i3d_nonlocal_32x4_I3D_pretrain_400k.pkl", 32, 4, 76.5, 92.6),
    _orig(
        "i3d_r50",
        "i3d_baseline_8x8_IN_pretrain_300k.pkl",
        8,
        8,
        73.2,
        90.8,
        tag="300k",
        notes=("300k iterations (8 GPUs)",),
    ),
    _orig(
        "i3d_r50",
        "i3d_baseline_8x8_IN_pretrain_600k_4gpu.pkl",
        8,
        8,
        73.0,
        90.4,
        tag="600k_4gpu",
        notes=("4-GPU run, 600k iterations",),
    ),
    _orig(
        "i3d_r50",
        "i3d_baseline_8x8_IN_pretrain_300k_4gpu.pkl",
        8,
        8,
        72.0,
        90.1,
        tag="300k_4gpu",
        notes=("4-GPU run, 300k iterations, less regularisation (jitter 256, dropout 0)",),
    ),
    # -- the original release's initialisations (pretrained_model.tar.gz) --
    _orig_init(
        "c2d_r50",
        "r50_pretrain_c2_model_iter450450_clean.pkl",
        "orig_imagenet_init",
        "2D ResNet-50 trained on ImageNet (Caffe2), the release's initialisation",
    ),
    _orig_init(
        "c2d_r101",
        "r101_pretrain_c2_model_iter450450_clean.pkl",
        "orig_imagenet_init",
        "2D ResNet-101 trained on ImageNet; named by the README (TRAIN.PARAMS_FILE), its "
        "presence in the tarball is unconfirmed",
    ),
    _orig_init(
        "i3d_r50",
        "run_i3d_baseline_400k/affine_model_400k.pkl",
        "orig_8x8_k400_affine_init",
        "the 8x8 I3D baseline with BN folded into a frozen affine: the 32x4 models' init",
    ),
    _orig_init(
        "i3d_r50",
        "run_i3d_baseline_400k_32f/affine_model_400k.pkl",
        "orig_32x2_k400_affine_init",
        "the 32x2 I3D baseline with BN folded into a frozen affine: the 128x1 models' init",
    ),
    # -- PySlowFast (Caffe2-format .pkl, run in PySlowFast's ResNet: padded pool1) --
    _pysf(
        "c2d_r50",
        "C2D_NOPOOL_8x8_R50.pkl",
        67.2,
        87.8,
        "slowfast_nopool",
        "C2D without the temporal pool after res2 (config Kinetics/c2/C2D_NOPOOL_8x8_R50), "
        "trained from scratch",
    ),
    _pysf(
        "i3d_r50",
        "I3D_8x8_R50.pkl",
        73.5,
        90.8,
        "slowfast",
        "config Kinetics/c2/I3D_8x8_R50, trained from scratch",
    ),
    _pysf(
        "i3d_r50_nl5",
        "I3D_NLN_8x8_R50.pkl",
        74.0,
        91.1,
        "slowfast",
        "config Kinetics/c2/I3D_NLN_8x8_R50: NL after res3 blocks 1,3 and res4 blocks 1,3,5, "
        "softmax, pool before phi/g, scale dim_inner^-1/2",
    ),
    # -- PySlowFast's PyTorchVideo models (listed; no converter for this layout yet) --
    _ptv("c2d_r50", "C2D_8x8_R50.pyth", 71.46, 89.68),
    _ptv("i3d_r50", "I3D_8x8_R50.pyth", 73.27, 90.70),
    # -- mmaction2 1.x (sha256 prefix in the file name) --
    _mma("i3d_r50_nl5", _MMA1.format("-nl-dot-product"), "8e1f2148", 74.80, 92.07, "dot_product"),
    _mma(
        "i3d_r50_nl5",
        _MMA1.format("-nl-embedded-gaussian"),
        "afd8f562",
        74.73,
        91.80,
        "embedded_gaussian",
    ),
    _mma("i3d_r50_nl5", _MMA1.format("-nl-gaussian"), "0c5cbf5a", 73.97, 91.33, "gaussian"),
    _mma("i3d_r50", _MMA1.format(""), "e213c223", 73.47, 91.27, None),
    # -- mmaction2 0.x (same recipe, older files; top-5 not given in released-weights.md) --
    _mma(
        "i3d_r50_nl5",
        _MMA0.format("embedded_gaussian"),
        "6e6aef1b",
        74.71,
        None,
        "embedded_gaussian",
        date="20200813",
        v0=True,
    ),
    _mma(
        "i3d_r50_nl5",
        _MMA0.format("gaussian"),
        "17f84aa2",
        73.37,
        None,
        "gaussian",
        date="20200815",
        v0=True,
    ),
    _mma(
        "i3d_r50_nl5",
        _MMA0.format("dot_product"),
        "7c30d5bb",
        73.92,
        None,
        "dot_product",
        date="20200814",
        v0=True,
    ),
)

_ENTRIES: dict[str, WeightsEntry] = {}
for _entry in RELEASED:
    if _entry.name in _ENTRIES:
        raise ValueError(f"weights {_entry.name!r} registered twice")
    _ENTRIES[_entry.name] = _entry


def list_weights(pattern: str = "*") -> list[WeightsEntry]:
    """Registered weights whose name matches a shell-style ``pattern`` (registry order)."""
    return [e for n, e in _ENTRIES.items() if fnmatch.fnmatch(n, pattern)]


def get_weights(name: str) -> WeightsEntry:
    """The entry registered as ``name``; ``ValueError`` naming close matches otherwise."""
    try:
        return _ENTRIES[name]
    except KeyError:
        raise ValueError(
            f"unknown weights {name!r}; {_suggest(name)} (`nlnet weights` lists them all)"
        ) from None


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, list(_ENTRIES), n=5, cutoff=0.5)
    if not close:
        close = [n for n in _ENTRIES if n.split(".")[0] == name.split(".")[0]][:8]
    return f"close names: {', '.join(close)}" if close else "no registered name is close"


# -- cache, download, verification ------------------------------------------------------------
def cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """``path`` or torch hub's checkpoint cache (``$TORCH_HOME/hub/checkpoints``)."""
    if path is not None:
        return Path(path).expanduser()
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def _env_offline() -> bool:
    return os.environ.get("NLNET_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _verify_cached(path: Path, sha256: str | None) -> None:
    if sha256 is None:
        return
    got = sha256_file(path)
    if not got.startswith(sha256.lower()):
        raise ChecksumError(
            f"{path}: sha256 {got} does not start with the publisher's {sha256!r}; delete the "
            "file and download it again"
        )


def _offline_error(entry_or_url: WeightsEntry | str, dst: Path) -> OfflineError:
    url = entry_or_url.url if isinstance(entry_or_url, WeightsEntry) else entry_or_url
    what = (
        f"weights {entry_or_url.name!r} are"
        if isinstance(entry_or_url, WeightsEntry)
        else f"{url} is"
    )
    hint = ""
    if isinstance(entry_or_url, WeightsEntry) and entry_or_url.convertible:
        hint = (
            f" (or copy {dst.parent / entry_or_url.cached_name} made by `nlnet weights download "
            f"{entry_or_url.name}` on another machine)"
        )
    return OfflineError(
        f"offline: {what} not in the cache; download {url} on a machine with network and place "
        f"it at {dst}{hint}"
    )


def _fetch(
    url: str,
    dst: Path,
    *,
    sha256: str | None,
    offline: bool,
    progress: bool,
    owner: WeightsEntry | None = None,
) -> Path:
    """The cached file ``dst`` (verified), downloading it first unless offline."""
    if dst.is_file():
        _verify_cached(dst, sha256)
        return dst
    if offline:
        raise _offline_error(owner if owner is not None else url, dst)
    return download(url, dst, sha256=sha256, progress=progress)


def _extract_member(tar_path: Path, member: str, dst: Path) -> Path:
    """Copy one regular-file member of a tarball to ``dst`` (atomic; no path from the archive)."""
    from nlnet.io import atomic_write

    try:
        with tarfile.open(tar_path, "r:*") as tar:
            names = tar.getnames()
            match = [n for n in names if n == member or n.endswith("/" + member)]
            if not match:
                shown = ", ".join(n for n in names if n.endswith(".pkl"))[:600]
                raise WeightsError(
                    f"{tar_path} has no member {member!r}; its .pkl members: {shown or 'none'}"
                )
            info = tar.getmember(match[0])
            if not info.isfile():
                raise WeightsError(f"{tar_path}: member {match[0]!r} is not a regular file")
            src = tar.extractfile(info)
            assert src is not None
            with src, atomic_write(dst) as fh:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    fh.write(chunk)
    except tarfile.TarError as err:
        raise WeightsError(f"{tar_path} is not a readable tarball: {err}") from err
    return dst


def download_weights(
    spec: str | WeightsEntry,
    *,
    offline: bool = False,
    progress: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The publisher's file of a registry entry in the cache (downloaded and verified once).

    For a tarball member (``*_init`` entries) the member is extracted beside the tarball and its
    path returned.  Nothing is converted.
    """
    entry = spec if isinstance(spec, WeightsEntry) else get_weights(spec)
    offline = offline or _env_offline()
    cache = _cache_path(cache_dir)
    extracted = None
    if entry.member is not None:
        extracted = cache / entry.filename.split(".")[0] / entry.member
        if extracted.is_file():
            return extracted
    raw = _fetch(
        entry.url,
        cache / entry.filename,
        sha256=entry.sha256,
        offline=offline,
        progress=progress,
        owner=entry,
    )
    if entry.member is not None and extracted is not None:
        return _extract_member(raw, entry.member, extracted)
    return raw


def _cache_path(path: str | os.PathLike[str] | None) -> Path:
    return cache_dir(path)


def _sidecar(entry: WeightsEntry, raw_sha256: str) -> dict[str, Any]:
    return {
        "name": entry.name,
        "url": entry.url,
        "arch": entry.arch,
        "format": entry.fmt,
        "converter_options": _jsonable(dict(entry.converter_options)),
        "raw_sha256": raw_sha256,
        "registry_version": 1,
    }


def _cache_is_current(converted: Path, entry: WeightsEntry) -> bool:
    """A converted file is current unless its sidecar names another URL, arch or options."""
    side = converted.with_suffix(".json")
    if not side.is_file():
        return True  # a converted file copied in by hand (the offline recipe)
    try:
        info = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    want = _sidecar(entry, "")
    return all(info.get(k) == want[k] for k in ("url", "arch", "format", "converter_options"))


def _normalise(value: Any) -> Any:
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            key = str(k)
            out[key[3:] if key.startswith("res") else key] = _normalise(v)
        return out
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def _check_settings(entry: WeightsEntry, got: Mapping[str, Any]) -> None:
    wrong = [
        f"{k}: file converts to {got[k]!r}, registry expects {v!r}"
        for k, v in entry.model_kwargs.items()
        if k in got and _normalise(got[k]) != _normalise(v)
    ]
    if wrong:
        raise WeightsError(
            f"{entry.name}: the downloaded file does not match its registry entry ("
            + "; ".join(wrong)
            + "); the converted file was not cached"
        )


def _convert_entry(entry: WeightsEntry, raw: Path, dst: Path) -> Path:
    from nlnet.io import atomic_write_text
    from nlnet.models.convert import convert_checkpoint

    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.converting")
    try:
        conv, _, _ = convert_checkpoint(
            entry.fmt,
            raw,
            tmp,
            entry.arch,
            classes=entry.class_names(),
            preprocessing=entry.preprocessing(),
            source=entry.url,
            **dict(entry.converter_options),
        )
        _check_settings(entry, conv.model_kwargs)
        if entry.num_classes is not None and conv.num_classes != entry.num_classes:
            raise WeightsError(
                f"{entry.name}: the file has {conv.num_classes} classes, the registry expects "
                f"{entry.num_classes}; the converted file was not cached"
            )
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(dst.with_suffix(".json"), json.dumps(_sidecar(entry, sha256_file(raw))))
    return dst


def _resolve_entry(entry: WeightsEntry, *, offline: bool, progress: bool, cache: Path) -> Path:
    if entry.kind != "classifier":
        return download_weights(entry, offline=offline, progress=progress, cache_dir=cache)
    if not entry.convertible:
        raise WeightsError(
            f"{entry.name}: no converter for the {entry.fmt!r} layout yet ({entry.url}); "
            f"`nlnet weights download {entry.name}` fetches the publisher's file"
        )
    converted = cache / entry.cached_name
    if converted.is_file() and _cache_is_current(converted, entry):
        return converted
    raw = download_weights(entry, offline=offline, progress=progress, cache_dir=cache)
    return _convert_entry(entry, raw, converted)


def resolve_weights(
    spec: str | os.PathLike[str] | WeightsEntry,
    *,
    offline: bool = False,
    progress: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    check_hash: bool = False,
) -> Path:
    """A local file for ``spec``: a registry name, a URL or a path.

    * registry name (or :class:`WeightsEntry`): download into the cache, verify, convert once,
      return the self-describing ``<name>.nlnet.pth`` (``*_init`` entries: the raw file);
    * URL (``http://``, ``https://``, ``file://``; a registered URL resolves as its entry):
      downloaded once into the cache and returned as is; ``check_hash=True`` verifies the
      sha256 prefix in its file name (torch.hub's convention, as mmaction2 names its files);
    * an existing local path: returned unchanged.

    ``offline`` (or the environment variable ``NLNET_OFFLINE=1``) never opens a connection and
    raises :class:`OfflineError` naming the file to place, and where, when it is not cached.
    """
    offline = offline or _env_offline()
    cache = _cache_path(cache_dir)
    if isinstance(spec, WeightsEntry):
        return _resolve_entry(spec, offline=offline, progress=progress, cache=cache)
    text = os.fspath(spec)
    if is_url(text):
        for entry in _ENTRIES.values():
            if entry.url == text and entry.member is None:
                return _resolve_entry(entry, offline=offline, progress=progress, cache=cache)
        name = os.path.basename(unquote(urlparse(text).path))
        if not name:
            raise ValueError(f"{text!r}: the URL names no file")
        sha = hash_prefix_from_name(name) if check_hash else None
        if check_hash and sha is None:
            raise ValueError(
                f"check_hash=True but {name!r} carries no '-<sha256 prefix>.' in its name"
            )
        return _fetch(text, cache / name, sha256=sha, offline=offline, progress=progress)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise ValueError(f"{text!r} is a directory, not a weight file")
    if text in _ENTRIES:
        return _resolve_entry(_ENTRIES[text], offline=offline, progress=progress, cache=cache)
    raise ValueError(
        f"weights {text!r} is not an existing file, a URL (http://, https://, file://) or a "
        f"registered name; {_suggest(text)} (`nlnet weights` lists them all)"
    )
