"""End-to-end runs of the engine on the tiny model/data: resume, signals, NaN, broken videos, DDP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_helpers import tiny_config, write_config
from nlnet.cli import main
from nlnet.engine.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

HELPER = str(Path(__file__).resolve().parents[1] / "engine_helpers.py")


def _assert_same_state(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path: Path) -> None:
    full = tmp_path / "full"
    cfg = write_config(tmp_path / "c.yaml", tiny_config(full))
    assert main(["train", str(cfg)]) == 0
    # Interrupted after iteration 4: the run directory as a preempted job would leave it.
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "iter_00000004.pt", part / "checkpoints")
    # metrics.jsonl holds records after iteration 4 and a line cut short by the kill
    (part / "metrics.jsonl").write_text(
        (full / "metrics.jsonl").read_text() + '{"iteration": 9, "sp'
    )
    # ... resumed with a different number of loader workers: the data stream must not change.
    assert main(["train", str(cfg), f"train.output_dir={part}", "data.num_workers=1"]) == 0
    a = load_checkpoint(full / "checkpoints" / "iter_00000008.pt")
    b = load_checkpoint(part / "checkpoints" / "iter_00000008.pt")
    for key in ("model", "optimizer", "iteration"):
        _assert_same_state(a[key], b[key], key)
    assert a["iteration"] == 8
    # the model moved away from its state at iteration 4
    mid = load_checkpoint(full / "checkpoints" / "iter_00000004.pt")
    assert not torch.equal(mid["model"]["fc.weight"], a["model"]["fc.weight"])

    def recs(d: Path) -> list[dict]:
        return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]

    ra, rb = recs(full), recs(part)
    assert [r["iteration"] for r in ra] == [r["iteration"] for r in rb]
    assert [r.get("loss") for r in ra] == [r.get("loss") for r in rb]


@pytest.mark.slow
def test_sigterm_writes_a_loadable_checkpoint_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    raw = tiny_config(
        out,
        solver={"max_iter": 100000, "steps": [50000]},
        train={"log_period": 1, "checkpoint_period": 100000},
        data={"num_workers": 1},
    )
    cfg = write_config(tmp_path / "c.yaml", raw)
    # Its own process group, signalled as a whole (as a cluster scheduler does): the loader
    # worker must leave the signal to the main process.
    proc = subprocess.Popen(
        [sys.executable, HELPER, "train", str(cfg)],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 90
        while not (
            (out / "metrics.jsonl").is_file()
            and (out / "metrics.jsonl").read_text().count("\n") >= 2
        ):
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "checkpoint" in err and "Traceback" not in err
    path = latest_checkpoint(out)
    assert path is not None
    ck = load_checkpoint(path)  # weights_only load
    it = ck["iteration"]
    assert it >= 2 and path.name == f"iter_{it:08d}.pt"
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert main(["train", str(cfg), f"solver.max_iter={it + 2}"]) == 0
    assert load_checkpoint(latest_checkpoint(out))["iteration"] == it + 2


def test_non_finite_loss_stops_with_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    raw = tiny_config(
        out,
        data={"extra": {"poison": 3, "num_videos": 24}},
        solver={"max_iter": 12},
        train={
            "checkpoint_period": 1,
            "keep_checkpoints": 0,
            "eval_period": 100,
            "precise_bn_batches": 0,
        },
    )
    cfg = write_config(tmp_path / "c.yaml", raw)
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "training loss is nan at iteration" in err
    failed_at = int(err.split("at iteration ")[1].split()[0])
    kept = list_checkpoints(out)
    assert len(kept) == failed_at  # one per completed iteration, none for the failing one
    if kept:
        assert str(kept[-1]) in err
        ck = load_checkpoint(kept[-1])
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_broken_videos_train_and_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    raw = tiny_config(out, data={"extra": {"broken": [1, 4]}}, train={"eval_period": 100})
    cfg = write_config(tmp_path / "c.yaml", raw)
    assert main(["train", str(cfg)]) == 0
    val = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert val and val[-1]["unreadable_videos"] == 2
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    capsys.readouterr()
    ck = latest_checkpoint(out)
    assert main(["eval", str(cfg), "--checkpoint", str(ck), "eval.num_clips=3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / f"eval_{ck.stem}" / "metrics.json").read_text())
    assert printed["num_views"] == report["num_views"] == 36
    assert report["invalid_views"] == 6 and report["unreadable_video_ids"] == [
        "video001",
        "video004",
    ]
    assert report["video_top1"] <= 100 * 10 / 12 + 1e-9  # the unreadable videos count as wrong
    preds = (out / f"eval_{ck.stem}" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 12
    assert not torch.are_deterministic_algorithms_enabled()  # the run's switches were restored


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path: Path) -> None:
    # No dropout: its masks come from each process's own random stream (the data are identical).
    common = {
        "solver": {"batch_size": 2, "reference_batch_size": 4, "max_iter": 6, "steps": [4]},
        "model": {"name": "engine_test_net", "num_classes": 3, "dropout": 0.0},
    }
    one = tmp_path / "one"
    cfg = write_config(
        tmp_path / "c.yaml",
        # float32: bf16 rounds the weights' copies, so the two runs' 1e-7 differences in
        # gradient summation order would flip bf16 roundings and grow far beyond 1e-5.
        tiny_config(one, train={"checkpoint_period": 6, "eval_period": 6, "amp": "none"}, **common),
    )
    assert main(["train", str(cfg)]) == 0  # 1 process x 2 clips x 2 accumulation
    two = tmp_path / "two"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        HELPER,
        "train",
        str(cfg),
        f"train.output_dir={two}",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_checkpoint(latest_checkpoint(one))
    b = load_checkpoint(latest_checkpoint(two))
    assert (
        a["iteration"] == b["iteration"] == 6
        and b["world_size"] == 2
        and a["global_batch"] == b["global_batch"]
    )
    for k, v in a["model"].items():
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # running statistics: rank 0's batches under DDP; parameters must agree
        torch.testing.assert_close(b["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert len(b["rng"]) == 2

    def val(d: Path) -> dict:
        return [
            json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"val"' in x
        ][-1]

    assert val(two)["num_views"] == val(one)["num_views"] == 12  # every video once across ranks


def test_bf16_autocast_run_and_fp16_needs_cuda(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    raw = tiny_config(
        out, solver={"max_iter": 4, "steps": [3]}, train={"amp": "bf16", "eval_period": 0}
    )
    cfg = write_config(tmp_path / "c.yaml", raw)
    assert main(["train", str(cfg)]) == 0
    ck = load_checkpoint(latest_checkpoint(out))
    assert (
        ck["iteration"] == 4 and ck["model"]["fc.weight"].dtype == torch.float32
    )  # fp32 master weights
    train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert train and all(r["split"] == "train" for r in train)  # eval_period=0: no validation
    assert all(np.isfinite(r["loss"]) for r in train)
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert (
            main(["train", str(cfg), "train.amp=fp16", f"train.output_dir={tmp_path / 'x'}"]) == 2
        )
        assert "train.amp" in capsys.readouterr().err


class _ToyRegression:
    """A non-video task through the same trainer: the engine is generic over the Task protocol."""

    def __init__(self, cfg: object) -> None:
        self.cfg = cfg

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(3, 1)

    def build_dataset(self, split: str) -> torch.utils.data.Dataset:
        class _Points(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return 16

            def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
                i = key[0] if isinstance(key, tuple) else key
                x = torch.randn(3, generator=torch.Generator().manual_seed(i))
                return x, x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3

        return _Points()

    def collate_fn(self) -> None:
        return None

    def training_step(self, model, batch, device):  # type: ignore[no-untyped-def]
        x, y = (t.to(device) for t in batch)
        loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y)
        return loss, {"loss": float(loss.detach())}

    def evaluate(self, model, batches, device, out_dir):  # type: ignore[no-untyped-def]
        errs = [
            torch.nn.functional.mse_loss(model(x).squeeze(1), y, reduction="sum")
            for x, y in batches
        ]
        return {"error": float(sum(errs)) / 16}


def test_trainer_runs_any_registered_task(tmp_path: Path) -> None:
    from nlnet.engine import register_task

    register_task("toy_regression_test")(_ToyRegression)
    out = tmp_path / "run"
    raw = tiny_config(
        out, solver={"max_iter": 80, "steps": [70], "base_lr": 0.1, "weight_decay": 0.0}
    )
    raw["task"] = "toy_regression_test"
    raw["train"].update({"eval_period": 20, "checkpoint_period": 80, "log_period": 10})
    raw["eval"]["batch_size"] = 16
    cfg = write_config(tmp_path / "c.yaml", raw)
    assert main(["train", str(cfg)]) == 0
    val = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert [v["iteration"] for v in val] == [20, 40, 60, 80]
    assert val[-1]["error"] < 1e-3 and val[-1]["error"] < val[0]["error"] / 10  # it learned the map
    w = load_checkpoint(latest_checkpoint(out))["model"]["weight"]
    torch.testing.assert_close(w, torch.tensor([[1.0, -2.0, 0.5]]), atol=0.05, rtol=0)


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.compile wraps the model with torch.compile; checkpoints keep plain parameter names.
    (Dynamo's "eager" backend keeps the test fast; inductor is the default in real runs.)"""
    overrides = {"solver": {"max_iter": 3, "steps": [2]}, "train": {"eval_period": 0}}
    eager = tmp_path / "eager"
    cfg = write_config(tmp_path / "c.yaml", tiny_config(eager, **overrides))
    assert main(["train", str(cfg)]) == 0
    calls: list[torch.nn.Module] = []
    real_compile = torch.compile

    def eager_compile(model: torch.nn.Module) -> torch.nn.Module:
        calls.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    compiled = tmp_path / "compiled"
    assert main(["train", str(cfg), "train.compile=true", f"train.output_dir={compiled}"]) == 0
    assert len(calls) == 1
    a = load_checkpoint(latest_checkpoint(eager))["model"]
    b = load_checkpoint(latest_checkpoint(compiled))["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
