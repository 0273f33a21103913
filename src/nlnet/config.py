"""Typed configuration for training and evaluation (the recipes of paper §4.1–4.3 as data).

A config is a tree of dataclasses (:class:`Config`). It is read from YAML (a file may name a
``base`` file, relative to itself, whose values it overrides) and then patched with
``key=value`` overrides from the command line (``solver.base_lr=0.005``). Every key and every
value type is checked before anything runs: an unknown key or a wrong type raises
:class:`ConfigError` naming the key. Free-form sections (``model.kwargs``, ``data.extra``) are
passed to the model/dataset builders, which validate them when the engine builds them, still
before any training work.

Modelling code never reads this object: the tasks translate it into explicit builder arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key is unknown, or its value has the wrong type or an invalid value."""


@dataclass
class ModelConfig:
    """Which network to build (``nlnet.models.create_model``) and how to initialise it."""

    name: str = "c2d_r50"
    #: None: taken from the training data set (``dataset.num_classes``).
    num_classes: int | None = None
    #: ImageNet weights to inflate (paper §4: "initialised from ImageNet"), given to create_model.
    pretrained: str | None = None
    #: A checkpoint whose matching weights initialise the model (baseline → NL model, Kinetics →
    #: fine-tuning). Names absent from it (e.g. non-local blocks) keep their own (identity) init;
    #: tensors whose shape differs (e.g. a classifier over other classes) are skipped and reported.
    init_from: str | None = None
    #: Refuse ``init_from`` weights made for other model settings (variant, pairwise, ...; they
    #: would compute something else). ``false`` to initialise from another layout on purpose.
    init_check_settings: bool = True
    #: Dropout before the classifier (paper §4.1: 0.5), passed to the model builder.
    dropout: float | None = 0.5
    #: Freeze the backbone's BatchNorm: running statistics and γ/β folded into fixed affines
    #: (FrozenBatchNorm; the 128-frame recipe, paper §5.1 / Table 2g). Non-local blocks keep a
    #: trainable BN (frozen, its γ = 0 would keep every NL gradient at exactly zero).
    freeze_bn: bool = False
    #: Further keyword arguments for the model builder, passed verbatim (variant, inflate,
    #: pairwise, extent, temporal_groups, norm, backend, ...).
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Which data set to build (``nlnet.data.build_dataset``) and how to sample clips (§4.1)."""

    name: str = "kinetics"
    #: Training videos (or images) and annotation file.
    root: str | None = None
    annotations: str | None = None
    #: Validation/test videos and annotation file; ``val_root`` None means ``root``.
    val_root: str | None = None
    val_annotations: str | None = None
    #: Frames per clip and the step between them (32×2 = 32 frames out of 64, paper §4.1).
    clip_length: int = 32
    sampling_rate: int = 2
    crop_size: int = 224
    #: Shorter side rescaled to a random value in [lo, hi] for training (paper §4.1: [256, 320]).
    jitter: list[int] = field(default_factory=lambda: [256, 320])
    #: Shorter side at test time (paper §4.2: 256).
    test_scale: int = 256
    normalization: Literal["original", "imagenet"] = "original"
    target_fps: float | None = None
    max_retries: int = 10
    #: Where the data set writes the list of unreadable videos (None: the data set's default).
    missing_report: str | None = None
    #: Class names (None: from the annotations / folders).
    classes: list[str] | None = None
    #: DataLoader worker processes per training process.
    num_workers: int = 4
    #: Further keyword arguments for the data set builder, passed verbatim.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SolverConfig:
    """Optimiser and schedule (paper §4.1; code values from the original ``configs/*.yaml``)."""

    #: "sgd": the paper's SGD (``momentum``, ``nesterov``); "adamw": AdamW with PyTorch's default
    #: betas (``momentum``/``nesterov`` unused). Both: ``weight_decay``, none on normalisation
    #: layers (``weight_decay_bn``).
    optimizer: Literal["sgd", "adamw"] = "sgd"
    #: "step": warm-up, then ÷``1/gamma`` at ``steps`` (paper §4.1); "cosine": the same linear
    #: warm-up, then ``base_lr·(1 + cos(π·progress))/2`` down to 0 at ``max_iter`` (``steps``,
    #: ``gamma`` unused).
    schedule: Literal["step", "cosine"] = "step"
    #: Learning rate for ``reference_batch_size`` clips per iteration.
    base_lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    #: Weight decay on normalisation-layer parameters (original code: ``WEIGHT_DECAY_BN 0``).
    weight_decay_bn: float = 0.0
    #: Iterations at which the LR is multiplied by ``gamma`` (÷10 every 150k, paper §4.1).
    steps: list[int] = field(default_factory=lambda: [150000, 300000])
    gamma: float = 0.1
    max_iter: int = 400000
    #: Linear warm-up from ``warmup_factor·lr`` over ``warmup_iters`` (0 = none, as the paper).
    warmup_iters: int = 0
    warmup_factor: float = 0.1
    #: True: the momentum buffer follows LR changes, as the original code's SCALE_MOMENTUM (and
    #: PyTorch's SGD natively). False: emulate a Caffe2 buffer that is not rescaled.
    scale_momentum: bool = True
    #: Clips per iteration on one process (one GPU). The paper: 8 per GPU × 8 GPUs.
    batch_size: int = 8
    #: Global batch the recipe's LR and schedule are written for (paper: 64).
    reference_batch_size: int = 64
    #: What to do when batch_size × processes differs from reference_batch_size:
    #: "accumulate" gradients over several micro-batches (same LR and schedule);
    #: "linear" scales the LR by global/reference and the schedule by reference/global
    #: (the original 4-GPU runs: batch 32, LR 0.005, 600k iterations); "none" changes nothing.
    batch_policy: Literal["accumulate", "linear", "none"] = "accumulate"


@dataclass
class TrainConfig:
    """Run mechanics: output, checkpoints, precision, distribution, reproducibility."""

    output_dir: str = "runs/default"
    seed: int = 0
    #: Deterministic algorithms (bit-identical resume on CPU).
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Mixed precision. "auto": bf16 autocast for training where the hardware runs bf16 natively
    #: (CUDA Ampere+, CPUs with AVX512-BF16/AMX), float32 elsewhere and for every evaluation;
    #: "bf16" or "fp16" (CUDA only): autocast for training and evaluation; "none": float32.
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    #: Layout of the 3-D convolutions' weights (and so of the activations) in training. "auto":
    #: channels-last when training in bf16 on a CPU (measured faster), else contiguous.
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    compile: bool = False
    #: PyTorch CPU threads. 0: measured (CPU, one process, not ``deterministic``): the first
    #: iterations alternate all cores and 1 thread, the faster median wins, measured again every
    #: 2000 iterations (another busy process makes 2 threads wait on each other at every kernel:
    #: 1 thread was 2.5× faster then). n > 0: exactly n threads.
    threads: int = 0
    #: CPU (glibc on Linux): blocks of 4 MiB and more are unmapped when freed during training, so
    #: the process gives a step's freed memory back (peak RSS ≈ live heap: 0.46× the plain
    #: network's at 32×224² instead of 0.63–0.74×). Applied only with PyTorch's huge-page
    #: allocations (THP_MEM_ALLOC_ENABLE=1, set by the nlnet command), where it costs no time.
    release_memory: bool = True
    #: Convert BatchNorm to SyncBatchNorm under DDP (CUDA only).
    sync_bn: bool = False
    checkpoint_period: int = 10000
    #: Checkpoints kept on disk (0 = all).
    keep_checkpoints: int = 3
    #: Iterations between validations (and one at the end); 0: no validation during training.
    eval_period: int = 20000
    log_period: int = 20
    #: Training batches (per process) for the "precise BN" re-estimation before each evaluation
    #: and checkpoint (original code: 200); 0 disables it.
    precise_bn_batches: int = 200
    #: "auto": continue from the newest checkpoint in output_dir if any; "none": start afresh;
    #: otherwise a checkpoint path.
    resume: str = "auto"
    #: tqdm progress bar on rank 0.
    progress: bool = True
    #: Early stop: after a validation whose ``video_top1`` reaches this value — in percent, the
    #: unit of the engine's validation metrics (95.0, not 0.95) — write a checkpoint and end the
    #: run (``metrics.jsonl`` gets an ``early_stop`` record). null: train to ``solver.max_iter``.
    stop_at_val_top1: float | None = None


@dataclass
class EvalConfig:
    """Test protocol (paper §4.2): K clips × spatial views, scores aggregated per video."""

    #: Clips sampled evenly in time per video (paper: 10).
    num_clips: int = 10
    #: "full": fully-convolutional on the full frame (paper); "three": 3 crops along the longer
    #: side (original code, 30 views); "center": one centre crop.
    test_crop: Literal["full", "three", "center"] = "three"
    #: Multi-label (Charades) score aggregation over views; single-label always averages softmax.
    aggregate: Literal["max", "mean"] = "max"
    #: Views per forward pass on one process (must be 1 for "full" frames of different sizes).
    batch_size: int = 1
    num_workers: int = 4


@dataclass
class Config:
    """The whole run. ``task`` selects the registered task ("classification", "detection")."""

    task: str = "classification"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------
# Type checking


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _check(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list of {_type_name(args[0])}, got {value!r}")
        return [_check(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _check(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        # YAML turns `root=2024` into an int; a path or name field takes the text.
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in the schema


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(key: str, name: str, cls: type) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, names, n=1)
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f"; did you mean {parent + close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (valid keys here: {', '.join(names)})")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    obj = cls()
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in hints:
            raise _unknown(key, str(name), cls)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            setattr(obj, name, _build(tp, value, key))
        else:
            setattr(obj, name, _check(value, tp, key))
    return obj


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML recipe as a plain dict, resolving its ``base`` chain (relative paths)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config {path} includes itself through 'base'")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    bases = base if isinstance(base, list) else [base]
    merged: dict = {}
    for b in bases:
        if not isinstance(b, str):
            raise ConfigError(f"{path}: 'base' must be a path or a list of paths, got {b!r}")
        merged = _deep_merge(merged, read_yaml(path.parent / b, (*_seen, path)))
    return _deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"solver.base_lr=0.005"`` → (["solver", "base_lr"], 0.005); values are YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. solver.base_lr=0.005)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` strings to a raw config dict (keys are checked when it is built)."""
    data = _deep_merge({}, data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if not isinstance(child, dict):
                child = {}
                node[p] = child
            node = child
        node[parts[-1]] = value
    return data


def from_dict(data: dict) -> Config:
    """Build and type-check a :class:`Config` from a plain dict."""
    return validate(_build(Config, data, ""))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (or the defaults when ``path`` is None) and apply ``key=value`` overrides.

    Raises :class:`ConfigError` naming the key on an unknown key, a wrong type or a bad value.
    """
    data = read_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(data, list(overrides or [])))


def to_dict(cfg: Config) -> dict:
    """Plain dict of a config (for checkpoints and ``config.yaml`` in the run directory)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def validate(cfg: Config) -> Config:
    """Value checks that the types alone cannot express."""

    def positive(key: str, v: float, allow_zero: bool = False) -> None:
        if v < 0 or (v == 0 and not allow_zero):
            raise ConfigError(
                f"{key}: expected a {'non-negative' if allow_zero else 'positive'} value, got {v}"
            )

    s, t, d, e = cfg.solver, cfg.train, cfg.data, cfg.eval
    positive("solver.base_lr", s.base_lr)
    positive("solver.max_iter", s.max_iter)
    positive("solver.batch_size", s.batch_size)
    positive("solver.reference_batch_size", s.reference_batch_size)
    positive("solver.weight_decay", s.weight_decay, True)
    positive("solver.warmup_iters", s.warmup_iters, True)
    if not 0 <= s.momentum < 1:
        raise ConfigError(f"solver.momentum: expected a value in [0, 1), got {s.momentum}")
    if list(s.steps) != sorted(s.steps) or any(x <= 0 for x in s.steps):
        raise ConfigError(f"solver.steps: expected increasing positive iterations, got {s.steps}")
    positive("train.checkpoint_period", t.checkpoint_period)
    positive("train.eval_period", t.eval_period, True)
    positive("train.log_period", t.log_period)
    positive("train.precise_bn_batches", t.precise_bn_batches, True)
    positive("train.keep_checkpoints", t.keep_checkpoints, True)
    if t.stop_at_val_top1 is not None:
        if not 0 <= t.stop_at_val_top1 <= 100:
            raise ConfigError(
                "train.stop_at_val_top1: expected a top-1 accuracy in percent in [0, 100] "
                f"(the unit of the validation metrics), got {t.stop_at_val_top1}"
            )
        if t.eval_period == 0:
            raise ConfigError("train.stop_at_val_top1 needs validations: set train.eval_period > 0")
    positive("data.clip_length", d.clip_length)
    positive("data.sampling_rate", d.sampling_rate)
    positive("data.crop_size", d.crop_size)
    positive("data.num_workers", d.num_workers, True)
    if len(d.jitter) != 2 or d.jitter[0] > d.jitter[1]:
        raise ConfigError(f"data.jitter: expected [min, max] shorter-side sizes, got {d.jitter}")
    positive("eval.num_clips", e.num_clips)
    positive("eval.batch_size", e.batch_size)
    positive("eval.num_workers", e.num_workers, True)
    if cfg.model.num_classes is not None:
        positive("model.num_classes", cfg.model.num_classes)
    if cfg.model.dropout is not None and not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"model.dropout: expected a value in [0, 1), got {cfg.model.dropout}")
    return cfg
