"""nlnet — Non-local Neural Networks (Wang, Girshick, Gupta, He, CVPR 2018).

The public API:

* :func:`nonlocal_attention` — the non-local operation, Eq. (1)–(5), exact and memory-frugal.
* :class:`NonLocalBlock` — the block of Eq. (6) for 1D, 2D and 3D inputs.
* :func:`create_model`, :func:`list_models` — C2D / I3D video classifiers (§4).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["NonLocalBlock", "__version__", "create_model", "list_models", "nonlocal_attention"]

# Imported on first use, so `import nlnet.data` (or nlnet.ops) loads nothing above it and
# `import nlnet` stays light for users of the block alone.
_LAZY = {
    "NonLocalBlock": "nlnet.block",
    "nonlocal_attention": "nlnet.ops",
    "create_model": "nlnet.models",
    "list_models": "nlnet.models",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nlnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
