"""The model registry (timm-style): ``register_model``, ``list_models`` and the builders' table.

:func:`nlnet.models.create_model` (in :mod:`nlnet.models.factory`) builds from it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from nlnet.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
#: Decorator registering a builder ``fn(num_classes=..., **kwargs) -> nn.Module`` under a name.
register_model = MODELS.register


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted."""
    return MODELS.names(pattern)


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name`` (importing :mod:`nlnet.models` registers them all)."""
    return MODELS.get(name)
