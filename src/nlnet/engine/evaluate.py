"""``nlnet eval CONFIG --checkpoint CK [key=value ...]``: the test protocol of paper §4.2.

Builds the task's "test" data set (``eval.num_clips`` clips × ``eval.test_crop`` views per video),
scores every view once (sharded over ``torchrun`` processes without padding), aggregates per video
and writes ``predictions.jsonl`` and ``metrics.json`` into the run directory
(``<train.output_dir>/eval_<checkpoint name>`` unless ``--out`` is given).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from nlnet.config import Config
from nlnet.engine import distributed as dist
from nlnet.engine.checkpoint import is_engine_checkpoint, unwrap
from nlnet.engine.runtime import autocast_factory, global_flags, restore_global_flags, setup
from nlnet.engine.samplers import ShardSampler
from nlnet.engine.task import Task, build_task
from nlnet.models import LoadReport, load_weights, read_checkpoint


def load_for_eval(model: torch.nn.Module, checkpoint: str | Path) -> LoadReport:
    """Weights for testing: an engine checkpoint loads strictly; other formats (a converted
    Caffe2 model, a plain state dict) go through :func:`nlnet.models.load_weights` (renaming, inflation, BN folding) and report.

    Weights made for other model settings than the config's (e.g. a PySlowFast 8×8 model,
    ``variant: slowfast``, into a ``variant: speed`` recipe) raise ``WeightsMismatchError``
    naming each setting and the override to use.  ``checkpoint`` may also be a released-weights
    name (``nlnet weights``), resolved to its cached converted file."""
    from nlnet.models.factory import resolve_weights_spec

    path = Path(resolve_weights_spec(checkpoint))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = read_checkpoint(path)
    if is_engine_checkpoint(obj):
        report = load_weights(unwrap(model), obj, strict=True)  # checks the settings first
        unwrap(model).load_state_dict(obj["model"])
        return report
    return load_weights(unwrap(model), str(path))


def evaluate(
    cfg: Config,
    checkpoint: str | Path,
    out_dir: str | Path | None = None,
    split: str = "test",
    task: Task | None = None,
) -> dict[str, Any]:
    """Score ``checkpoint`` on the ``split`` set with ``cfg.eval``'s protocol (paper §4.2) and
    write predictions and metrics under ``out_dir``; returns the metrics (all processes)."""
    flags = global_flags()
    try:
        return _evaluate(cfg, checkpoint, out_dir, split, task)
    finally:
        restore_global_flags(flags)


def _evaluate(
    cfg: Config, checkpoint: str | Path, out_dir: str | Path | None, split: str, task: Task | None
) -> dict[str, Any]:
    device, _, _ = setup(cfg)
    # Weights come from the checkpoint: skip the training-time initialisation.
    cfg = copy.deepcopy(cfg)
    cfg.model.pretrained = None
    cfg.model.init_from = None
    task = task if task is not None else build_task(cfg.task, cfg)
    if cfg.model.num_classes is None:  # the test set gives the number of classes
        task.build_dataset(split)
    model = task.build_model()  # before the data otherwise: a bad model keyword fails at once
    report = load_for_eval(model, checkpoint)  # so do weights made for other settings
    dataset = task.build_dataset(split)
    if dist.is_main() and (report.missing or report.mismatched):
        print(
            f"nlnet eval: WARNING: {len(report.missing)} model tensors missing from "
            f"{checkpoint} and {len(report.mismatched)} of the wrong shape; they keep "
            f"their initial values (first: {(report.missing or report.mismatched)[:5]})",
            file=sys.stderr,
        )
    out = (
        Path(out_dir)
        if out_dir is not None
        else Path(cfg.train.output_dir) / f"eval_{Path(checkpoint).stem}"
    )
    return evaluate_model(model, cfg, task, dataset, out, device=device)


def evaluate_model(
    model: nn.Module,
    cfg: Config,
    task: Task,
    dataset: Dataset,
    out_dir: str | Path | None,
    *,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Score an in-memory ``model`` on ``dataset`` with ``cfg.eval``'s protocol (paper §4.2);
    rank 0 writes predictions and metrics under ``out_dir`` (None: nothing written)."""
    rank, world = dist.rank(), dist.world_size()
    device = device if device is not None else next(model.parameters()).device
    model.to(device).eval()
    loader = DataLoader(
        dataset,
        sampler=ShardSampler(len(dataset), rank, world),
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.eval.num_workers,
        collate_fn=task.collate_fn(),
        pin_memory=device.type == "cuda",
    )
    batches: Any = loader
    if dist.is_main():
        from tqdm import tqdm

        batches = tqdm(
            loader, desc=f"eval ({world} process(es))", file=sys.stderr, dynamic_ncols=True
        )
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), autocast_factory(cfg, device)():
        result = task.evaluate(model, batches, device, out)
    return result
