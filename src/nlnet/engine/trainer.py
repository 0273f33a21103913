"""``nlnet train CONFIG [key=value ...]``: the training loop of paper §4.1 for any registered task.

One iteration = one optimiser step over the global batch (processes × micro-batches, see
``engine/optim.py``). Every ``train.checkpoint_period`` iterations (and at the end) BN statistics
are re-estimated ("precise BN") and a checkpoint is written atomically by rank 0; every
``train.eval_period`` iterations the validation set is scored; with ``train.stop_at_val_top1``
the run ends (checkpoint written) after the first validation whose top-1 reaches it.
SIGTERM/SIGINT finish the current iteration, write a checkpoint and exit; ``train.resume=auto``
continues from it with the same data order, augmentation and random state, so the final weights
equal an uninterrupted run's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from nlnet.config import Config, ConfigError, dump_yaml, load_config, to_dict
from nlnet.engine import distributed as dist
from nlnet.engine.checkpoint import (
    FORMAT_VERSION,
    atomic_save,
    atomic_write_text,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    set_rng_state,
    unwrap,
)
from nlnet.engine.optim import (
    BatchPlan,
    build_optimizer,
    build_schedule,
    plan_batches,
    set_lr,
)
from nlnet.engine.precise_bn import bn_modules, keep_frozen, update_bn_stats
from nlnet.engine.runtime import autocast_factory, global_flags, restore_global_flags, setup
from nlnet.engine.sampling import ShardSampler, TrainBatchSampler, derive_seed
from nlnet.engine.task import Task, build_task


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was written."""

    def __init__(self, signum: int, iteration: int, path: Path | None) -> None:
        super().__init__(f"signal {signum} at iteration {iteration}")
        self.signum, self.iteration, self.path = signum, iteration, path


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process, which checkpoints and then
    shuts them down (a scheduler signalling the whole process group must not kill them first)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _log(msg: str) -> None:
    if dist.is_main():
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)


