"""``nlnet demo [--out DIR] [--quick]``: the paper's claim, measured on a laptop CPU in minutes.

Trains a small C2D network and the same network with one non-local block (§3.3) — optionally an
I3D one too — on the synthetic "colour match" task (:mod:`nlnet.data.synthetic`), whose label
depends on two squares shown in frames far apart.  Every model trains through the real engine
(:class:`nlnet.engine.trainer.Trainer`) from the recipes in ``configs/demo/`` with identical data,
budget and seeds — with AdamW and a warm-up + cosine schedule by default
(``solver.optimizer``/``solver.schedule`` in the recipes); a run stops early once its validation
accuracy reaches ``--target`` (the engine's ``train.stop_at_val_top1``, the same rule for every
model), so ``nlnet train configs/demo/c2d_nl.yaml`` trains exactly what the demo trains.  Then each final checkpoint is scored by the engine's evaluation on a
separate held-out test set.  The run directory receives:

* ``metrics.json`` — ``{"baseline": {"val_top1": …, "test_top1": …, …}, "nonlocal": {…}, …}``
  (accuracies as fractions) plus the targets and whether they were met;
* ``curves.png`` — training (dashed) and validation (solid) error against iterations (Figure 4);
* ``attention.png`` — Figure 3 for the trained non-local block: arrows from a query on each
  square to its 20 most-weighted positions over all frames; ``attention_heatmap.png`` the same
  weights as heat maps;
* ``report.md`` linking them, and one engine run directory per model.

Targets (2 CPU cores): the whole demo in ≤ 5 minutes, non-local ≥ 0.90, baseline ≤ 0.65.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Models the demo trains: result key -> (recipe file, label in tables and figures).
MODELS: dict[str, tuple[str, str]] = {
    "baseline": ("c2d.yaml", "C2D"),
    "nonlocal": ("c2d_nl.yaml", "C2D + 1 NL block"),
    "i3d": ("i3d.yaml", "I3D (3x3x3)"),
}
TARGETS = {"nonlocal_min": 0.90, "baseline_max": 0.65, "seconds_max": 300.0}

# --quick: a seconds-long smoke run of the whole pipeline (CI); the numbers mean nothing.
QUICK_OVERRIDES = [
    "solver.max_iter=8",
    "solver.warmup_iters=2",
    "solver.steps=[6]",
    "solver.batch_size=8",
    "solver.reference_batch_size=8",
    "train.eval_period=4",
    "train.log_period=2",
    "train.precise_bn_batches=2",
    "data.extra.val_samples=16",
    "eval.batch_size=16",
]


def default_config_dir() -> Path:
    """``configs/demo`` of the source checkout this package runs from."""
    return Path(__file__).resolve().parents[2] / "configs" / "demo"


def auto_threads() -> int:
    """PyTorch threads for the demo: the cores not already busy (at least 1).

    On a 2-core machine that other processes keep busy, two OpenMP threads that keep being
    descheduled made a training step ~10× slower than one thread (measured); on an idle machine
    every core helps.
    """
    cores = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return cores
    return max(1, min(cores, cores - math.floor(load + 0.5)))


# --optimizer: the engine's solver.optimizer / solver.schedule pair it selects.
OPTIMIZERS: dict[str, tuple[str, str]] = {"adamw": ("adamw", "cosine"), "sgd": ("sgd", "step")}


def engine_overrides(stop_at: float | None, optimizer: str) -> list[str]:
    """The demo's options as engine config keys (``configs/demo/_base.yaml`` sets the defaults).

    ``stop_at`` is a fraction like the demo's other numbers; the engine's validation metrics,
    hence ``train.stop_at_val_top1``, are in percent.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {tuple(OPTIMIZERS)}")
    opt, schedule = OPTIMIZERS[optimizer]
    stop = "null" if stop_at is None else repr(float(stop_at) * 100.0)
    return [
        f"solver.optimizer={opt}",
        f"solver.schedule={schedule}",
        f"train.stop_at_val_top1={stop}",
    ]


