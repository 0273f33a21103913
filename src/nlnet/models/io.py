"""Weights I/O: the one place nlnet reads and writes weight files.

* :func:`read_checkpoint` reads a path, URL or in-memory dict and returns the whole checkpoint
  object. The container is recognised by its first bytes (never by the file name):

  ============================  ==========================================================
  first bytes                   what happens
  ============================  ==========================================================
  ``PK\\x03\\x04``                a torch zip file: ``torch.load(weights_only=True)``
  ``\\x80`` / ``(`` / ``}``       a pickle: :class:`RestrictedUnpickler` (numpy arrays and
                                plain containers only); a legacy torch file (whose first
                                pickle is torch's magic number) goes to ``torch.load``
  ``\\x1f\\x8b``                  gzip (``.tar.gz``, ``.pkl.gz``): refused, with its content
  ``ustar`` at byte 257         a tar archive: refused, listing its members
  ``<``                         an HTML page (a failed download): refused
  ============================  ==========================================================

  A pickle that holds something other than a dict (e.g. an int) is refused with what it holds.
* :func:`read_state_dict` is :func:`read_checkpoint` plus unwrapping (``model``, ``state_dict``,
  ``model_state``, ``blobs``) and removal of a DDP ``module.`` prefix.
* :func:`checkpoint_metadata` returns the self-describing part of an nlnet weight file
  (``arch``, ``model_kwargs``, ``num_classes``, ``classes``, ``preprocessing``, ...; the format
  is in ``docs/models.md``), also for training checkpoints written before it existed.
* :func:`save_weights` writes a self-describing file atomically (:func:`nlnet.io.atomic_save`).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import pickle
import re
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nlnet.io import atomic_save, atomic_write

FORMAT = "nlnet"
FORMAT_VERSION = 1
#: Keys of a self-describing nlnet weight file besides ``model`` (docs/models.md).
METADATA_KEYS: tuple[str, ...] = (
    "arch",
    "model_kwargs",
    "num_classes",
    "classes",
    "preprocessing",
    "converted_from",
    "source",
    "notes",
)
_LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a pre-1.6 torch.save file


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A pickle asked for an object other than numpy arrays and plain containers."""


class CheckpointFormatError(ValueError):
    """A file is not a weight file of a kind nlnet reads (says what it is and what was expected)."""


# (module, name) pairs a Caffe2 blob pickle legitimately needs: numpy array/scalar rebuilders
# (numpy ≥ 2 spells the module ``numpy._core``) and OrderedDict.  Nothing here can run code.
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds numpy arrays, dtypes and plain containers."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing to load {module}.{name} from a pickle: only numpy arrays and plain "
            f"containers are allowed in a weight file (it may be malicious or not a checkpoint)"
        )


def read_pickle(path: str | os.PathLike[str] | bytes) -> Any:
    """Read a (Python 2 or 3) pickle of numpy arrays with :class:`RestrictedUnpickler`."""
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def to_tensor(value: Any, name: str) -> Tensor:
    """A tensor from a tensor or a (non-object) numpy array."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"{name}: object arrays are not weights")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"{name}: expected a tensor or numpy array, got {type(value).__name__}")


def is_url(source: str) -> bool:
    """``http://``, ``https://`` or ``file://``."""
    return source.startswith(("http://", "https://", "file://"))


class WeightsError(RuntimeError):
    """Base class of the download / verification errors of weight files."""


class DownloadError(WeightsError):
    """The download failed or was cut short; nothing was cached."""


class ChecksumError(WeightsError):
    """A file's sha256 does not start with the publisher's prefix; it was not cached."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_prefix_from_name(filename: str) -> str | None:
    """The sha256 prefix a file name carries (torch.hub's ``HASH_REGEX``: ``-<hex>.``)."""
    from torch.hub import HASH_REGEX

    m = re.search(HASH_REGEX, filename)
    return m.group(1) if m and m.group(1) else None


def download(url: str, dst: Path, *, sha256: str | None = None, progress: bool = True) -> Path:
    """Fetch ``url`` to ``dst`` with a progress bar; check length and sha256 prefix; atomic."""
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "nlnet (torch.hub cache)"})
    digest = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(request, timeout=60) as resp, atomic_write(dst) as fh:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                disable=not progress,
                desc=dst.name,
                file=sys.stderr,
            ) as bar:
                while chunk := resp.read(1 << 20):
                    fh.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if total is not None and received != total:
                raise DownloadError(
                    f"download of {url} was interrupted: received {received} of {total} bytes; "
                    f"nothing was cached (run again to retry)"
                )
            if sha256 is not None and not digest.hexdigest().startswith(sha256.lower()):
                raise ChecksumError(
                    f"{url}: sha256 {digest.hexdigest()} does not start with the publisher's "
                    f"{sha256!r}; the file was removed and not cached (a corrupted or replaced "
                    "download)"
                )
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        raise DownloadError(
            f"could not download {url}: {err}; nothing was cached (for a machine without "
            f"network, place the file at {dst})"
        ) from err
    return dst


