"""Parsers for the official annotation files (reference §5.6 and §6).

* Kinetics-400/600/700 CSV: ``label,youtube_id,time_start,time_end,split,is_cc`` (train/val; the
  test CSV has no label: ``youtube_id,time_start,time_end,split``), multi-word labels quoted.
* List files, the original code's format: ``<path> <label>`` per line (``label`` an integer;
  comma-separated integers for multi-label).
* Charades v1 CSV: ``id,subject,scene,quality,relevance,verified,script,objects,descriptions,
  actions,length``; ``actions`` is ``cXXX start end`` triplets separated by ``;`` (may be empty).
* ``Charades_v1_classes.txt``: ``cXXX Name of the action`` per line.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

CHARADES_NUM_CLASSES = 157
CHARADES_COLUMNS = (
    "id",
    "subject",
    "scene",
    "quality",
    "relevance",
    "verified",
    "script",
    "objects",
    "descriptions",
    "actions",
    "length",
)


class AnnotationError(ValueError):
    """An annotation file is malformed; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class KineticsRow:
    label: str | None  # None in the test CSV
    youtube_id: str
    time_start: int
    time_end: int
    split: str


@dataclass(frozen=True)
class CharadesRow:
    id: str
    actions: tuple[tuple[int, float, float], ...]  # (class index, start s, end s)
    length: float | None
    scene: str = ""
    verified: str = ""


def read_kinetics_csv(path: str | os.PathLike[str]) -> list[KineticsRow]:
    """Rows of an official Kinetics CSV (train/val with labels, or test without)."""
    rows: list[KineticsRow] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        need = {"youtube_id", "time_start", "time_end"}
        if not need <= set(fields):
            raise AnnotationError(
                f"{path}: expected a Kinetics CSV with header "
                f"'label,youtube_id,time_start,time_end,split,is_cc', got {fields}"
            )
        for n, r in enumerate(reader, start=2):
            try:
                rows.append(
                    KineticsRow(
                        label=r.get("label"),
                        youtube_id=r["youtube_id"],
                        time_start=int(float(r["time_start"])),
                        time_end=int(float(r["time_end"])),
                        split=r.get("split") or "",
                    )
                )
            except (TypeError, ValueError) as e:
                raise AnnotationError(f"{path}:{n}: bad Kinetics row {r} ({e})") from e
    return rows


def read_list_file(path: str | os.PathLike[str]) -> list[tuple[str, list[int]]]:
    """``<path> <label>`` lines (the path may contain spaces; the label is the last field)."""
    out: list[tuple[str, list[int]]] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise AnnotationError(f"{path}:{n}: expected '<path> <label>', got {line!r}")
            try:
                labels = [int(x) for x in parts[1].split(",") if x != ""]
            except ValueError as e:
                raise AnnotationError(
                    f"{path}:{n}: label {parts[1]!r} is not an integer (or comma-separated "
                    "integers)"
                ) from e
            if not labels or min(labels) < 0:
                raise AnnotationError(f"{path}:{n}: labels must be >= 0, got {parts[1]!r}")
            out.append((parts[0], labels))
    return out


def is_kinetics_csv(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` starts with a Kinetics CSV header (else it is taken as a list file)."""
    with open(path, encoding="utf-8") as f:
        head = f.readline().strip().lower()
    return head.startswith(("label,youtube_id", "youtube_id,"))


def parse_charades_actions(field: str) -> list[tuple[int, float, float]]:
    """``"c092 11.90 21.20;c147 0.00 12.60"`` → ``[(92, 11.9, 21.2), (147, 0.0, 12.6)]``."""
    out: list[tuple[int, float, float]] = []
    for item in field.split(";"):
        item = item.strip()
        if not item:
            continue
        parts = item.split()
        if len(parts) != 3 or not parts[0].startswith("c"):
            raise ValueError(f"expected 'cXXX start end', got {item!r}")
        cls = int(parts[0][1:])
        if not 0 <= cls < CHARADES_NUM_CLASSES:
            raise ValueError(f"class {parts[0]} outside c000..c{CHARADES_NUM_CLASSES - 1}")
        out.append((cls, float(parts[1]), float(parts[2])))
    return out


def read_charades_csv(path: str | os.PathLike[str]) -> list[CharadesRow]:
    """Rows of ``Charades_v1_train.csv`` / ``Charades_v1_test.csv``."""
    rows: list[CharadesRow] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if "id" not in fields or "actions" not in fields:
            raise AnnotationError(
                f"{path}: expected a Charades CSV with columns {','.join(CHARADES_COLUMNS)}, "
                f"got {fields}"
            )
        for n, r in enumerate(reader, start=2):
            try:
                actions = parse_charades_actions(r["actions"] or "")
                length = float(r["length"]) if r.get("length") else None
            except ValueError as e:
                raise AnnotationError(f"{path}:{n} (video {r.get('id')}): {e}") from e
            rows.append(
                CharadesRow(
                    r["id"],
                    tuple(actions),
                    length,
                    scene=r.get("scene") or "",
                    verified=r.get("verified") or "",
                )
            )
    return rows


def read_charades_classes(path: str | os.PathLike[str]) -> list[str]:
    """Names from ``Charades_v1_classes.txt`` (``c000 Holding some clothes`` ...), in id order."""
    names: dict[int, str] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        code, _, name = line.partition(" ")
        if not code.startswith("c") or not code[1:].isdigit():
            raise AnnotationError(f"{path}:{n}: expected 'cXXX name', got {line!r}")
        names[int(code[1:])] = name.strip()
    if sorted(names) != list(range(len(names))):
        raise AnnotationError(f"{path}: class ids are not c000..c{len(names) - 1:03d}")
    return [names[i] for i in range(len(names))]
