"""§4.1: video decoding, clip sampling, transforms and datasets."""

from nlnet.data import synthetic  # noqa: F401  (registers colour_match)
from nlnet.data.registry import build_dataset, list_datasets, register_dataset

__all__ = ["build_dataset", "list_datasets", "register_dataset"]