def fetch(
    url: str, *, model_dir: str | os.PathLike[str] | None = None, progress: bool = True
) -> Path:
    """Download ``url`` once into torch hub's cache (``$TORCH_HOME/hub/checkpoints``) and return
    the local path (``file://`` URLs are copied there too) through :func:`download`: a progress
    bar, a temporary file, the length checked, and the sha256 prefix a file name carries
    (torch.hub's ``-<hex>.`` convention) verified, so a cut or corrupted download leaves nothing."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    cache = Path(model_dir) if model_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    dst = cache / os.path.basename(parsed.path)
    if not dst.exists():
        download(url, dst, sha256=hash_prefix_from_name(dst.name), progress=progress)
    return dst


def sniff(path: str | os.PathLike[str]) -> str:
    """The container kind of a file from its first bytes: ``torch-zip``, ``zip``, ``pickle``,
    ``gzip``, ``tar``, ``html``, ``empty`` or ``unknown``."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            return "torch-zip"  # truncated: torch.load says so
        return "torch-zip" if any(n.endswith("data.pkl") for n in names) else "zip"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head[:1] == b"\x80" or head[:1] in (b"(", b"}", b"]"):
        return "pickle"
    if head.lstrip()[:1] == b"<":
        return "html"
    return "unknown"


_EXPECTED = (
    "expected a weight file: a torch checkpoint (.pth/.pyth/.pt, a zip written by torch.save) or "
    "a pickle of a dict of numpy arrays (the Caffe2 release's .pkl, {'blobs': {...}})"
)


def _describe_gzip(path: Path) -> str:
    try:
        with tarfile.open(path, "r:gz") as tf:
            names = [m.name for m in tf.getmembers()[:10]]
        return (
            f"a gzip-compressed tar archive (.tar.gz) holding {names}; extract it "
            f"(tar xzf {path.name}) and pass the weight file inside"
        )
    except (tarfile.TarError, EOFError, OSError):
        pass
    try:
        with gzip.open(path, "rb") as fh:
            inner = fh.read(4)
    except (OSError, EOFError) as err:
        return f"a gzip file that cannot be decompressed ({err}): the download is probably broken"
    kind = "a pickle" if inner[:1] == b"\x80" else "a torch zip" if inner == b"PK\x03\x04" else "?"
    return (
        f"gzip-compressed ({kind} inside); decompress it (gunzip {path.name}) and pass the result"
    )


