"""Config schema: YAML + base files, key=value overrides, errors that name the key, recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nlnet.config import Config, ConfigError, load_config, read_yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(
    p
    for d in ("kinetics", "charades", "finetune")
    for p in (ROOT / "configs" / d).glob("*.yaml")
    if not p.name.startswith("_")
)


def test_defaults_are_the_paper_recipe() -> None:
    cfg = load_config()
    s = cfg.solver
    assert (s.base_lr, s.momentum, s.nesterov, s.weight_decay, s.weight_decay_bn) == (
        0.01,
        0.9,
        True,
        1e-4,
        0.0,
    )
    assert (s.steps, s.max_iter, s.reference_batch_size) == ([150000, 300000], 400000, 64)
    assert cfg.model.dropout == 0.5 and cfg.task == "classification"


def test_overrides_are_typed(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "solver.base_lr=1",  # an int where a float is expected is converted
            "solver.steps=[10, 20]",
            "train.amp=bf16",
            "data.root=2024",  # a number where a path is expected stays text
            "model.kwargs.temporal_groups=4",
            "model.kwargs.norm=null",
            "model.num_classes=null",
            "train.deterministic=true",
        ],
    )
    assert isinstance(cfg.solver.base_lr, float) and cfg.solver.base_lr == 1.0
    assert cfg.solver.steps == [10, 20] and cfg.train.amp == "bf16" and cfg.data.root == "2024"
    assert cfg.model.kwargs == {"temporal_groups": 4, "norm": None}
    assert cfg.model.num_classes is None and cfg.train.deterministic is True


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("solver.bse_lr=0.1", r"unknown config key 'solver.bse_lr'; did you mean 'solver.base_lr'"),
        ("sover.base_lr=0.1", r"unknown config key 'sover'"),
        ("solver.base_lr=fast", r"solver.base_lr: expected a number, got 'fast'"),
        ("solver.max_iter=1.5", r"solver.max_iter: expected an integer"),
        ("train.amp=fp32", r"train.amp: expected one of 'auto' \| 'none' \| 'bf16' \| 'fp16'"),
        ("solver.nesterov=yes please", r"solver.nesterov: expected true/false"),
        ("solver.steps=[3, 1]", r"solver.steps: expected increasing"),
        ("data.jitter=[320]", r"data.jitter"),
        ("solver.base_lr=-1", r"solver.base_lr: expected a positive value"),
        ("solver.steps=[1, x]", r"solver.steps\[1\]: expected an integer"),
        ("model=3", r"model: expected a mapping"),
        ("novalue", r"expected key=value"),
        (
            "solver.optimizer=adam",
            r"solver.optimizer: expected one of 'sgd' \| 'adamw', got 'adam'",
        ),
        ("solver.schedule=poly", r"solver.schedule: expected one of 'step' \| 'cosine'"),
        ("train.stop_at_val_top1=high", r"train.stop_at_val_top1: expected float \| None"),
        (
            "train.stop_at_val_top1=150",
            r"train.stop_at_val_top1: expected .* percent in \[0, 100\]",
        ),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_base_files_merge_and_cycles(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "solver: {base_lr: 0.5, max_iter: 10}\ndata: {clip_length: 8}\n"
    )
    (tmp_path / "b.yaml").write_text("base: a.yaml\nsolver: {max_iter: 20}\n")
    cfg = load_config(tmp_path / "b.yaml", ["data.clip_length=4"])
    assert (cfg.solver.base_lr, cfg.solver.max_iter, cfg.data.clip_length) == (0.5, 20, 4)
    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "e.yaml").write_text("model: {nmae: c2d_r50}\n")
    with pytest.raises(
        ConfigError, match=r"unknown config key 'model.nmae'; did you mean 'model.name'"
    ):
        load_config(tmp_path / "e.yaml")


def test_recipes_cover_the_paper_rows() -> None:
    names = {p.stem for p in RECIPES}
    for depth in ("r50", "r101"):
        for row in ("baseline", "nl1", "nl5", "nl10"):
            assert f"c2d_{depth}_{row}_32x2" in names
        for row in ("baseline", "nl5"):
            assert f"i3d_{depth}_{row}_32x2" in names
            assert f"i3d_{depth}_{row}_128x1" in names
    assert {
        "c2d_r50_baseline_8x8",
        "i3d_r50_nl5_8x8",
        "i3d_r101_nl5_charades",
        "folder_i3d_r50_nl5",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_builds(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert Path(cfg.train.output_dir).name == path.stem
    if path.stem.endswith("_128x1"):  # paper §5.1: frozen BN, LR 0.0025, 16 clips, 32-frame init
        assert cfg.model.freeze_bn and cfg.solver.base_lr == 0.0025 and cfg.data.clip_length == 128
        assert cfg.solver.reference_batch_size == 16 and "32x2" in cfg.model.init_from
    if "charades" in path.stem:  # paper §5.2
        raw = read_yaml(path)
        assert raw["solver"] == {
            "base_lr": 0.00125,
            "steps": [75000, 150000],
            "max_iter": 200000,
            "batch_size": 1,
            "reference_batch_size": 8,
        }
        assert cfg.data.extra == {"resize_to": 288} and cfg.data.test_scale == 320
    from nlnet.models import create_model, list_models

    assert cfg.model.name in list_models(), f"{path}: unknown model {cfg.model.name}"

    kwargs = dict(cfg.model.kwargs, dropout=cfg.model.dropout)
    with torch.device("meta"):  # checks the builder accepts every keyword, without allocating
        create_model(cfg.model.name, num_classes=cfg.model.num_classes or 10, **kwargs)


def test_cli_stops_before_the_run_on_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from engine_helpers import tiny_config, write_config
    from nlnet.cli import main

    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_config(out))
    assert main(["train", str(cfg), "solver.bse_lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "solver.bse_lr" in err and "solver.base_lr" in err
    # model keywords are checked by building the model before any data or output work
    assert main(["train", str(cfg), "model.kwargs.widht=4", "train.deterministic=false"]) == 2
    err = capsys.readouterr().err
    assert "model.kwargs" in err and "widht" in err
    assert (
        main(["eval", str(cfg), "--checkpoint", str(tmp_path / "none.pt"), "eval.num_clip=3"]) == 2
    )
    assert "eval.num_clip" in capsys.readouterr().err
    assert not out.exists()
