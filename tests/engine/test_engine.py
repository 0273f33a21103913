"""Engine parts against plain references: schedule, optimiser, precise BN, sampling, evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine_helpers import TinyVideoNet
from nlnet import metrics
from nlnet.block import NonLocalBlock
from nlnet.config import ConfigError, load_config
from nlnet.engine.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
)
from nlnet.engine.classification import ClassificationTask, collate_views
from nlnet.engine.optim import StepSchedule, build_optimizer, param_groups, plan_batches, set_lr
from nlnet.engine.precise_bn import update_bn_stats
from nlnet.engine.samplers import ShardSampler, TrainBatchSampler, derive_seed
from nlnet.io import atomic_save
from nlnet.models import FrozenBatchNorm, freeze_batch_norm, load_weights


def test_step_schedule_and_warmup() -> None:
    cfg = load_config(None, ["solver.warmup_iters=10", "solver.warmup_factor=0.1"])
    plan = plan_batches(cfg.solver, world_size=8)  # 8 x 8 = 64: the recipe as written
    sch = StepSchedule(cfg.solver, plan)
    assert sch.lr_at(0) == pytest.approx(0.001)
    assert sch.lr_at(5) == pytest.approx(0.01 * (0.1 * 0.5 + 0.5))
    assert sch.lr_at(10) == pytest.approx(0.01)
    assert sch.lr_at(149999) == pytest.approx(0.01)
    assert sch.lr_at(150000) == pytest.approx(0.001)
    assert sch.lr_at(300000) == pytest.approx(0.0001)
    assert sch.max_iter == 400000


def test_batch_plans() -> None:
    s = load_config().solver  # batch 8 per process, reference 64
    acc = plan_batches(s, world_size=2)
    assert (acc.accumulation, acc.lr_factor, acc.global_batch) == (4, 1.0, 64)
    s.batch_policy = "linear"  # the original 4-GPU runs: batch 32, LR 0.005, 600k... x2
    lin = plan_batches(s, world_size=4)
    sch = StepSchedule(s, lin)
    assert (lin.accumulation, sch.base_lr, sch.max_iter, sch.steps) == (
        1,
        0.005,
        800000,
        [300000, 600000],
    )
    s.batch_policy = "accumulate"
    s.batch_size = 6
    with pytest.raises(ConfigError, match=r"solver\.batch_size"):
        plan_batches(s, world_size=1)


def test_weight_decay_excludes_only_norm_parameters() -> None:
    model = nn.Sequential(TinyVideoNet(), NonLocalBlock(3, dim=3))
    groups = param_groups(model, 1e-4, 0.0)
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    bn = model[0].bn
    assert no_decay == {id(bn.weight), id(bn.bias), id(model[1].bn.weight), id(model[1].bn.bias)}
    # biases outside BN keep weight decay, like the original code (only `_bn` blobs excluded)
    assert id(model[0].fc.bias) in decay and id(model[1].theta.bias) in decay
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0


def test_unscaled_momentum_matches_caffe2_update() -> None:
    """scale_momentum=False reproduces Caffe2's buffer v ← μv + lr·g, p ← p − v, not rescaled."""
    torch.manual_seed(0)
    w0 = torch.randn(5, dtype=torch.float64)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(6)]
    lrs = [0.1, 0.1, 0.1, 0.01, 0.01, 0.001]
    for scale in (True, False):
        p = nn.Parameter(w0.clone())
        opt = torch.optim.SGD([p], lr=lrs[0], momentum=0.9)
        for g, lr in zip(grads, lrs):
            set_lr(opt, lr, scale_momentum=scale)
            p.grad = g.clone()
            opt.step()
        ref, v = w0.clone(), torch.zeros(5, dtype=torch.float64)
        for g, lr in zip(grads, lrs):
            # Caffe2 without rescale keeps lr inside v; PyTorch's v (scaled) is v_c2 / lr_now
            v = 0.9 * v + lr * g if not scale else 0.9 * v + g
            ref -= v if not scale else lr * v
        torch.testing.assert_close(p.detach(), ref)


def test_precise_bn_matches_pooled_statistics(rng: torch.Generator) -> None:
    model = TinyVideoNet(width=4)
    with torch.no_grad():
        model.conv.weight.normal_(generator=rng)
    batches = [
        torch.randn(3, 3, 2, 5, 5, generator=rng, dtype=torch.float32) * (i + 1) for i in range(4)
    ]
    model.train()
    used = update_bn_stats(model, batches, lambda m, b: m(b), num_batches=3)
    assert used == 3
    feats = [model.conv(b).double() for b in batches[:3]]
    mean = torch.stack([f.mean(dim=(0, 2, 3, 4)) for f in feats]).mean(0)
    meansq = torch.stack([(f * f).mean(dim=(0, 2, 3, 4)) for f in feats]).mean(0)
    torch.testing.assert_close(model.bn.running_mean, mean.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        model.bn.running_var, (meansq - mean**2).float(), rtol=1e-5, atol=1e-6
    )