def _refuse(path: Path, kind: str) -> CheckpointFormatError:
    if kind == "gzip":
        what = _describe_gzip(path)
    elif kind == "tar":
        try:
            with tarfile.open(path, "r:") as tf:
                names = [m.name for m in tf.getmembers()[:10]]
        except (tarfile.TarError, OSError):
            names = ["(unreadable)"]
        what = f"a tar archive holding {names}; extract it and pass the weight file inside"
    elif kind == "zip":
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()[:10]
        what = f"a zip archive (not written by torch.save) holding {names}; extract it first"
    elif kind == "html":
        what = "an HTML page (a failed or redirected download?), not weights"
    elif kind == "empty":
        what = "an empty file (an interrupted download?)"
    else:
        with open(path, "rb") as fh:
            what = f"of an unknown kind (first bytes {fh.read(8)!r})"
    return CheckpointFormatError(f"{path} is {what}; {_EXPECTED}")


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path} is not a plain tensor checkpoint (torch.load with weights_only=True "
            f"refused it): {err}"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointFormatError(
            f"{path} is a torch checkpoint that cannot be read (truncated or corrupt: {err}); "
            "download it again"
        ) from err


def read_checkpoint(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    model_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The whole checkpoint dict of a path, URL or dict (see the module docstring).

    Raises ``FileNotFoundError``, :class:`CheckpointFormatError` (wrong container, truncated,
    not a dict) or :class:`UnsafeCheckpointError` (a pickle asking for code).
    """
    if isinstance(source, Mapping):
        return dict(source)
    text = os.fspath(source)
    path = fetch(text, model_dir=model_dir) if is_url(text) else Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {text}")
    kind = sniff(path)
    if kind == "torch-zip":
        obj = _torch_load(path)
    elif kind == "pickle":
        try:
            obj = read_pickle(path)
        except UnsafeCheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, IndexError, TypeError) as err:
            raise CheckpointFormatError(
                f"{path} is a pickle that cannot be read (truncated or corrupt: "
                f"{type(err).__name__}: {err}); download it again"
            ) from err
        if isinstance(obj, int) and obj == _LEGACY_TORCH_MAGIC:
            obj = _torch_load(path)  # a pre-1.6 torch.save file
    else:
        raise _refuse(path, kind)
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(
            f"{path} holds a {type(obj).__name__} ({str(obj)[:60]!r}), not a dict of weights; "
            f"{_EXPECTED}. The download may be broken or be another kind of file"
        )
    return dict(obj)


def unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict inside a checkpoint dict (``model``, ``state_dict``, ``model_state``,
    ``blobs``), without a DDP ``module.`` prefix."""
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(
            f"a checkpoint must hold a dict of tensors, got {type(obj).__name__}"
        )
    state: dict[str, Any] = dict(obj)
    for key in ("model", "state_dict", "model_state", "blobs"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner:
            state = dict(inner)
            break
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def read_state_dict(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    model_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The raw ``{name: tensor or array}`` of a checkpoint path, URL or dict (no renaming)."""
    return unwrap_state_dict(read_checkpoint(source, model_dir=model_dir))


def checkpoint_metadata(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """The self-describing fields of an nlnet file (``None`` when it has none).

    A file written by :func:`save_weights` (or the trainer) has them at the top level; an older
    training checkpoint holds only its ``config``, from which arch and kwargs are taken.
    """
    if not isinstance(obj, Mapping):
        return None
    if obj.get("format") == FORMAT or "model_kwargs" in obj:
        meta = {k: obj.get(k) for k in METADATA_KEYS}
        meta["model_kwargs"] = dict(meta["model_kwargs"] or {})
        meta["notes"] = list(meta["notes"] or [])
        return meta
    cfg = obj.get("config")
    if isinstance(cfg, Mapping) and isinstance(cfg.get("model"), Mapping):
        m = cfg["model"]
        kwargs = dict(m.get("kwargs") or {})
        if m.get("freeze_bn"):
            kwargs.setdefault("freeze_bn", True)
        return {
            "arch": m.get("name"),
            "model_kwargs": kwargs,
            "num_classes": m.get("num_classes"),
            "classes": None,
            "preprocessing": None,
            "converted_from": None,
            "source": None,
            "notes": ["settings taken from the training config stored in the checkpoint"],
        }
    return None


def weights_file(
    state_dict: Mapping[str, Any],
    *,
    arch: str | None,
    model_kwargs: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    classes: list[str] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    converted_from: str | None = None,
    source: str | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """The self-describing dict (``docs/models.md``): plain types only, ``weights_only`` safe."""
    if classes is not None and num_classes is not None and len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names given for a {num_classes}-class model")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": dict(state_dict),
        "arch": arch,
        "model_kwargs": plain(dict(model_kwargs or {})),
        "num_classes": num_classes,
        "classes": None if classes is None else [str(c) for c in classes],
        "preprocessing": None if preprocessing is None else plain(dict(preprocessing)),
        "converted_from": converted_from,
        "source": source,
        "notes": [str(n) for n in (notes or [])],
    }


def plain(value: Any) -> Any:
    """``value`` with tuples as lists and only str/int/float/bool/None/list/dict leaves."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"cannot store {value!r} ({type(value).__name__}) in a weight file")


def save_weights(obj: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a weight file atomically (a crash leaves the old file or the new one)."""
    atomic_save(dict(obj), path)
