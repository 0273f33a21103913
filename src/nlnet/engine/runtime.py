"""Process set-up shared by ``nlnet train`` and ``nlnet eval``: device, determinism, precision."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from nlnet.config import Config, ConfigError
from nlnet.engine import distributed as dist


def device_kind(cfg: Config) -> str:
    want = cfg.train.device
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but CUDA is not available")
    return want


def global_flags() -> tuple[bool, bool]:
    """Process-wide switches ``setup`` may change (restored by :func:`restore_global_flags`)."""
    return torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark


def restore_global_flags(flags: tuple[bool, bool]) -> None:
    torch.use_deterministic_algorithms(flags[0])
    torch.backends.cudnn.benchmark = flags[1]


def setup(cfg: Config) -> tuple[torch.device, int, int]:
    """Initialise distribution (torchrun) and determinism; return (device, rank, world size)."""
    kind = device_kind(cfg)
    if cfg.train.deterministic:
        # cuBLAS needs a fixed workspace for deterministic GEMMs; set before CUDA initialises.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif kind == "cuda":
        torch.backends.cudnn.benchmark = True
    rank, world, local = dist.init(kind)
    device = torch.device("cuda", local) if kind == "cuda" else torch.device("cpu")
    if cfg.train.amp == "fp16" and kind != "cuda":
        raise ConfigError("train.amp: fp16 needs CUDA (use bf16 or none on CPU)")
    if cfg.train.sync_bn and kind != "cuda" and world > 1:
        raise ConfigError("train.sync_bn: SyncBatchNorm needs CUDA")
    return device, rank, world


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 convolutions and matmuls natively (faster than float32).

    CUDA: bf16 tensor cores (Ampere and newer).  CPU: AVX512-BF16 or AMX-BF16 through oneDNN;
    without them bf16 is emulated and slower than float32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def precision(amp: str, device: torch.device, *, training: bool) -> str:
    """``train.amp`` resolved to "none", "bf16" or "fp16" for a training or an evaluation pass.

    ``"auto"`` (the default) trains under bf16 autocast where the hardware has native bf16
    (:func:`native_bf16`) and evaluates in float32, so reported accuracies are float32 numbers;
    an explicit "bf16"/"fp16" applies to both.
    """
    if amp != "auto":
        return amp
    return "bf16" if training and native_bf16(device) else "none"


def autocast_factory(
    cfg: Config, device: torch.device, *, training: bool = False
) -> Callable[[], AbstractContextManager]:
    """Mixed precision: bf16 or fp16 autocast (fp16 pairs with a GradScaler in the trainer)."""
    amp = precision(cfg.train.amp, device, training=training)
    if amp == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16

    def ctx() -> AbstractContextManager:
        return torch.autocast(device_type=device.type, dtype=dtype)

    return ctx


def channels_last(cfg: Config, device: torch.device) -> bool:
    """``train.memory_format`` resolved: ``"auto"`` is channels-last-3d when training in bf16 on
    a CPU (oneDNN's bf16 3-D convolutions are fastest in that layout: BENCHMARKS.md "Whole
    model"), contiguous otherwise."""
    fmt = cfg.train.memory_format
    if fmt != "auto":
        return fmt == "channels_last"
    return device.type == "cpu" and precision(cfg.train.amp, device, training=True) == "bf16"


def to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """Store every 5-D parameter (the 3-D convolutions' weights) channels-last, in place.

    Convolutions then pick the channels-last algorithms and produce channels-last activations
    whatever the input's layout; other parameters (2-D convolutions, BN, fc) are untouched.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 5:
                p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
    return model
