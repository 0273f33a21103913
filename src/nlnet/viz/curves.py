"""``nlnet plot RUN_DIR [RUN_DIR ...] [--out PNG]``: training curves like the paper's Figure 4.

Figure 4 shows, for C2D and NL C2D, the training error (dashed) and the validation error (solid)
against iterations. Each run directory's ``metrics.jsonl`` provides the points (records with
``split`` "train" or "val" and an ``error`` value); when a resumed run re-logged an iteration, the
last record wins.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def read_curves(
    run_dir: str | Path, key: str = "error"
) -> dict[str, tuple[list[int], list[float]]]:
    """``{"train": (iterations, values), "val": (...)}`` from a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is this an nlnet run directory?)")
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):  # a run still writing (or killed mid-line)
                break
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
    return curves_from_records(records, key)


def curves_from_records(
    records: Iterable[Mapping[str, Any]], key: str = "error"
) -> dict[str, tuple[list[int], list[float]]]:
    """``{"train": (iterations, values), "val": (...)}`` from metrics records (the dicts of a
    ``metrics.jsonl``, or a :class:`~nlnet.engine.trainer.Trainer`'s ``history``); when an
    iteration was logged twice (a resumed run), the last record wins."""
    points: dict[str, dict[int, float]] = {"train": {}, "val": {}}
    for rec in records:
        split = rec.get("split")
        if split in points and isinstance(rec.get(key), int | float):
            points[split][int(rec["iteration"])] = float(rec[key])
    return {s: (sorted(p), [p[i] for i in sorted(p)]) for s, p in points.items()}


def plot_runs(
    run_dirs: list[str | Path], out: str | Path, key: str = "error", labels: list[str] | None = None
) -> Path:
    """Draw every run's train (dashed) and val (solid) ``key`` on one figure; write a PNG."""
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"got {len(labels)} labels for {len(run_dirs)} runs")
    names = labels or [Path(run).name for run in run_dirs]
    series = [(name, read_curves(run, key)) for name, run in zip(names, run_dirs)]
    try:
        return plot_curves(series, out, key)
    except ValueError:
        raise ValueError(
            f"no {key!r} values in the metrics.jsonl of {', '.join(map(str, run_dirs))}"
        ) from None


def plot_curves(
    series: Sequence[tuple[str, Mapping[str, tuple[list[int], list[float]]]]],
    out: str | Path,
    key: str = "error",
) -> Path:
    """Figure 4 from curves in memory: ``[(label, {"train": (its, values), "val": (...)}), …]``
    (see :func:`curves_from_records`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    drawn = 0
    for i, (name, curves) in enumerate(series):
        color = f"C{i % 10}"
        tx, ty = curves["train"]
        vx, vy = curves["val"]
        if tx:
            ax.plot(tx, ty, linestyle="--", color=color, linewidth=1.2, label=f"{name}, train")
            drawn += 1
        if vx:
            ax.plot(
                vx,
                vy,
                linestyle="-",
                color=color,
                linewidth=2.0,
                marker="o" if len(vx) < 30 else None,
                markersize=3,
                label=f"{name}, val",
            )
            drawn += 1
    if drawn == 0:
        plt.close(fig)
        raise ValueError(f"no {key!r} values in the curves of {', '.join(n for n, _ in series)}")
    ax.set_xlabel("iterations")
    ax.set_ylabel(f"{key} (%)" if key == "error" else key)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(out)
    return out
