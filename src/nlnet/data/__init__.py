"""§4.1: video decoding, clip sampling, transforms and datasets.

Registered datasets (``build_dataset(name, **kwargs)``): ``"kinetics"``, ``"charades"``,
``"folder"``; see :mod:`nlnet.data.datasets` and docs/data.md.
"""

from nlnet.data.annotations import (
    AnnotationError,
    parse_charades_actions,
    read_charades_classes,
    read_charades_csv,
    read_kinetics_csv,
    read_list_file,
)
from nlnet.data.datasets import CharadesDataset, VideoClipDataset, VideoRecord
from nlnet.data.loader import SeededSampler, seed_worker
from nlnet.data.registry import build_dataset, list_datasets, register_dataset
from nlnet.data.video import VideoDecodeError, VideoInfo, decode_frames, probe_video

__all__ = [
    "AnnotationError",
    "CharadesDataset",
    "SeededSampler",
    "VideoClipDataset",
    "VideoDecodeError",
    "VideoInfo",
    "VideoRecord",
    "build_dataset",
    "decode_frames",
    "list_datasets",
    "parse_charades_actions",
    "probe_video",
    "read_charades_classes",
    "read_charades_csv",
    "read_kinetics_csv",
    "read_list_file",
    "register_dataset",
    "seed_worker",
]

from nlnet.data import synthetic  # noqa: F401  (registers colour_match)
