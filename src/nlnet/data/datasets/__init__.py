"""Video clip datasets: Kinetics (§4.1–4.2), Charades (§4.3) and a folder-per-class dataset.

:mod:`.clips` holds the clip dataset (decoding, sampling, train/val/test views) they share;
:mod:`.kinetics`, :mod:`.charades` and :mod:`.folder` find each one's files and labels and
register a builder with :func:`nlnet.data.build_dataset`.
"""

from nlnet.data.datasets.charades import CharadesDataset, charades
from nlnet.data.datasets.clips import MODES, VideoClipDataset, VideoRecord
from nlnet.data.datasets.folder import folder
from nlnet.data.datasets.kinetics import kinetics

__all__ = [
    "MODES",
    "CharadesDataset",
    "VideoClipDataset",
    "VideoRecord",
    "charades",
    "folder",
    "kinetics",
]
