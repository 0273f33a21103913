"""``nlnet demo --quick`` end to end (the CI smoke run), early stopping, and the demo models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import nlnet
from nlnet.block import NonLocalBlock
from nlnet.models import VideoResNet

ROOT = Path(__file__).resolve().parents[1]


def test_demo_models() -> None:
    counts = {}
    for name in ("demo_c2d", "demo_c2d_nl", "demo_i3d"):
        model = nlnet.create_model(name, num_classes=2)
        assert isinstance(model, VideoResNet)  # the library's own network, not a copy
        counts[name] = sum(p.numel() for p in model.parameters())
        assert model(torch.randn(2, 3, 8, 32, 32)).shape == (2, 2)
    # The C2D + NL network is the C2D network plus exactly one block's parameters.
    block = NonLocalBlock(32)
    assert counts["demo_c2d_nl"] - counts["demo_c2d"] == sum(p.numel() for p in block.parameters())
    assert 78_000 < counts["demo_c2d"] < 79_000 and counts["demo_i3d"] > 1.6 * counts["demo_c2d"]
    nl = nlnet.create_model("demo_c2d_nl", num_classes=2)
    blocks = {n: m for n, m in nl.named_modules() if isinstance(m, NonLocalBlock)}
    (block,) = blocks.values()
    assert list(blocks) == ["res3.nonlocal0"] and block.pairwise == "embedded_gaussian"
    # The demo's from-scratch init (DEMO_NONLOCAL): BN gamma = 1, weights N(0, 0.2^2).
    assert torch.equal(block.bn.weight, torch.ones(32)) and 0.1 < block.theta.weight.std() < 0.3
    assert nl.stem.conv.stride == (1, 4, 4) and nl.stem.conv.kernel_size == (1, 5, 5)
    i3d = nlnet.create_model("demo_i3d", num_classes=2)
    assert i3d.res2[0].conv_a.kernel_size == (3, 3, 3)
    assert nlnet.create_model("demo_c2d", num_classes=2).res2[0].conv_a.kernel_size == (1, 3, 3)
    moved = nlnet.create_model(
        "demo_c2d_nl", num_classes=2, pairwise="embedded_gaussian", nonlocal_blocks={4: [0]}
    )
    assert [n for n, m in moved.named_modules() if isinstance(m, NonLocalBlock)] == [
        "res4.nonlocal0"
    ]
    with pytest.raises(ValueError, match="no released weights"):
        nlnet.create_model("demo_c2d", num_classes=2, pretrained="x.pt")


def test_c2d_frames_do_not_interact() -> None:
    """C2D's premise: a change in one frame changes the pooled features only through that
    frame, so the logit is additive over frames (what makes the task impossible for it)."""
    torch.manual_seed(0)
    c2d = nlnet.create_model("demo_c2d", num_classes=2).eval()
    nl = nlnet.create_model("demo_c2d_nl", num_classes=2).eval()
    with torch.no_grad():
        block = dict(nl.named_modules())["res3.nonlocal0"]
        block.bn.weight.fill_(1.0)  # switch the (identity-initialised) block on
        for conv in (block.theta, block.phi, block.g, block.out):
            conv.weight.normal_(std=0.5)
        base = torch.randn(1, 3, 8, 32, 32)
        a, b = base.clone(), base.clone()
        a[:, :, 1] += torch.randn(1, 3, 32, 32)
        b[:, :, 6] += torch.randn(1, 3, 32, 32)
        both = a.clone()
        both[:, :, 6] = b[:, :, 6]
        for f, additive in ((c2d, True), (nl, False)):
            gap = f(both) - f(a) - f(b) + f(base)  # zero iff the effects of frames 1 and 6 add up
            assert (gap.abs().max() < 1e-4) == additive, gap


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("nlnet.engine.trainer", reason="the training engine is not installed")
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "nlnet", "demo", "--quick", "--i3d", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,  # generous: the machine may be shared
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "C2D + 1 NL block" in proc.stdout and "val top-1" in proc.stdout
    return out


@pytest.mark.slow
def test_quick_demo_writes_everything(quick_demo: Path) -> None:
    metrics = json.loads((quick_demo / "metrics.json").read_text())
    for key in ("baseline", "nonlocal", "i3d"):
        m = metrics[key]
        assert 0.0 <= m["val_top1"] <= 1.0 and 0.0 <= m["test_top1"] <= 1.0
        assert m["iterations"] == m["max_iter"] == 8 and not m["stopped_early"]
        run_dir = quick_demo / key
        assert (run_dir / "metrics.jsonl").is_file() and (
            run_dir / "test" / "metrics.json"
        ).is_file()
        # val_top1 is the engine's last validation record, as a fraction.
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert recs[-1]["split"] == "val" and recs[-1]["video_top1"] / 100 == m["val_top1"]
    assert metrics["i3d"]["params"] > metrics["nonlocal"]["params"] > metrics["baseline"]["params"]
    # Default optimiser: the engine's AdamW with the warm-up + cosine schedule (the recipes'
    # solver.optimizer/solver.schedule), saved in the checkpoint.
    ck = torch.load(next((quick_demo / "nonlocal" / "checkpoints").glob("*.pt")), weights_only=True)
    assert ck["schedule"]["kind"] == "cosine" and "exp_avg" in str(ck["optimizer"])
    assert ck["optimizer_kind"] == "adamw" and ck["config"]["train"]["stop_at_val_top1"] == 95.0
    # The baseline's budget is the non-local run's iterations, without early stopping.
    ck = torch.load(next((quick_demo / "baseline" / "checkpoints").glob("*.pt")), weights_only=True)
    assert ck["config"]["train"]["stop_at_val_top1"] is None
    assert ck["config"]["solver"]["max_iter"] == metrics["nonlocal"]["iterations"]
    assert metrics["quick"] is True and metrics["attention"]["block"] == "res3.nonlocal0"
    assert metrics["threads"]["chosen"] in (1, torch.get_num_threads())
    for name in ("curves.png", "attention.png", "attention_heatmap.png"):
        img = Image.open(quick_demo / name)
        img.verify()
        assert img.format == "PNG" and min(img.size) > 100
    report = (quick_demo / "report.md").read_text()
    for link in ("curves.png", "attention.png", "attention_heatmap.png", "| C2D (`demo_c2d`)"):
        assert link in report


@pytest.mark.slow
def test_early_stopping(tmp_path: Path) -> None:
    pytest.importorskip("nlnet.engine.trainer", reason="the training engine is not installed")
    from nlnet.demo import (
        QUICK_OVERRIDES,
        default_config_dir,
        engine_overrides,
        load_recipes,
        train_one,
    )

    # Any accuracy reaches a target of 0: the engine's train.stop_at_val_top1 ends the run at
    # its first evaluation (iteration 4) and writes the checkpoint there.
    overrides = [*engine_overrides(0.0, "sgd"), *QUICK_OVERRIDES]
    cfg = load_recipes(["baseline"], default_config_dir(), tmp_path, overrides)["baseline"]
    result = train_one("baseline", cfg)
    assert result.stopped_early and result.iterations == 4 and result.max_iter == 8
    checkpoint = tmp_path / "baseline" / "checkpoints"
    (path,) = checkpoint.glob("*.pt")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    assert ck["iteration"] == 4 and "4" in path.name
    # The run's history is kept in memory and equals what the engine wrote to metrics.jsonl.
    recs = [
        json.loads(x) for x in (tmp_path / "baseline" / "metrics.jsonl").read_text().splitlines()
    ]
    assert recs == result.history
    assert [(r["split"], r["iteration"]) for r in recs[-2:]] == [("val", 4), ("early_stop", 4)]
    assert result.val_top1 == recs[-2]["video_top1"] / 100
    # SGD: the engine's optimiser and step schedule were kept.
    assert "momentum_buffer" in str(ck["optimizer"]) and ck["schedule"].get("kind") is None
    assert ck["optimizer_kind"] == "sgd" and ck["config"]["solver"]["schedule"] == "step"


@pytest.mark.slow
def test_missed_target_exits_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An impossible target (the non-local model at 100 % and C2D at 0 % on val and test)."""
    pytest.importorskip("nlnet.engine.trainer", reason="the training engine is not installed")
    from nlnet.cli import main

    args = ["demo", "--quick", "--threads", "1", "--out", str(tmp_path)]
    assert main([*args, "--nonlocal-min", "1", "--baseline-max", "0"]) == 1
    out = capsys.readouterr().out
    assert "NOT met" in out and "nonlocal_val" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["accuracy_targets_met"] is False and metrics["threads"]["how"] == "given"
    assert metrics["targets"] == {"nonlocal_min": 1.0, "baseline_max": 0.0}
    assert "**not met**" in (tmp_path / "report.md").read_text()


