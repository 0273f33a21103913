"""The model registry: ``create_model(name, ...)`` and ``list_models()`` (timm-style)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder ``fn(num_classes=..., **kwargs) -> nn.Module`` under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = fn
        return fn

    return wrap


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted."""
    _import_builders()
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    _import_builders()
    try:
        return _MODELS[name]
    except KeyError:
        close = fnmatch.filter(_MODELS, f"*{name}*") or sorted(_MODELS)
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(close)}") from None


def _import_builders() -> None:
    # Importing the package registers every builder module it lists.
    import nlnet.models  # noqa: F401


def create_model(
    name: str, num_classes: int = 400, pretrained: Any = None, **kwargs: Any
) -> nn.Module:
    """Build a registered model; ``pretrained`` (a path or URL) is loaded when the builder supports it."""
    builder = get_model_builder(name)
    if pretrained is not None:
        kwargs["pretrained"] = pretrained
    return builder(num_classes=num_classes, **kwargs)
