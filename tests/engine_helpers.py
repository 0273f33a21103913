"""A tiny model and in-memory video data set for engine tests (registered on import).

Run as a script it is the ``nlnet`` command with these registered, for subprocess tests
(SIGTERM, torchrun): ``python tests/engine_helpers.py train CONFIG key=value ...``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import Dataset

from nlnet.data.registry import DATASETS, register_dataset
from nlnet.models.registry import MODELS, register_model


class TinyVideoNet(nn.Module):
    """Conv3d → BN → ReLU → global pool → dropout → fc: a small network with every layer kind the
    engine treats specially (BN for precise BN/freezing/weight decay, dropout for RNG state)."""

    def __init__(
        self, num_classes: int = 3, width: int = 6, dropout: float = 0.0, freeze_bn: bool = False
    ) -> None:
        # freeze_bn is accepted like the paper's models do; the engine freezes the BN layer.
        super().__init__()
        self.conv = nn.Conv3d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm3d(width)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(self.pool(x).flatten(1)))


class TinyVideos(Dataset):
    """Videos of a class-dependent colour pattern plus noise, following the item contract of
    ``nlnet/data/registry.py``. ``broken`` videos cannot be "decoded": training retries the next
    video, test/val views come back with ``valid=False``; ``poison`` puts NaN in one clip."""

    def __init__(
        self,
        mode: str = "train",
        num_videos: int = 12,
        num_classes: int = 3,
        clip_length: int = 4,
        crop_size: int = 8,
        num_clips: int = 1,
        test_crop: str = "center",
        broken: list[int] | None = None,
        poison: int | None = None,
        multi_label: bool = False,
        **_: Any,
    ) -> None:
        self.mode = mode
        self.num_classes = num_classes
        self.multi_label = multi_label
        self.classes = [f"class{c}" for c in range(num_classes)]
        self.videos = [f"video{i:03d}" for i in range(num_videos)]
        self.t, self.s = clip_length, crop_size
        self.views = num_clips * (3 if test_crop == "three" else 1) if mode == "test" else 1
        self.broken = set(broken or [])
        self.poison = poison

    def __len__(self) -> int:
        return len(self.videos) * self.views

    def label(self, v: int) -> torch.Tensor:
        if self.multi_label:
            y = torch.zeros(self.num_classes)
            y[v % self.num_classes] = 1
            y[(v // 2) % self.num_classes] = 1
            return y
        return torch.tensor(v % self.num_classes)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i, seed = key if isinstance(key, tuple) else (key, 1000 + key)
        v, view = divmod(i, self.views)
        valid = v not in self.broken
        if self.mode == "train":
            while v in self.broken:
                v = (v + 1) % len(self.videos)
            valid = True
        g = torch.Generator().manual_seed(seed)
        c = v % self.num_classes
        base = torch.zeros(3, self.t, self.s, self.s)
        base[c % 3] += 1.0
        base += 0.5 * torch.randn(base.shape, generator=torch.Generator().manual_seed(v))
        clip = base + 0.3 * torch.randn(base.shape, generator=g)
        if self.mode == "train" and torch.rand((), generator=g) < 0.5:
            clip = clip.flip(-1)
        if self.poison is not None and v == self.poison:
            clip[0, 0, 0, 0] = float("nan")
        if not valid:
            clip = torch.zeros_like(clip)
        return {"clip": clip, "target": self.label(v), "index": v, "view": view, "valid": valid}


def register() -> None:
    if "engine_test_net" not in MODELS:
        register_model("engine_test_net")(TinyVideoNet)
    if "engine_test_videos" not in DATASETS:
        register_dataset("engine_test_videos")(TinyVideos)


register()


def tiny_config(out: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A minimal recipe on the tiny model/data, as a plain dict (sections update the defaults)."""
    cfg: dict[str, Any] = {
        "model": {"name": "engine_test_net", "num_classes": 3, "dropout": 0.2},
        "data": {
            "name": "engine_test_videos",
            "clip_length": 4,
            "crop_size": 8,
            "num_workers": 0,
            "jitter": [8, 8],
        },
        "solver": {
            "base_lr": 0.05,
            "steps": [6],
            "max_iter": 8,
            "batch_size": 4,
            "reference_batch_size": 4,
        },
        "train": {
            "output_dir": str(out),
            "checkpoint_period": 4,
            "eval_period": 4,
            "log_period": 2,
            "precise_bn_batches": 2,
            "deterministic": True,
            "progress": False,
        },
        "eval": {"num_clips": 2, "test_crop": "center", "batch_size": 4, "num_workers": 0},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


if __name__ == "__main__":
    from nlnet.cli import main

    sys.exit(main(sys.argv[1:]))