class Trainer:
    """Trains ``cfg``'s task; ``run()`` returns the last validation metrics."""

    def __init__(self, cfg: Config, task: Task | None = None) -> None:
        self.cfg = cfg
        self._flags = global_flags()
        try:
            self.device, self.rank, self.world = setup(cfg)
            self.plan: BatchPlan = plan_batches(cfg.solver, self.world)
            self.task = task if task is not None else build_task(cfg.task, cfg)
            # The model is built first: a bad model name or keyword fails before any data work.
            # Its random initialisation depends on train.seed only (identical on every process).
            torch.manual_seed(derive_seed(cfg.train.seed, 6))
            self.model: nn.Module = self.task.build_model()
        except BaseException:
            restore_global_flags(self._flags)
            raise
        self.out = Path(cfg.train.output_dir)
        self.autocast = autocast_factory(cfg, self.device)
        self._stop_signal = 0
        #: The ``early_stop`` record when ``train.stop_at_val_top1`` ended the run, else None.
        self.early_stop: dict[str, Any] | None = None
        #: Every record written to ``metrics.jsonl`` by this run, in memory (train/val/early_stop).
        self.history: list[dict[str, Any]] = []

    # -- set-up -------------------------------------------------------------------------------
    def _prepare(self) -> None:
        cfg = self.cfg
        self._resumed_stop: dict[str, Any] | None = None
        torch.manual_seed(derive_seed(cfg.train.seed, self.rank, 3))
        self.train_set = self.task.build_dataset("train")
        self.val_set = self.task.build_dataset("val") if cfg.train.eval_period > 0 else None
        model = self.model.to(self.device)
        if cfg.train.sync_bn and self.world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            self.model = model
        self.schedule = build_schedule(cfg.solver, self.plan)
        self.optimizer = build_optimizer(model, cfg.solver, self.schedule.lr_at(0))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.amp == "fp16")
        self.iteration = 0
        self._resume()
        train_model: nn.Module = model
        if self.world > 1:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if cfg.train.compile:
            train_model = torch.compile(train_model)
        self.train_model = train_model

    def _resume(self) -> None:
        r = self.cfg.train.resume
        path: Path | None
        if r == "none":
            path = None
        elif r == "auto":
            path = latest_checkpoint(self.out)
        else:
            path = Path(r)
            if not path.is_file():
                raise ConfigError(f"train.resume: checkpoint not found: {r}")
        # Rank 0 decides, so every process resumes from the same checkpoint.
        chosen = dist.broadcast_object(str(path) if path is not None else None)
        path = Path(chosen) if chosen is not None else None
        if path is not None and not path.is_file():
            raise FileNotFoundError(
                f"process {self.rank} cannot read checkpoint {path}: train.output_dir must be on a "
                "file system shared by all nodes"
            )
        if path is None:
            if dist.is_main():
                self.out.mkdir(parents=True, exist_ok=True)
                atomic_write_text(dump_yaml(self.cfg), self.out / "config.yaml")
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
            return
        ck = load_checkpoint(path, map_location=self.device)
        # Checkpoints from before solver.optimizer existed were all SGD.
        kind = ck.get("optimizer_kind", "sgd")
        if kind != self.cfg.solver.optimizer:
            raise ConfigError(
                f"solver.optimizer: the checkpoint {path} was trained with {kind!r}, the config says "
                f"{self.cfg.solver.optimizer!r}; resume with the same optimizer (or "
                "train.resume=none, or model.init_from to start a new run from its weights)"
            )
        unwrap(self.model).load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        # The schedule follows the config given now (so a run can be extended by raising
        # solver.max_iter); say so when it differs from the one the checkpoint was trained with.
        if ck.get("schedule") and ck["schedule"] != self.schedule.state_dict():
            _log(
                f"note: the LR schedule differs from the checkpoint's ({ck['schedule']}); using {self.schedule.state_dict()}"
            )
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.iteration = int(ck["iteration"])
        self._resumed_stop = ck.get("early_stop")
        rngs = ck.get("rng") or []
        if len(rngs) == self.world:
            set_rng_state(rngs[self.rank])
        else:  # a different number of processes: fresh but reproducible streams
            torch.manual_seed(derive_seed(self.cfg.train.seed, self.rank, self.iteration, 4))
        if dist.is_main():
            self._truncate_metrics(self.iteration)
        _log(f"resumed from {path} at iteration {self.iteration}")

    def _truncate_metrics(self, iteration: int) -> None:
        """Drop records written after the checkpoint (they will be produced again)."""
        f = self.out / "metrics.jsonl"
        if not f.is_file():
            return
        keep = []
        for ln in f.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError:  # a line cut short when the job was killed
                continue
            if isinstance(rec, dict) and rec.get("iteration", iteration + 1) <= iteration:
                keep.append(ln)
        atomic_write_text("".join(ln + "\n" for ln in keep), f)

    def _loader(self, sampler: Any, workers: int, *, batch: bool) -> DataLoader:
        kw: dict[str, Any] = {
            "num_workers": workers,
            "collate_fn": self.task.collate_fn(),
            "pin_memory": self.device.type == "cuda",
            # Own generator: creating an iterator must not consume the global random stream.
            "generator": torch.Generator().manual_seed(0),
        }
        if workers > 0:
            kw["prefetch_factor"] = 2
            kw["worker_init_fn"] = _ignore_stop_signals
        if batch:
            return DataLoader(self.train_set, batch_sampler=sampler, **kw)
        return DataLoader(self.val_set, sampler=sampler, batch_size=self.cfg.eval.batch_size, **kw)

    # -- signals ------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal:  # a second signal: stop now, without a checkpoint
            raise KeyboardInterrupt
        self._stop_signal = signum
        _log(f"signal {signum}: finishing iteration {self.iteration + 1}, then checkpoint and exit")

    def _install_signals(self) -> dict[int, Any]:
        old = {}
        for s in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                old[s] = signal.signal(s, self._on_signal)
        return old

    # -- actions ------------------------------------------------------------------------------
    def _train_mode(self) -> None:
        self.model.train()
        keep_frozen(self.model)

    def precise_bn(self) -> None:
        n = self.cfg.train.precise_bn_batches
        if n <= 0 or not bn_modules(self.model):
            return
        sampler = TrainBatchSampler(
            len(self.train_set),
            self.plan.batch_size,
            seed=derive_seed(self.cfg.train.seed, self.iteration, 5),
            rank=self.rank,
            world_size=self.world,
            stream=1,
        )
        loader = self._loader(sampler, self.cfg.data.num_workers, batch=True)

        def fwd(model: nn.Module, batch: Any) -> None:
            with self.autocast():
                self.task.training_step(model, batch, self.device)

        used = update_bn_stats(self.model, loader, fwd, n)
        _log(f"precise BN: statistics re-estimated from {used} batches per process")

    def evaluate(self) -> dict[str, Any]:
        self.model.eval()
        sampler = ShardSampler(len(self.val_set), self.rank, self.world)
        loader = self._loader(sampler, self.cfg.eval.num_workers, batch=False)
        with torch.no_grad(), self.autocast():
            result = self.task.evaluate(self.model, loader, self.device, None)
        self._train_mode()
        return result

    def save(self) -> Path:
        path = checkpoint_path(self.out, self.iteration)
        rngs = dist.all_gather_object(rng_state())
        if dist.is_main():
            state = {
                "nlnet_checkpoint": FORMAT_VERSION,
                "iteration": self.iteration,
                "model": unwrap(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "optimizer_kind": self.cfg.solver.optimizer,
                "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "rng": rngs,
                "world_size": self.world,
                "global_batch": self.plan.global_batch,
                "config": to_dict(self.cfg),
            }
            if self.early_stop is not None:
                state["early_stop"] = self.early_stop
            atomic_save(state, path)
            prune_checkpoints(self.out, self.cfg.train.keep_checkpoints)
        dist.barrier()
        return path

    def _record(self, rec: dict[str, Any]) -> None:
        self.history.append(rec)
        if not dist.is_main():
            return
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            split = rec["split"]
            for k, v in rec.items():
                if k not in ("iteration", "split") and isinstance(v, int | float):
                    self.tb.add_scalar(f"{split}/{k}", v, rec["iteration"])

    def _open_tensorboard(self) -> None:
        self.tb = None
        if not dist.is_main():
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            _log("tensorboard is not installed; scalars go to metrics.jsonl only")
            return
        self.tb = SummaryWriter(
            log_dir=str(self.out / "tensorboard"), purge_step=self.iteration or None
        )

    def _reached(self, result: dict[str, Any], target: float) -> bool:
        """Whether a validation result meets ``train.stop_at_val_top1`` (both in percent)."""
        value = result.get("video_top1")
        if not isinstance(value, int | float):
            raise ConfigError(
                "train.stop_at_val_top1: this task's validation reports no video_top1 (it "
                f"reports {sorted(k for k, v in result.items() if isinstance(v, int | float))}); "
                "set train.stop_at_val_top1=null"
            )
        return value >= target

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            restore_global_flags(self._flags)

    def _run(self) -> dict[str, Any]:
        self._prepare()
        cfg, plan = self.cfg, self.plan
        max_iter = self.schedule.max_iter
        _log(
            f"training {cfg.model.name} on {len(self.train_set)} samples: {self.world} process(es) × "
            f"{plan.batch_size} clips × {plan.accumulation} accumulation = {plan.global_batch} per "
            f"iteration, base LR {self.schedule.base_lr:g}, {max_iter} iterations, device {self.device}"
        )
        self._open_tensorboard()
        last_eval: dict[str, Any] = {}
        target = cfg.train.stop_at_val_top1
        done = self._resumed_stop
        if done is not None and target is not None and done["video_top1"] >= target:
            # The checkpoint is the end of a run that stopped early under this same target.
            self.early_stop = done
            _log(f"already finished (stopped early at iteration {self.iteration}: {done})")
            if self.tb is not None:
                self.tb.close()
            return last_eval
        if self.iteration >= max_iter:
            _log(f"already finished ({self.iteration}/{max_iter} iterations)")
            if self.tb is not None:
                self.tb.close()
            return last_eval
        sampler = TrainBatchSampler(
            len(self.train_set),
            plan.batch_size,
            seed=cfg.train.seed,
            start_iter=self.iteration,
            rank=self.rank,
            world_size=self.world,
            accumulation=plan.accumulation,
        )
        data = iter(self._loader(sampler, cfg.data.num_workers, batch=True))
        old_handlers = self._install_signals()
        bar = None
        if cfg.train.progress and dist.is_main():
            from tqdm import tqdm

            bar = tqdm(
                total=max_iter,
                initial=self.iteration,
                desc="train",
                dynamic_ncols=True,
                file=sys.stderr,
            )
        self._train_mode()
        sums: dict[str, float] = {}
        count = 0
        t0, it0 = time.perf_counter(), self.iteration
        last_good = latest_checkpoint(self.out)
        try:
            while self.iteration < max_iter:
                lr = self.schedule.lr_at(self.iteration)
                set_lr(self.optimizer, lr, cfg.solver.scale_momentum)
                self.optimizer.zero_grad(set_to_none=True)
                stop = 0
                for a in range(plan.accumulation):
                    batch = next(data)
                    sync = (
                        self.train_model.no_sync()
                        if self.world > 1
                        and a < plan.accumulation - 1
                        and hasattr(self.train_model, "no_sync")
                        else nullcontext()
                    )
                    with sync:
                        with self.autocast():
                            loss, scalars = self.task.training_step(
                                self.train_model, batch, self.device
                            )
                        flags = torch.tensor(
                            [
                                0.0 if torch.isfinite(loss.detach()).item() else 1.0,
                                float(self._stop_signal),
                            ]
                        )
                        flags = dist.all_reduce_sum(flags)
                        if flags[0] > 0:
                            raise NonFiniteLossError(
                                f"the training loss is {float(loss.detach()):g} at iteration {self.iteration} "
                                f"(LR {lr:g}); stopping. Last good checkpoint: "
                                f"{last_good or 'none written yet'}. Lower solver.base_lr, add "
                                "solver.warmup_iters, or check the data for broken clips."
                            )
                        stop = int(flags[1] > 0)
                        self.scaler.scale(loss / plan.accumulation).backward()
                    for k, v in scalars.items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.iteration += 1
                it = self.iteration
                if bar is not None:
                    bar.update(1)
                if it % cfg.train.log_period == 0 or it == max_iter:
                    keys = sorted(sums)
                    avg = dist.all_reduce_mean(
                        torch.tensor([sums[k] / max(count, 1) for k in keys], dtype=torch.float64)
                    )
                    rec = {"iteration": it, "split": "train", "lr": lr}
                    rec.update({k: float(v) for k, v in zip(keys, avg)})
                    now = time.perf_counter()  # throughput since the previous record
                    rec["clips_per_s"] = (it - it0) * plan.global_batch / max(now - t0, 1e-9)
                    t0, it0 = now, it
                    self._record(rec)
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{rec.get('loss', float('nan')):.4f}",
                            lr=f"{lr:.3g}",
                            clips_s=f"{rec['clips_per_s']:.1f}",
                        )
                    sums, count = {}, 0
                do_ckpt = it % cfg.train.checkpoint_period == 0 or it == max_iter
                do_eval = self.val_set is not None and (
                    it % cfg.train.eval_period == 0 or it == max_iter
                )
                if do_ckpt or do_eval:
                    self.precise_bn()
                if do_eval:
                    last_eval = self.evaluate()
                    self._record(
                        {
                            "iteration": it,
                            "split": "val",
                            **{k: v for k, v in last_eval.items() if isinstance(v, int | float)},
                        }
                    )
                    _log(
                        f"iteration {it}: val "
                        + ", ".join(
                            f"{k} {v:.4g}" for k, v in last_eval.items() if isinstance(v, float)
                        )
                    )
                reached = do_eval and target is not None and self._reached(last_eval, target)
                if reached:
                    self.early_stop = {
                        "iteration": it,
                        "split": "early_stop",
                        "video_top1": float(last_eval["video_top1"]),
                        "stop_at_val_top1": target,
                    }
                if do_ckpt or reached:
                    last_good = self.save()
                if reached and self.early_stop is not None:
                    self._record(self.early_stop)
                    _log(
                        f"iteration {it}: val video_top1 {last_eval['video_top1']:.4g} reached "
                        f"train.stop_at_val_top1={target:g}; checkpoint {last_good}, stopping"
                    )
                    break
                if stop and it < max_iter:
                    path = last_good if do_ckpt else self.save()
                    raise Interrupted(self._stop_signal or signal.SIGTERM, it, path)
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
            if self.tb is not None:
                self.tb.close()
        return last_eval


# -- command line -----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML recipe, e.g. configs/kinetics/i3d_r50_nl5_32x2.yaml")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. solver.base_lr=0.005",
    )


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        trainer = Trainer(cfg)
        trainer.run()
    except ConfigError as e:
        print(f"nlnet train: config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"nlnet train: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"nlnet train: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        if _launched_rank() == 0:
            print(
                f"nlnet train: stopped by signal {e.signum} at iteration {e.iteration}; "
                f"checkpoint {e.path} written; run the same command again to resume",
                file=sys.stderr,
            )
        return 128 + int(e.signum)
    finally:
        dist.shutdown()
    if _launched_rank() == 0:
        print(f"nlnet train: done; run directory {cfg.train.output_dir}", file=sys.stderr)
    return 0


def _launched_rank() -> int:
    # After the process group is gone, torchrun's RANK still says who we were.
    return int(os.environ.get("RANK", "0"))