@dataclass
class RunResult:
    key: str
    label: str
    model: str
    run_dir: Path
    checkpoint: Path
    val_top1: float
    test_top1: float
    iterations: int
    max_iter: int
    stopped_early: bool
    seconds: float
    params: int


def train_one(
    key: str,
    config_dir: Path,
    out: Path,
    overrides: list[str],
    stop_at: float | None,
    optimizer: str = "adamw",
) -> RunResult:
    """Train one demo model through the engine, then score its checkpoint on the test set."""
    from nlnet.config import load_config
    from nlnet.engine.checkpoint import checkpoint_path
    from nlnet.engine.evaluate import evaluate
    from nlnet.engine.trainer import Trainer

    recipe, label = MODELS[key]
    run_dir = out / key
    # A previous demo in the same directory: its checkpoints would be taken for this run's
    # (and pruned against them), so they go; the engine restarts metrics.jsonl itself.
    for stale in (run_dir / "checkpoints", run_dir / "test"):
        if stale.is_dir():
            shutil.rmtree(stale)
    # The demo's options first, so key=value overrides given to `nlnet demo` still win.
    overrides = [*engine_overrides(stop_at, optimizer), *overrides, f"train.output_dir={run_dir}"]
    cfg = load_config(config_dir / recipe, overrides)
    start = time.perf_counter()
    trainer = Trainer(cfg)
    params = sum(p.numel() for p in trainer.model.parameters())
    result = trainer.run()  # writes the final checkpoint, also when it stops early
    stopped = trainer.early_stop is not None
    seconds = time.perf_counter() - start
    val = _last_val(run_dir)
    if "video_top1" in result:
        val = result["video_top1"] / 100.0
    checkpoint = checkpoint_path(run_dir, trainer.iteration)
    if not checkpoint.is_file():
        raise RuntimeError(f"training {key} wrote no checkpoint {checkpoint}")
    test_cfg = load_config(config_dir / recipe, overrides)
    test = evaluate(test_cfg, checkpoint, run_dir / "test", split="test")
    return RunResult(
        key=key,
        label=label,
        model=cfg.model.name,
        run_dir=run_dir,
        checkpoint=checkpoint,
        val_top1=val,
        test_top1=test["video_top1"] / 100.0,
        iterations=trainer.iteration,
        max_iter=cfg.solver.max_iter,
        stopped_early=stopped,
        seconds=seconds,
        params=params,
    )


def _last_val(run_dir: Path) -> float:
    recs = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    vals = [r["video_top1"] for r in recs if r.get("split") == "val" and "video_top1" in r]
    if not vals:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no validation result")
    return float(vals[-1]) / 100.0