def test_judge() -> None:
    from nlnet.demo import DemoRun, Targets, judge

    def run(val: float, test: float) -> DemoRun:
        return DemoRun("k", "k", "m", torch.nn.Identity(), None, [], val, test, 1, 1, False, 0, 0)

    targets = Targets(nonlocal_min=0.9, baseline_max=0.65)
    assert judge({"nonlocal": run(0.95, 0.93), "baseline": run(0.5, 0.65)}, targets)["all"]
    missed = judge({"nonlocal": run(0.95, 0.89), "baseline": run(0.66, 0.5)}, targets)
    assert not missed["all"] and not missed["nonlocal_test"] and not missed["baseline_val"]
    assert missed["nonlocal_val"] and missed["baseline_test"]


def test_demo_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nlnet.cli import main

    assert main(["demo", "--target", "1.5", "--out", str(tmp_path)]) == 2
    assert "--target" in capsys.readouterr().err
    pytest.importorskip("nlnet.engine.trainer", reason="the training engine is not installed")
    assert main(["demo", "--quick", "--configs", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


def test_choose_threads_measures() -> None:
    """The faster count wins, whatever the load average says; the slow one is not re-timed."""
    from nlnet.demo import choose_threads

    before = torch.get_num_threads()
    now = [0.0]
    calls: dict[int, int] = {}

    def fake_clock(cost: dict[int, float]) -> tuple:
        def step() -> None:
            n = torch.get_num_threads()
            calls[n] = calls.get(n, 0) + 1
            now[0] += cost[n]

        return step, lambda: now[0]

    try:
        # A competing process: two threads keep being descheduled (10x slower).
        step, clock = fake_clock({1: 0.1, 2: 1.0})
        choice = choose_threads(step, [1, 2], clock=clock)
        assert choice.threads == 1 and torch.get_num_threads() == 1
        assert choice.seconds_per_step == {1: pytest.approx(0.1), 2: pytest.approx(1.0)}
        assert calls == {1: 4, 2: 1}  # warm-up + 3 rounds for 1 thread, one step for 2
        # An idle machine: every core helps.
        calls.clear()
        step, clock = fake_clock({1: 0.1, 2: 0.06})
        assert choose_threads(step, [1, 2], clock=clock).threads == 2
        assert torch.get_num_threads() == 2 and calls == {1: 4, 2: 3}
        with pytest.raises(ValueError, match="positive thread counts"):
            choose_threads(step, [0, 2], clock=clock)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("amp", "layout"), [("bf16", "channels_last"), ("none", "contiguous")])
def test_the_timed_step_runs_as_nlnet_train_runs_it(tmp_path: Path, amp: str, layout: str) -> None:
    """The thread choice times the step the trainings will run: the same autocast and weight
    layout (``train.amp``, ``train.memory_format``), and a real backward."""
    from nlnet.demo import QUICK_OVERRIDES, default_config_dir, load_recipes, training_step_fn

    overrides = [*QUICK_OVERRIDES, f"train.amp={amp}", f"train.memory_format={layout}"]
    cfg = load_recipes(["nonlocal"], default_config_dir(), tmp_path, overrides)["nonlocal"]
    convs: dict[torch.nn.Module, torch.dtype] = {}

    def record(m: torch.nn.Module, _: object, out: torch.Tensor) -> None:
        if isinstance(m, torch.nn.Conv3d):
            convs[m] = out.dtype

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        training_step_fn(cfg)()
    finally:
        handle.remove()
    dtypes = list(convs.values())
    if amp == "bf16":  # (convolutions whose kernel exceeds their input run in float32: conv.py)
        assert dtypes.count(torch.bfloat16) > len(dtypes) // 2
    else:
        assert dtypes and set(dtypes) == {torch.float32}
    fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format
    for conv in convs:
        assert conv.weight.is_contiguous(memory_format=fmt)
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
