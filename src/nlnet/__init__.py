"""nlnet — Non-local Neural Networks (Wang, Girshick, Gupta, He, CVPR 2018).

The public API:

* :func:`nonlocal_attention` — the non-local operation, Eq. (1)–(5), exact and memory-frugal.
* :class:`NonLocalBlock` — the block of Eq. (6) for 1D, 2D and 3D inputs.
* :func:`create_model`, :func:`list_models` — C2D / I3D video classifiers (§4).
"""

from __future__ import annotations

from typing import Any

from nlnet.block import NonLocalBlock
from nlnet.ops import nonlocal_attention

__version__ = "0.1.0"

__all__ = ["NonLocalBlock", "__version__", "create_model", "list_models", "nonlocal_attention"]


def __getattr__(name: str) -> Any:
    # The model zoo is imported lazily so `import nlnet` stays light for users of the block alone.
    if name in ("create_model", "list_models"):
        from nlnet import models

        return getattr(models, name)
    raise AttributeError(f"module 'nlnet' has no attribute {name!r}")