# -- the attention figure ----------------------------------------------------------------------
def attention_figure(
    result: RunResult, config_dir: Path, overrides: list[str], out: Path
) -> dict[str, Any]:
    """Figure 3 for the trained non-local model on a validation clip with matching colours.

    Queries: the centre of square A and of square B.  Returns what the figure shows in numbers
    (the share of each query's attention on its own square, on the other square, elsewhere).
    """
    from nlnet.config import load_config
    from nlnet.engine.evaluate import load_for_eval
    from nlnet.engine.task import build_task
    from nlnet.viz.attention import (
        attention_arrows,
        capture_attention,
        display_weights,
        draw_attention_arrows,
        draw_attention_heatmap,
    )

    cfg = load_config(config_dir / MODELS[result.key][0], overrides)
    task = build_task(cfg.task, cfg)
    model = task.build_model()
    load_for_eval(model, result.checkpoint)
    model.eval()
    dataset = task.build_dataset("val")
    # Among the first "same colour" clips the model classifies correctly, the one whose squares
    # sit farthest from the borders and from each other in time (the clearest picture).
    candidates = list(range(1, min(len(dataset), 61), 2)) or [0]
    with torch.no_grad():
        clips = torch.stack([dataset[i]["clip"] for i in candidates])
        correct = model(clips).argmax(1) == torch.stack([dataset[i]["target"] for i in candidates])

    def clarity(i: int) -> float:
        spec = dataset.describe(i)
        room = min(
            min(y, x, dataset.crop_size - spec.square - y, dataset.crop_size - spec.square - x)
            for y, x in (spec.top_left_a, spec.top_left_b)
        )
        return min(room, 6) + 0.5 * (spec.frame_b - spec.frame_a)

    ok = [i for i, c in zip(candidates, correct.tolist()) if c] or candidates
    index = max(ok, key=clarity)
    spec = dataset.describe(index)
    clip = dataset[index]["clip"][None]
    cap = capture_attention(model, clip)
    grid = cap.grid
    queries = [grid.query_index(*spec.centre("a")), grid.query_index(*spec.centre("b"))]
    frames = dataset.render(spec).permute(1, 2, 3, 0).numpy()  # (T, H, W, 3) in [0, 1]
    arrows_png = draw_attention_arrows(frames, cap.weights, grid, queries, out / "attention.png")
    heat_png = draw_attention_heatmap(
        frames, cap.weights, grid, queries, out / "attention_heatmap.png"
    )
    # Where each query's attention goes, measured on the key cells that touch a square.
    summary: dict[str, Any] = {"val_index": index, "block": cap.name, "queries": {}}
    for name, q in zip(("a", "b"), queries):
        w = display_weights(cap.weights[q])
        own = _square_keys(grid, spec, name)
        other = _square_keys(grid, spec, "b" if name == "a" else "a")
        top = attention_arrows(cap.weights, grid, [q], top_k=20)[0]
        summary["queries"][f"square_{name}"] = {
            "frame": grid.query_pixel(q)[0],
            "weight_on_own_square": float(w[own].sum()),
            "weight_on_other_square": float(w[other].sum()),
            "top20_arrows_to_other_square": sum(a.key_index in set(other) for a in top),
        }
    summary["files"] = {"arrows": arrows_png.name, "heatmap": heat_png.name}
    return summary


def _square_keys(grid: Any, spec: Any, which: str) -> list[int]:
    """Key indices whose pooled clip pixels overlap square ``which``."""
    frame, _, _ = spec.centre(which)
    top, left = spec.top_left_a if which == "a" else spec.top_left_b
    (tq, hq, wq), (tc, hc, wc), (st, sh, sw) = grid.query_shape, grid.clip_shape, grid.subsample

    def overlaps(cell: int, kernel: int, q: int, c: int, lo: int, n: int) -> bool:
        # Key cell `cell` pools clip pixels [cell·kernel·c/q, (cell+1)·kernel·c/q).
        a, b = cell * kernel * c / q, (cell + 1) * kernel * c / q
        return a < lo + n and lo < b

    out = []
    for j in range(grid.num_keys):
        tk, hk, wk = grid.key_cell(j)
        if (
            overlaps(tk, st, tq, tc, frame, 1)
            and overlaps(hk, sh, hq, hc, top, spec.square)
            and overlaps(wk, sw, wq, wc, left, spec.square)
        ):
            out.append(j)
    return out


