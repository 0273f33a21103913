"""SGD, the step schedule and batch-size adaptation (paper §4.1; original code's solver).

* SGD with momentum 0.9 and Nesterov, weight decay 1e-4 except on normalisation parameters
  (the original code excludes every blob whose name contains ``_bn``; biases keep decay).
  ``solver.optimizer=adamw`` swaps in AdamW with the same parameter groups (not in the paper).
* LR: ``base_lr · gamma^(number of steps passed)`` (÷10 at 150k and 300k of 400k), optional
  linear warm-up; ``solver.schedule=cosine``: the same warm-up, then a cosine to 0 at
  ``max_iter`` (not in the paper; the CPU demo uses it).
* Batch adaptation when fewer clips than the recipe's 64 fit per iteration: gradient
  accumulation, or the linear scaling rule (LR × global/reference, schedule × reference/global).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nlnet.config import ConfigError, SolverConfig

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, weight_decay: float, weight_decay_bn: float) -> list[dict]:
    """Two groups: parameters of normalisation layers (``weight_decay_bn``) and all others."""
    norm_ids = set()
    for m in model.modules():
        if isinstance(m, _NORM_TYPES):
            norm_ids.update(id(p) for p in m.parameters(recurse=False))
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if id(p) in norm_ids else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": weight_decay_bn})
    return groups


@dataclass
class BatchPlan:
    """How the recipe's global batch maps onto this run (processes × micro-batches)."""

    batch_size: int  # per process, per micro-batch
    world_size: int
    accumulation: int
    lr_factor: float
    iter_factor: float

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size * self.accumulation


def plan_batches(s: SolverConfig, world_size: int) -> BatchPlan:
    g = s.batch_size * world_size
    ref = s.reference_batch_size
    if s.batch_policy == "none" or g == ref:
        return BatchPlan(s.batch_size, world_size, 1, 1.0, 1.0)
    if s.batch_policy == "accumulate":
        if g < ref:
            if ref % g:
                raise ConfigError(
                    f"solver.batch_size: {s.batch_size} × {world_size} processes = {g} does not "
                    f"divide solver.reference_batch_size={ref}; gradient accumulation needs a "
                    "divisor (or use solver.batch_policy=linear)"
                )
            return BatchPlan(s.batch_size, world_size, ref // g, 1.0, 1.0)
        # A larger batch than the recipe: nothing to accumulate, scale the LR linearly.
        return BatchPlan(s.batch_size, world_size, 1, g / ref, 1.0)
    return BatchPlan(s.batch_size, world_size, 1, g / ref, ref / g)


class StepSchedule:
    """LR at an iteration: warm-up, then ``base_lr · gamma^k`` after k steps."""

    def __init__(self, s: SolverConfig, plan: BatchPlan) -> None:
        f = plan.iter_factor
        self.base_lr = s.base_lr * plan.lr_factor
        self.steps = [round(x * f) for x in s.steps]
        self.max_iter = max(1, round(s.max_iter * f))
        self.warmup_iters = round(s.warmup_iters * f)
        self.warmup_factor = s.warmup_factor
        self.gamma = s.gamma

    def lr_at(self, iteration: int) -> float:
        lr = self.base_lr * self.gamma ** bisect.bisect_right(self.steps, iteration)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            lr *= self.warmup_factor * (1 - alpha) + alpha
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "base_lr": self.base_lr,
            "steps": list(self.steps),
            "max_iter": self.max_iter,
            "warmup_iters": self.warmup_iters,
            "warmup_factor": self.warmup_factor,
            "gamma": self.gamma,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The schedule is a pure function of the iteration; restoring keeps a resumed run on the
        # schedule it started with even if the batch plan computed now differs.
        self.base_lr = float(state["base_lr"])
        self.steps = [int(x) for x in state["steps"]]
        self.max_iter = int(state["max_iter"])
        self.warmup_iters = int(state["warmup_iters"])
        self.warmup_factor = float(state["warmup_factor"])
        self.gamma = float(state["gamma"])


class CosineSchedule:
    """LR at an iteration: linear warm-up from ``warmup_factor·base_lr`` over ``warmup_iters``,
    then ``base_lr·(1 + cos(π·p))/2`` with ``p`` going from 0 to 1 between ``warmup_iters`` and
    ``max_iter``. Same interface as :class:`StepSchedule` (batch plan applied the same way)."""

    def __init__(self, s: SolverConfig, plan: BatchPlan) -> None:
        f = plan.iter_factor
        self.base_lr = s.base_lr * plan.lr_factor
        self.max_iter = max(1, round(s.max_iter * f))
        self.warmup_iters = round(s.warmup_iters * f)
        self.warmup_factor = s.warmup_factor

    def lr_at(self, iteration: int) -> float:
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            return self.base_lr * (self.warmup_factor * (1 - alpha) + alpha)
        span = max(1, self.max_iter - self.warmup_iters)
        progress = min(1.0, (iteration - self.warmup_iters) / span)
        return self.base_lr * 0.5 * (1 + math.cos(math.pi * progress))

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "cosine",
            "base_lr": self.base_lr,
            "max_iter": self.max_iter,
            "warmup_iters": self.warmup_iters,
            "warmup_factor": self.warmup_factor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "cosine":
            raise ValueError(f"not a cosine schedule state: {state}")
        self.base_lr = float(state["base_lr"])
        self.max_iter = int(state["max_iter"])
        self.warmup_iters = int(state["warmup_iters"])
        self.warmup_factor = float(state["warmup_factor"])


def build_schedule(s: SolverConfig, plan: BatchPlan) -> StepSchedule | CosineSchedule:
    """The schedule ``solver.schedule`` names."""
    if s.schedule == "step":
        return StepSchedule(s, plan)
    if s.schedule == "cosine":
        return CosineSchedule(s, plan)
    raise ConfigError(f"solver.schedule: expected one of 'step' | 'cosine', got {s.schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float, scale_momentum: bool) -> None:
    """Set the LR of every group. With ``scale_momentum=False`` emulate Caffe2's buffer (which
    holds lr·velocity and is not rescaled) by multiplying PyTorch's buffer by old/new LR."""
    for group in optimizer.param_groups:
        old = group["lr"]
        if not scale_momentum and old != lr and old > 0 and lr > 0:
            for p in group["params"]:
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    buf.mul_(old / lr)
        group["lr"] = lr


def build_optimizer(model: nn.Module, s: SolverConfig, lr: float) -> torch.optim.Optimizer:
    """``solver.optimizer``: SGD (momentum, Nesterov; paper §4.1) or AdamW (default betas); both
    with weight decay except on normalisation layers (:func:`param_groups`)."""
    groups = param_groups(model, s.weight_decay, s.weight_decay_bn)
    if not any(g["params"] for g in groups):
        raise ValueError("the model has no trainable parameters")
    if s.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=s.momentum, nesterov=s.nesterov and s.momentum > 0
        )
    if s.optimizer == "adamw":
        # Each group carries its own weight_decay, so AdamW's default (0.01) is never used.
        return torch.optim.AdamW(groups, lr=lr)
    raise ConfigError(f"solver.optimizer: expected one of 'sgd' | 'adamw', got {s.optimizer!r}")


def is_finite(x: float) -> bool:
    return math.isfinite(x)
