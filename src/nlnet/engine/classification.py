"""Video classification (Kinetics, Charades, folder-per-class): the task the engine trains.

* Training (paper §4.1): softmax cross-entropy (single-label) or per-class sigmoid with binary
  cross-entropy (multi-label Charades, §5.2).
* Testing (§4.2): every view (clip × crop) of a video is scored; single-label scores are softmax
  vectors averaged over views, multi-label scores are sigmoid vectors aggregated with ``max`` or
  ``mean``. Top-1/top-5 at clip (view) and video level; mAP as Charades' official script.
  Views marked ``valid=False`` (undecodable video) are skipped; a video with no valid view is
  reported and scored as wrong (top-k) / all-zero scores (mAP).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from nlnet import metrics
from nlnet.config import Config, ConfigError
from nlnet.engine import distributed as dist
from nlnet.engine.task import register_task
from nlnet.io import atomic_write_text
from nlnet.models import LoadReport, load_weights

UNREADABLE_POLICY = (
    "views with valid=False are not scored; a video without any valid view counts as wrong "
    "for top-k accuracy and gets all-zero scores for mAP"
)


def collate_views(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch items of the data item contract; clips of different sizes (full-frame testing)
    stay a list."""
    clips = [it["clip"] for it in items]
    same = all(c.shape == clips[0].shape for c in clips)
    return {
        "clip": torch.stack(clips) if same else clips,
        "target": torch.stack([torch.as_tensor(it["target"]) for it in items]),
        "index": torch.tensor([int(it["index"]) for it in items]),
        "view": torch.tensor([int(it.get("view", 0)) for it in items]),
        "valid": torch.tensor([bool(it.get("valid", True)) for it in items]),
    }