# -- outputs -----------------------------------------------------------------------------------
def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def results_table(results: list[RunResult]) -> str:
    lines = [
        "| model | params | val top-1 | test top-1 | iterations | train time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        its = f"{r.iterations}/{r.max_iter}" + (" (target reached)" if r.stopped_early else "")
        lines.append(
            f"| {r.label} (`{r.model}`) | {r.params / 1e3:.1f}k | {r.val_top1:.3f} | "
            f"{r.test_top1:.3f} | {its} | {r.seconds:.0f} s |"
        )
    return "\n".join(lines)


def write_report(
    out: Path,
    results: list[RunResult],
    metrics: dict[str, Any],
    attention: dict[str, Any] | None,
    quick: bool,
) -> Path:
    total = metrics["total_seconds"]
    ok = metrics["targets_met"]
    lines = [
        "# nlnet demo: C2D vs C2D + one non-local block" + (" (quick smoke run)" if quick else ""),
        "",
        "Task: *colour match across time* (`nlnet.data.synthetic`): 8-frame 32×32 clips, square A",
        "in frames 0–2 and square B in frames 5–7 at random places; label = same colour or not",
        "(balanced). Per-frame convolutions + average pooling make the C2D score additive over",
        "the two squares, and no additive score can tell *same* from *different* (best possible",
        "64.3 %); one non-local block relates the squares directly (paper §3, Eq. 1).",
        "",
        results_table(results),
        "",
        f"Whole demo: {total:.0f} s. Targets: non-local ≥ {TARGETS['nonlocal_min']:.2f}, "
        f"baseline ≤ {TARGETS['baseline_max']:.2f}, ≤ {TARGETS['seconds_max']:.0f} s: "
        + ("**met**." if ok else "**not met**.")
        + (" (Quick mode: numbers are meaningless.)" if quick else ""),
        "",
        "Validation: the fixed validation set the runs were monitored on (and stopped at);",
        "test: a separate held-out set scored by `nlnet eval`'s code on the final checkpoint.",
        "",
        "## Training curves (Figure 4 style)",
        "",
        "![training curves](curves.png)",
        "",
        "Dashed: training error; solid: validation error (%), against iterations.",
        "",
    ]
    if attention is not None:
        qa = attention["queries"]["square_a"]
        qb = attention["queries"]["square_b"]
        lines += [
            "## Where the non-local block looks (Figure 3 style)",
            "",
            "![attention arrows](attention.png)",
            "",
            f"Validation clip {attention['val_index']} (same colour), block "
            f"`{attention['block']}`. From a query at the centre of each square, arrows go to the",
            "20 key positions with the largest weight f(x_i, x_j)/C(x) over all frames (opacity grows with",
            "weight). Keys are on the block's 2×2-pooled grid, drawn at the centre of the pixels",
            "they pool.",
            "",
            "| query | weight on its own square | weight on the other square | top-20 arrows to the other square |",
            "|---|---:|---:|---:|",
            f"| square A (frame {qa['frame']}) | {qa['weight_on_own_square']:.2f} | "
            f"{qa['weight_on_other_square']:.2f} | {qa['top20_arrows_to_other_square']} |",
            f"| square B (frame {qb['frame']}) | {qb['weight_on_own_square']:.2f} | "
            f"{qb['weight_on_other_square']:.2f} | {qb['top20_arrows_to_other_square']} |",
            "",
            f"Weight on the two squares together: {qa['weight_on_own_square'] + qa['weight_on_other_square']:.2f} "
            f"for the query at A, {qb['weight_on_own_square'] + qb['weight_on_other_square']:.2f} "
            "for the query at B; background positions share the rest. Where a query looks at",
            "the *other* square, the block carries that square's colour across frames — the",
            "relation C2D cannot compute.",
            "",
            "![attention heat maps](attention_heatmap.png)",
            "",
            "The same weights as heat maps, one row per query (ring = the query).",
            "",
        ]
    lines += [
        "## Files",
        "",
        "- `metrics.json`: accuracies (fractions), iterations, times, targets.",
        *(f"- `{r.key}/`: engine run directory of {r.label} (config, metrics.jsonl, "
          f"checkpoint, test predictions)" for r in results),
        "",
    ]  # fmt: skip
    path = out / "report.md"
    _atomic_write(path, "\n".join(lines))
    return path


def run_demo(
    out: Path,
    *,
    quick: bool = False,
    with_i3d: bool = False,
    seed: int = 0,
    stop_at: float | None = 0.95,
    optimizer: str = "adamw",
    config_dir: Path | None = None,
    extra_overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Run the whole demo into ``out``; return the contents of ``metrics.json``."""
    from nlnet.viz.curves import plot_runs

    config_dir = Path(config_dir) if config_dir is not None else default_config_dir()
    missing = [r for r, _ in MODELS.values() if not (config_dir / r).is_file()]
    if missing:
        raise FileNotFoundError(
            f"demo recipes {missing} not found in {config_dir}; run from a source checkout or "
            "pass --configs DIR (the repository's configs/demo)"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = [f"train.seed={seed}", f"data.extra.seed={seed}"]
    if quick:
        overrides += QUICK_OVERRIDES
    overrides += list(extra_overrides or [])
    keys = ["baseline", "nonlocal"] + (["i3d"] if with_i3d else [])
    start = time.perf_counter()
    results = []
    for n, key in enumerate(keys, 1):
        print(f"[{n}/{len(keys)}] training {MODELS[key][1]} ...", file=sys.stderr, flush=True)
        results.append(train_one(key, config_dir, out, overrides, stop_at, optimizer))
    print("drawing figures ...", file=sys.stderr, flush=True)
    plot_runs([r.run_dir for r in results], out / "curves.png", labels=[r.label for r in results])
    by_key = {r.key: r for r in results}
    attention = attention_figure(
        by_key["nonlocal"],
        config_dir,
        [*overrides, f"train.output_dir={by_key['nonlocal'].run_dir}"],
        out,
    )
    total = time.perf_counter() - start
    metrics: dict[str, Any] = {
        r.key: {
            "model": r.model,
            "val_top1": r.val_top1,
            "test_top1": r.test_top1,
            "iterations": r.iterations,
            "max_iter": r.max_iter,
            "stopped_early": r.stopped_early,
            "train_seconds": round(r.seconds, 1),
            "params": r.params,
        }
        for r in results
    }
    accuracy_ok = (
        by_key["nonlocal"].val_top1 >= TARGETS["nonlocal_min"]
        and by_key["baseline"].val_top1 <= TARGETS["baseline_max"]
    )
    ok = accuracy_ok and total <= TARGETS["seconds_max"]
    metrics.update(
        {
            "total_seconds": round(total, 1),
            "quick": quick,
            "seed": seed,
            "stop_at": stop_at,
            "optimizer": optimizer,
            "targets": TARGETS,
            "targets_met": bool(ok),
            "accuracy_targets_met": bool(accuracy_ok),
            "attention": attention,
            "torch_threads": torch.get_num_threads(),
        }
    )
    _atomic_write(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_report(out, results, metrics, attention, quick)
    print(results_table(results))
    print(
        f"\nwhole demo {total:.0f} s; targets {'met' if ok else 'NOT met'}"
        + (" (quick mode: smoke test only)" if quick else "")
        + f"\nreport: {out / 'report.md'}"
    )
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    parser.add_argument(
        "--quick", action="store_true", help="seconds-long smoke run of the whole pipeline (CI)"
    )
    parser.add_argument("--i3d", action="store_true", help="also train the I3D baseline")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data (default 0)")
    parser.add_argument(
        "--target",
        type=float,
        default=0.95,
        help="stop a run once its val accuracy reaches this fraction; 0 = never (default 0.95)",
    )
    parser.add_argument(
        "--optimizer",
        default="adamw",
        choices=tuple(OPTIMIZERS),
        help="adamw (warm-up + cosine, default) or sgd (the engine's SGD + LR steps; give it solver.base_lr=0.05)",
    )
    parser.add_argument(
        "--configs", default=None, help="directory of the demo recipes (default: configs/demo)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for PyTorch (default: the idle cores, see auto_threads)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides for every model"
    )


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.target <= 1 or math.isnan(args.target):
        print(
            f"nlnet demo: --target must be a fraction in [0, 1], got {args.target}", file=sys.stderr
        )
        return 2
    from nlnet.config import ConfigError

    if args.threads is not None and args.threads < 1:
        print(f"nlnet demo: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    threads = args.threads or auto_threads()
    torch.set_num_threads(threads)
    print(f"nlnet demo: {threads} CPU thread(s)", file=sys.stderr)

    try:
        metrics = run_demo(
            Path(args.out),
            quick=args.quick,
            with_i3d=args.i3d,
            seed=args.seed,
            stop_at=args.target or None,
            optimizer=args.optimizer,
            config_dir=args.configs,
            extra_overrides=args.overrides,
        )
    except (ConfigError, FileNotFoundError) as e:
        print(f"nlnet demo: {e}", file=sys.stderr)
        return 2
    if args.quick:
        return 0
    # Accuracy targets decide the exit status; time depends on the machine's other load.
    return 0 if metrics["accuracy_targets_met"] else 1