def test_frozen_bn_keeps_statistics_and_affine(rng: torch.Generator) -> None:
    model = TinyVideoNet()
    with torch.no_grad():
        model.bn.running_mean.uniform_(generator=rng)
        model.bn.weight.uniform_(generator=rng)
    x = torch.randn(2, 3, 2, 4, 4, generator=rng)
    expected = model.eval()(x)
    freeze_batch_norm(model)  # the one frozen-BN mechanism: BN folded into a fixed affine
    assert isinstance(model.bn, FrozenBatchNorm)
    torch.testing.assert_close(model(x), expected)  # eval-mode BN, exactly
    before = {k: v.clone() for k, v in model.bn.state_dict().items()}
    opt = build_optimizer(model, load_config().solver, 0.1)
    assert all(p is not model.bn.weight for g in opt.param_groups for p in g["params"])
    model.train()
    model(x).sum().backward()
    opt.step()
    for k, v in model.bn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_sampler_splits_the_global_batch_across_ranks_and_micro_batches() -> None:
    one = TrainBatchSampler(10, 2, seed=7, world_size=1, accumulation=2)
    ranks = [TrainBatchSampler(10, 2, seed=7, rank=r, world_size=2) for r in range(2)]
    for it in range(7):  # crosses epochs: each epoch is a permutation
        assert one.batch(it, 0) + one.batch(it, 1) == ranks[0].batch(it, 0) + ranks[1].batch(it, 0)
    stream = iter(one)
    first = [next(stream) for _ in range(10)]
    idx = [i for b in first for i, _ in b]
    assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:20]) == list(range(10))
    assert len({s for b in first for _, s in b}) == 20  # a fresh augmentation seed per sample
    resumed = iter(TrainBatchSampler(10, 2, seed=7, start_iter=3, accumulation=2))
    assert [next(resumed) for _ in range(4)] == first[6:10]
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(1, 2, 4)


def test_shard_sampler_covers_every_item_once() -> None:
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))


def test_checkpoint_write_is_atomic_and_found(tmp_path: Path) -> None:
    for it in (5, 10):
        atomic_save(
            {"iteration": it, "w": torch.arange(3)}, tmp_path / "checkpoints" / f"iter_{it:08d}.pt"
        )
    assert latest_checkpoint(tmp_path).name == "iter_00000010.pt"
    assert load_checkpoint(latest_checkpoint(tmp_path))["iteration"] == 10
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))


class _NLTiny(TinyVideoNet):
    """The tiny network plus a non-local block: the 'NL model' of a baseline."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)
        self.nl = NonLocalBlock(6, dim=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.nl(torch.relu(self.bn(self.conv(x))))
        return self.fc(self.pool(x).flatten(1))


def test_nl_model_from_baseline_keeps_identity_blocks(rng: torch.Generator) -> None:
    base = TinyVideoNet()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(generator=rng)
    nl = _NLTiny()
    report = load_weights(nl, base.state_dict())
    assert set(report.loaded) == set(base.state_dict()) - {
        k for k in base.state_dict() if k.endswith("num_batches_tracked")
    }
    assert report.nonlocal_identity == ["nl"] and not report.missing
    x = torch.randn(2, 3, 4, 6, 6, generator=rng)
    base.eval()
    nl.eval()
    torch.testing.assert_close(nl(x), base(x))
    other = TinyVideoNet(num_classes=5)  # fine-tuning on other classes: classifier skipped
    rep = load_weights(other, base.state_dict())
    assert sorted(m[0] for m in rep.mismatched) == ["fc.bias", "fc.weight"]


class _FixedScores(nn.Module):
    """'Model' returning the logits stored for each clip (clip[0, 0, 0, :C] holds them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, 0, :]