class ClassificationTask:
    """:class:`nlnet.engine.task.Task` for video classification from a :class:`Config`."""

    def __init__(self, config: Config) -> None:
        self.cfg = config
        self._datasets: dict[str, Dataset] = {}
        self._eval_dataset: Dataset | None = None
        self.init_report: LoadReport | None = None
        self.multi_label: bool | None = None

    # -- model --------------------------------------------------------------------------------
    def num_classes(self) -> int:
        if self.cfg.model.num_classes is not None:
            return self.cfg.model.num_classes
        # A data set already built (e.g. the test set in `nlnet eval`) tells; else the training set.
        ds = next(iter(self._datasets.values())) if self._datasets else self.build_dataset("train")
        n = getattr(ds, "num_classes", None)
        if not isinstance(n, int):
            raise ConfigError(
                "model.num_classes is not set and the training data set has no num_classes"
            )
        return n

    def build_model(self) -> nn.Module:
        from nlnet.models import create_model, freeze_batch_norm

        m = self.cfg.model
        kwargs = dict(m.kwargs)
        if m.dropout is not None:
            kwargs.setdefault("dropout", m.dropout)
        if m.freeze_bn:
            # The builder turns the backbone's BN into frozen affines (loading folds the
            # statistics in); non-local blocks keep a trainable BN (their γ starts at 0).
            kwargs.setdefault("freeze_bn", True)
        try:
            model = create_model(
                m.name, num_classes=self.num_classes(), pretrained=m.pretrained, **kwargs
            )
        except TypeError as e:
            raise ConfigError(f"model.kwargs for model {m.name!r}: {e}") from None
        except ValueError as e:
            raise ConfigError(f"model.name / model.kwargs: {e}") from None
        if m.init_from:
            self.init_report = load_weights(
                model, str(m.init_from), check_settings=m.init_check_settings
            )
        if m.freeze_bn:
            # Models whose builder ignores freeze_bn: the same FrozenBatchNorm, NL blocks excluded.
            freeze_batch_norm(model)
        return model

    # -- data ---------------------------------------------------------------------------------
    def dataset_kwargs(self, split: str) -> dict[str, Any]:
        d, e = self.cfg.data, self.cfg.eval
        train = split == "train"
        kw: dict[str, Any] = {
            "root": d.root if train else (d.val_root or d.root),
            "annotations": d.annotations if train else d.val_annotations,
            "mode": split,
            "clip_length": d.clip_length,
            "sampling_rate": d.sampling_rate,
            "crop_size": d.crop_size,
            "jitter": tuple(d.jitter),
            "test_scale": d.test_scale,
            "normalization": d.normalization,
            "max_retries": d.max_retries,
            "target_fps": d.target_fps,
            "missing_report": self._missing_report(split),
            "classes": d.classes,
        }
        if split == "test":
            kw["num_clips"] = e.num_clips
            kw["test_crop"] = e.test_crop
        kw.update(d.extra)
        return {k: v for k, v in kw.items() if v is not None}

    def _missing_report(self, split: str) -> str | None:
        """Where the list of videos missing on disk goes: one file per split, next to the run
        (``data.missing_report`` names another place; the split is appended to its stem)."""
        from nlnet.engine import distributed

        if not distributed.is_main():
            return None
        if self.cfg.data.missing_report:
            path = Path(self.cfg.data.missing_report)
            return str(path.with_name(f"{path.stem}_{split}{path.suffix}"))
        return str(Path(self.cfg.train.output_dir) / f"missing_videos_{split}.txt")

    def build_dataset(self, split: str) -> Dataset:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if split not in self._datasets:
            from nlnet.data import build_dataset

            try:
                ds = build_dataset(self.cfg.data.name, **self.dataset_kwargs(split))
            except TypeError as e:
                raise ConfigError(
                    f"data.* / data.extra for data set {self.cfg.data.name!r}: {e}"
                ) from None
            self._datasets[split] = ds
            if self.multi_label is None:
                self.multi_label = bool(getattr(ds, "multi_label", False))
        if split != "train":
            self._eval_dataset = self._datasets[split]
        return self._datasets[split]

    def collate_fn(self) -> Any:
        return collate_views

    # -- training -----------------------------------------------------------------------------
    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.multi_label or target.dim() == 2:
            return F.binary_cross_entropy_with_logits(logits.float(), target.float())
        return F.cross_entropy(logits.float(), target.long())

    def training_step(
        self, model: nn.Module, batch: Any, device: torch.device
    ) -> tuple[Tensor, dict[str, float]]:
        clip = batch["clip"]
        if isinstance(clip, list):
            raise ValueError(
                "training clips differ in size; the data set must crop to data.crop_size"
            )
        clip = clip.to(device, non_blocking=True)
        target = batch["target"].to(device, non_blocking=True)
        logits = model(clip)
        loss = self.loss(logits, target)
        scalars = {"loss": float(loss.detach())}
        if target.dim() == 1:  # single-label: top-1 training error, as in Figure 4
            wrong = (logits.detach().argmax(1) != target).float().mean()
            scalars["error"] = 100.0 * float(wrong)
        return loss, scalars

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batches: Iterable[Any], device: torch.device, out_dir: Path | None
    ) -> dict[str, Any]:
        aggregate = self.cfg.eval.aggregate
        videos: dict[int, dict[str, Any]] = {}
        seen: set[tuple[int, int]] = set()
        clip_hits = {1: 0, 5: 0}
        clip_n = 0
        multi = bool(self.multi_label)
        for batch in batches:
            clips = batch["clip"]
            n = len(batch["index"])
            keep = [
                j for j in range(n) if (int(batch["index"][j]), int(batch["view"][j])) not in seen
            ]
            for j in keep:
                seen.add((int(batch["index"][j]), int(batch["view"][j])))
            targets = batch["target"]
            multi = multi or targets.dim() == 2
            valid = [j for j in keep if bool(batch["valid"][j])]
            for j in keep:
                v = videos.setdefault(
                    int(batch["index"][j]),
                    {"target": targets[j], "views": 0, "valid": 0, "score": None},
                )
                v["views"] += 1
            if not valid:
                continue
            if isinstance(clips, list):
                logits = torch.cat([model(clips[j][None].to(device)) for j in valid])
            else:
                logits = model(clips[valid].to(device, non_blocking=True))
            logits = logits.float().cpu()
            probs = torch.sigmoid(logits) if multi else torch.softmax(logits, dim=1)
            if not multi:
                hits = metrics.topk_correct(probs, targets[valid].long(), (1, 5))
                clip_hits[1] += int(hits[1].sum())
                clip_hits[5] += int(hits[5].sum())
            clip_n += len(valid)
            for row, j in enumerate(valid):
                v = videos[int(batch["index"][j])]
                p = probs[row].double()
                v["valid"] += 1
                if v["score"] is None:
                    v["score"] = p.clone()
                elif multi and aggregate == "max":
                    v["score"] = torch.maximum(v["score"], p)
                else:
                    v["score"] += p
        gathered = dist.all_gather_object((videos, clip_hits, clip_n, multi))
        return self._finish(gathered, aggregate, out_dir)

    def _finish(self, gathered: list[Any], aggregate: str, out_dir: Path | None) -> dict[str, Any]:
        merged: dict[int, dict[str, Any]] = {}
        clip_hits = {1: 0, 5: 0}
        clip_n = 0
        multi = False
        for videos, hits, n, m in gathered:
            multi = multi or m
            clip_n += n
            for k in clip_hits:
                clip_hits[k] += hits[k]
            for idx, v in videos.items():
                if idx not in merged:
                    merged[idx] = dict(v)
                    continue
                w = merged[idx]
                w["views"] += v["views"]
                w["valid"] += v["valid"]
                if v["score"] is not None:
                    if w["score"] is None:
                        w["score"] = v["score"]
                    elif multi and aggregate == "max":
                        w["score"] = torch.maximum(w["score"], v["score"])
                    else:
                        w["score"] = w["score"] + v["score"]
        if not merged:
            raise ValueError("evaluation saw no samples: the evaluation data set is empty")
        order = sorted(merged)
        num_classes = (
            next(v["score"].numel() for v in merged.values() if v["score"] is not None)
            if any(v["score"] is not None for v in merged.values())
            else self.num_classes()
        )
        scores = torch.zeros(len(order), num_classes, dtype=torch.float64)
        readable = torch.zeros(len(order), dtype=torch.bool)
        for row, idx in enumerate(order):
            v = merged[idx]
            if v["valid"]:
                s = v["score"]
                scores[row] = s if (multi and aggregate == "max") else s / v["valid"]
                readable[row] = True
        targets = torch.stack([torch.as_tensor(merged[i]["target"]) for i in order])
        ids = self._video_ids(order)
        unreadable = [ids[r] for r in range(len(order)) if not readable[r]]
        out: dict[str, Any] = {
            "num_videos": len(order),
            "num_views": sum(v["views"] for v in merged.values()),
            "invalid_views": sum(v["views"] - v["valid"] for v in merged.values()),
            "unreadable_videos": len(unreadable),
        }
        if multi:
            out["mAP"] = metrics.mean_average_precision(scores.numpy(), targets.numpy())
            out["error"] = 100.0 - out["mAP"]
        else:
            hits = metrics.topk_correct(scores, targets.long(), (1, 5))
            for k in (1, 5):
                # A video with no valid view is wrong whatever its (all-zero) scores rank first.
                out[f"video_top{k}"] = 100.0 * float((hits[k] & readable).double().mean())
                out[f"clip_top{k}"] = 100.0 * clip_hits[k] / clip_n if clip_n else float("nan")
            out["error"] = 100.0 - out["video_top1"]
        if out_dir is not None and dist.is_main():
            self._write(Path(out_dir), out, ids, scores, targets, readable, unreadable, multi)
        return out

    def _video_ids(self, order: list[int]) -> list[str]:
        names = getattr(self._eval_dataset, "videos", None)
        if names is None:
            return [str(i) for i in order]
        return [str(names[i]) for i in order]

    def _write(
        self,
        out_dir: Path,
        result: dict[str, Any],
        ids: list[str],
        scores: Tensor,
        targets: Tensor,
        readable: Tensor,
        unreadable: list[str],
        multi: bool,
    ) -> None:
        classes = list(getattr(self._eval_dataset, "classes", None) or [])
        lines = []
        k = min(5, scores.shape[1])
        top = scores.topk(k, dim=1)
        for r, vid in enumerate(ids):
            rec: dict[str, Any] = {
                "video": vid,
                "readable": bool(readable[r]),
                "top5": [int(c) for c in top.indices[r]],
                "top5_scores": [round(float(s), 6) for s in top.values[r]],
            }
            if multi:
                rec["target"] = [int(c) for c in torch.nonzero(targets[r]).flatten()]
            else:
                rec["target"] = int(targets[r])
            if classes:
                rec["top5_names"] = [classes[c] for c in rec["top5"] if c < len(classes)]
            lines.append(json.dumps(rec))
        atomic_write_text(out_dir / "predictions.jsonl", "\n".join(lines) + "\n")
        if multi:
            # Charades_v1_classify.m's submission format: id followed by one score per class.
            sub = [
                vid + " " + " ".join(f"{float(s):.6g}" for s in scores[r])
                for r, vid in enumerate(ids)
            ]
            atomic_write_text(out_dir / "submission.txt", "\n".join(sub) + "\n")
        report = dict(result, unreadable_video_ids=unreadable, unreadable_policy=UNREADABLE_POLICY)
        atomic_write_text(out_dir / "metrics.json", json.dumps(report, indent=2) + "\n")


@register_task("classification")
def _build_classification(config: Config) -> ClassificationTask:
    return ClassificationTask(config)
