"""Engine options beyond the paper's solver: AdamW, the warm-up + cosine schedule, early stop."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from engine_helpers import TinyVideoNet, tiny_config, write_config
from nlnet.config import ConfigError, load_config
from nlnet.engine.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from nlnet.engine.optim import CosineSchedule, build_optimizer, build_schedule, plan_batches
from nlnet.engine.trainer import Trainer


def _cosine_reference(it: int, base: float, max_iter: int, warm: int, factor: float) -> float:
    """The schedule written out: linear warm-up from factor·base, then half a cosine to 0."""
    if it < warm:
        return base * (factor + (1 - factor) * it / warm)
    t = min(it, max_iter) - warm
    return base / 2 * (1 + math.cos(math.pi * t / (max_iter - warm)))


def test_cosine_schedule_matches_the_formula_and_scales_with_the_batch_plan() -> None:
    over = ["solver.schedule=cosine", "solver.base_lr=0.3", "solver.max_iter=1000"]
    over += ["solver.warmup_iters=100", "solver.warmup_factor=0.2"]
    s = load_config(None, over).solver
    sch = build_schedule(s, plan_batches(s, world_size=8))  # 8 x 8 = 64: the recipe as written
    assert isinstance(sch, CosineSchedule) and sch.max_iter == 1000
    for it in (0, 1, 37, 99, 100, 101, 333, 550, 999, 1000, 1200):
        assert sch.lr_at(it) == pytest.approx(_cosine_reference(it, 0.3, 1000, 100, 0.2), rel=1e-12)
    assert sch.lr_at(0) == pytest.approx(0.06) and sch.lr_at(100) == pytest.approx(0.3)
    assert sch.lr_at(550) == pytest.approx(0.15) and sch.lr_at(1000) == pytest.approx(0, abs=1e-15)
    # Linear scaling rule with 16 clips instead of 64: LR / 4, every iteration count x 4.
    lin = load_config(None, [*over, "solver.batch_policy=linear"]).solver
    small = build_schedule(lin, plan_batches(lin, world_size=2))
    assert small.max_iter == 4000 and small.warmup_iters == 400
    for it in (0, 399, 400, 2200, 3999):
        assert small.lr_at(it) == pytest.approx(_cosine_reference(it, 0.075, 4000, 400, 0.2))
    # The state round-trips (it is stored in checkpoints); a step schedule's is refused.
    restored = build_schedule(load_config(None, ["solver.schedule=cosine"]).solver, small_plan())
    restored.load_state_dict(sch.state_dict())
    assert [restored.lr_at(i) for i in range(0, 1001, 7)] == [
        sch.lr_at(i) for i in range(0, 1001, 7)
    ]
    step = build_schedule(load_config(None, []).solver, small_plan())
    with pytest.raises(ValueError, match="not a cosine schedule"):
        restored.load_state_dict(step.state_dict())


def small_plan() -> Any:
    s = load_config(None, []).solver
    return plan_batches(s, world_size=8)


def test_adamw_uses_the_same_groups_without_decay_on_bn() -> None:
    model = TinyVideoNet()
    s = load_config(None, ["solver.optimizer=adamw", "solver.weight_decay=0.01"]).solver
    opt = build_optimizer(model, s, lr=0.002)
    assert type(opt) is torch.optim.AdamW
    decay, no_decay = opt.param_groups
    assert {id(p) for p in no_decay["params"]} == {id(model.bn.weight), id(model.bn.bias)}
    assert {id(p) for p in decay["params"]} == {
        id(model.conv.weight),
        id(model.fc.weight),
        id(model.fc.bias),
    }
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.9, 0.999) and decay["lr"] == 0.002
    # One step against AdamW's update written out (first step: m̂/√v̂ = sign(g)), decoupled decay.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 8, 8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        wd = 0.0 if n.startswith("bn.") else 0.01
        g = grads[n].double()
        expect = before[n].double() * (1 - 0.002 * wd) - 0.002 * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach().double(), expect, rtol=1e-5, atol=1e-7)
    sgd = build_optimizer(model, load_config(None, []).solver, lr=0.1)
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["nesterov"]


def _trainer(tmp_path: Path, **train: Any) -> Trainer:
    raw = tiny_config(
        tmp_path / "run",
        solver={"max_iter": 12, "steps": [10], "optimizer": "adamw", "schedule": "cosine"},
        train={"checkpoint_period": 100, "keep_checkpoints": 0, **train},
    )
    return Trainer(load_config(write_config(tmp_path / "c.yaml", raw)))


def test_early_stop_ends_the_run_at_the_first_qualifying_validation(tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = _trainer(tmp_path, stop_at_val_top1=50.0)
    # Scripted validation results (percent, as the engine reports them): 40 % at iteration 4,
    # 60 % at 8 (the first that reaches 50 %); the third, 80 % at 12, must never be asked for.
    scores = iter([40.0, 60.0, 80.0])
    trainer.evaluate = lambda: {"video_top1": next(scores), "error": 0.0}  # type: ignore[method-assign]
    result = trainer.run()
    assert result["video_top1"] == 60.0 and trainer.iteration == 8
    assert trainer.early_stop == {
        "iteration": 8,
        "split": "early_stop",
        "video_top1": 60.0,
        "stop_at_val_top1": 50.0,
    }
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["split"]) for r in recs if r["split"] != "train"] == [
        (4, "val"),
        (8, "val"),
        (8, "early_stop"),
    ]
    assert list_checkpoints(out) == [checkpoint_path(out, 8)]  # the stop wrote its checkpoint
    ck = load_checkpoint(checkpoint_path(out, 8))
    assert ck["optimizer_kind"] == "adamw" and ck["schedule"]["kind"] == "cosine"
    assert ck["early_stop"]["video_top1"] == 60.0 and "exp_avg" in str(ck["optimizer"])

    # Rerunning the same command (resume=auto) finds the run finished.
    again = _trainer(tmp_path, stop_at_val_top1=50.0, resume="auto")
    again.run()
    assert again.iteration == 8 and again.early_stop == trainer.early_stop
    # Without the target it resumes AdamW + cosine and trains on to max_iter.
    rest = _trainer(tmp_path, stop_at_val_top1=None, resume="auto")
    rest.run()
    assert rest.iteration == 12 and rest.early_stop is None
    assert checkpoint_path(out, 12).is_file()
    # A checkpoint cannot be resumed with the other optimizer.
    with pytest.raises(ConfigError, match=r"solver\.optimizer: .*'adamw'.*'sgd'"):
        tiny = tiny_config(out, train={"resume": "auto"})
        Trainer(load_config(write_config(tmp_path / "sgd.yaml", tiny))).run()


def test_early_stop_needs_validations_and_a_top1_metric(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.stop_at_val_top1 needs .*eval_period"):
        load_config(None, ["train.stop_at_val_top1=90", "train.eval_period=0"])
    trainer = _trainer(tmp_path, stop_at_val_top1=50.0)
    trainer.evaluate = lambda: {"mAP": 30.0}  # type: ignore[method-assign]
    with pytest.raises(ConfigError, match=r"reports no video_top1 \(it reports \['mAP'\]\)"):
        trainer.run()
