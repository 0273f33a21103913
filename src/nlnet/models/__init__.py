"""§4: video classifiers (C2D / I3D ResNets with non-local blocks), their registry and weights."""

from nlnet.block import find_nonlocal_blocks
from nlnet.models import (
    demo,  # noqa: F401  (registers demo_c2d, demo_c2d_nl, demo_i3d)
    zoo,  # noqa: F401  (registers the paper's models)
)
from nlnet.models.factory import create_model
from nlnet.models.io import CheckpointFormatError, UnsafeCheckpointError, read_checkpoint
from nlnet.models.registry import list_models, register_model
from nlnet.models.resnet import (
    TEST_HEADS,
    BasicBlock,
    Bottleneck,
    FrozenBatchNorm,
    Head,
    ResStage,
    Stem,
    VideoResNet,
    freeze_batch_norm,
)
from nlnet.models.settings import WeightsMismatchError
from nlnet.models.weights import LoadReport, load_weights

__all__ = [
    "TEST_HEADS",
    "BasicBlock",
    "Bottleneck",
    "CheckpointFormatError",
    "FrozenBatchNorm",
    "Head",
    "LoadReport",
    "ResStage",
    "Stem",
    "UnsafeCheckpointError",
    "VideoResNet",
    "WeightsMismatchError",
    "create_model",
    "find_nonlocal_blocks",
    "freeze_batch_norm",
    "list_models",
    "load_weights",
    "read_checkpoint",
    "register_model",
]
