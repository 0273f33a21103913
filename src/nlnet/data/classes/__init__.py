"""Class names shipped with nlnet, in the order the released models' classifiers use.

* Kinetics-400 (``kinetics400.txt``): alphabetical, the order of the original release's
  ``classids.json`` (there, names with spaces carry literal quotes), mmaction2's
  ``label_map_k400.txt``, PySlowFast's ``kinetics_classnames.json`` and torchvision:
  ``abseiling`` = 0 … ``zumba`` = 399.
"""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["kinetics400", "read_class_file"]


@functools.cache
def _read(name: str) -> tuple[str, ...]:
    text = resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def read_class_file(path: str) -> list[str]:
    """Class names from a text file, one per line (blank lines ignored, quotes stripped)."""
    with open(path, encoding="utf-8") as fh:
        return [line.strip().strip('"') for line in fh if line.strip()]


def kinetics400() -> list[str]:
    """The 400 Kinetics class names in label order (alphabetical)."""
    return list(_read("kinetics400.txt"))
