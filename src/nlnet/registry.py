"""One registry helper for every ``name -> builder`` table (models, datasets, detectors, tasks)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class Registry(Generic[F]):
    """A named table of builders with a ``register(name)`` decorator and helpful lookup errors.

    ``kind`` names what is registered ("model", "dataset", ...) in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering ``fn`` under ``name``; a second registration is an error."""

        def wrap(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = fn
            return fn

        return wrap

    def get(self, name: str) -> F:
        """The builder registered as ``name``; ``ValueError`` naming close matches otherwise."""
        try:
            return self._items[name]
        except KeyError:
            close = fnmatch.filter(self._items, f"*{name}*") or sorted(self._items)
            raise ValueError(
                f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(close)}"
            ) from None

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style ``pattern``, sorted."""
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)
