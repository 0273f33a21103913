"""Class names shipped with nlnet, in the order the released models' classifiers use.

* Kinetics-400 (``kinetics400.txt``): alphabetical, the order of the original release's
  ``classids.json`` (there, names with spaces carry literal quotes), mmaction2's
  ``label_map_k400.txt``, PySlowFast's ``kinetics_classnames.json`` and torchvision:
  ``abseiling`` = 0 … ``zumba`` = 399.
* Charades v1 (``charades157.txt``): the 157 action classes of ``Charades_v1_classes.txt``
  (``c000 Holding some clothes`` … ``c156 Someone is eating something``), kept verbatim with
  their ids; label ``k`` is ``c{k:03d}``.  The names are public (the dataset's class file, also
  reproduced in the Hugging Face dataset card); the Charades data licence (Allen Institute,
  non-commercial) covers the dataset itself.
"""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["charades157", "kinetics400", "read_class_file"]


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


def charades157() -> list[str]:
    """The 157 Charades v1 action names in label order (``c000`` … ``c156``), without the ids."""
    names: list[str] = []
    for i, line in enumerate(_read("charades157.txt")):
        code, _, name = line.partition(" ")
        if code != f"c{i:03d}" or not name.strip():
            raise ValueError(
                f"charades157.txt line {i + 1}: expected 'c{i:03d} <name>', got {line!r}"
            )
        names.append(name.strip())
    return names