def _views(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> list[dict]:
    items = []
    v, k, c = logits.shape
    for i in range(v):
        for j in range(k):
            clip = torch.zeros(3, 1, 1, c)
            clip[0, 0, 0] = logits[i, j]
            items.append(
                {
                    "clip": clip,
                    "target": targets[i],
                    "index": i,
                    "view": j,
                    "valid": bool(valid[i, j]),
                }
            )
    return items


@pytest.mark.parametrize("multi", [False, True])
def test_evaluation_aggregates_views_like_the_protocol(
    tmp_path: Path, rng: torch.Generator, multi: bool
) -> None:
    nv, nk, nc = 9, 4, 6
    logits = torch.randn(nv, nk, nc, generator=rng, dtype=torch.float64)
    valid = torch.ones(nv, nk, dtype=torch.bool)
    valid[2, 1] = False  # one undecodable view
    valid[5] = False  # an unreadable video
    if multi:
        targets = (torch.rand(nv, nc, generator=rng) < 0.4).float()
    else:
        targets = torch.randint(0, nc, (nv,), generator=rng)
    items = _views(logits.float(), targets, valid)
    cfg = load_config(None, ["eval.aggregate=max"])
    task = ClassificationTask(cfg)
    task.multi_label = multi
    batches = [collate_views(items[i : i + 5]) for i in range(0, len(items), 5)]
    out = task.evaluate(
        _FixedScores(), batches + batches[:1], torch.device("cpu"), tmp_path
    )  # a repeat is ignored
    assert (
        out["num_videos"],
        out["num_views"],
        out["invalid_views"],
        out["unreadable_videos"],
    ) == (9, 36, 5, 1)
    lf = logits.float().double()
    if multi:
        p = torch.sigmoid(lf).masked_fill(~valid[..., None], -1).amax(1).clamp_min(0)
        p[5] = 0
        assert out["mAP"] == pytest.approx(
            metrics.mean_average_precision(p.numpy(), targets.numpy()), abs=1e-4
        )
        assert len((tmp_path / "submission.txt").read_text().splitlines()) == nv
    else:
        p = (torch.softmax(lf, -1) * valid[..., None]).sum(1) / valid.sum(1).clamp_min(1)[:, None]
        ok = p.argmax(1) == targets
        ok[5] = False
        assert out["video_top1"] == pytest.approx(100 * ok.double().mean().item())
        clip_ok = (lf.argmax(-1) == targets[:, None])[valid]
        assert out["clip_top1"] == pytest.approx(100 * clip_ok.double().mean().item())
        top5 = p.topk(5, 1).indices
        ok5 = (top5 == targets[:, None]).any(1)
        ok5[5] = False
        assert out["video_top5"] == pytest.approx(100 * ok5.double().mean().item())
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["unreadable_video_ids"] == ["5"] and "wrong" in report["unreadable_policy"]
    preds = [json.loads(ln) for ln in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == nv and preds[5]["readable"] is False
    if not multi:
        np.testing.assert_allclose(
            preds[0]["top5_scores"], p[0].sort(descending=True).values[:5].numpy(), atol=1e-5
        )


def test_full_frame_views_of_different_sizes_are_scored_one_by_one() -> None:
    """eval.test_crop=full: clips keep each video's frame size, so a batch is a list."""
    torch.manual_seed(0)
    model = TinyVideoNet().eval()
    items = [
        {
            "clip": torch.randn(3, 2, 6, 8),
            "target": torch.tensor(0),
            "index": 0,
            "view": 0,
            "valid": True,
        },
        {
            "clip": torch.randn(3, 2, 8, 6),
            "target": torch.tensor(1),
            "index": 1,
            "view": 0,
            "valid": True,
        },
    ]
    batch = collate_views(items)
    assert isinstance(batch["clip"], list)
    task = ClassificationTask(load_config())
    task.multi_label = False
    out = task.evaluate(model, [batch], torch.device("cpu"), None)
    with torch.no_grad():
        p = torch.cat([torch.softmax(model(it["clip"][None]), 1) for it in items])
    assert out["video_top1"] == pytest.approx(
        100 * (p.argmax(1) == torch.tensor([0, 1])).double().mean().item()
    )
    assert out["num_views"] == 2


def test_task_builds_model_from_checkpoint_and_freezes_bn(
    tmp_path: Path, rng: torch.Generator
) -> None:
    src = TinyVideoNet(num_classes=3)
    with torch.no_grad():
        for t in src.state_dict().values():
            t.copy_(torch.rand(t.shape, generator=rng) * 10 if t.is_floating_point() else t)
    atomic_save(
        {"nlnet_checkpoint": 1, "model": src.state_dict(), "iteration": 9}, tmp_path / "k.pt"
    )
    atomic_save({"state_dict": src.state_dict()}, tmp_path / "plain.pt")
    for ck in ("k.pt", "plain.pt"):
        cfg = load_config(
            None,
            [
                "model.name=engine_test_net",
                "model.num_classes=5",
                f"model.init_from={tmp_path / ck}",
                "model.freeze_bn=true",
            ],
        )
        task = ClassificationTask(cfg)
        model = task.build_model()
        assert torch.equal(model.conv.weight, src.conv.weight)
        assert isinstance(model.bn, FrozenBatchNorm)  # the statistics are folded in
        folded = src.bn.weight / torch.sqrt(src.bn.running_var + src.bn.eps)
        torch.testing.assert_close(model.bn.weight, folded)
        assert not torch.equal(
            model.fc.bias[:3], src.fc.bias
        )  # a 5-class classifier: re-initialised
        assert sorted(m[0] for m in task.init_report.mismatched) == [
            "fc.bias",
            "fc.weight",
        ]
        assert not model.bn.weight.requires_grad and model.conv.weight.requires_grad
        assert not any(p is model.bn.weight for p in model.parameters())
    bad = ClassificationTask(
        load_config(
            None, ["model.name=engine_test_net", "model.num_classes=3", "model.kwargs.depth=3"]
        )
    )
    with pytest.raises(ConfigError, match=r"model\.kwargs.*depth"):
        bad.build_model()
