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


def autocast_factory(cfg: Config, device: torch.device) -> Callable[[], AbstractContextManager]:
    """Mixed precision: bf16 or fp16 autocast (fp16 pairs with a GradScaler in the trainer)."""
    if cfg.train.amp == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if cfg.train.amp == "bf16" else torch.float16

    def ctx() -> AbstractContextManager:
        return torch.autocast(device_type=device.type, dtype=dtype)

    return ctx
