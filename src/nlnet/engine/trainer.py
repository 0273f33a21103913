"""The training loop of paper §4.1 for any registered task (``nlnet train`` runs it).

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

import contextlib
import json
import signal
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from nlnet.config import Config, ConfigError, dump_yaml, to_dict
from nlnet.engine import distributed as dist
from nlnet.engine.checkpoint import (
    FORMAT_VERSION,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    set_rng_state,
    unwrap,
    weights_metadata,
)
from nlnet.engine.memory import MemoryPolicy, release_freed_memory
from nlnet.engine.optim import (
    BatchPlan,
    build_optimizer,
    build_schedule,
    plan_batches,
    set_lr,
)
from nlnet.engine.precise_bn import bn_modules, update_bn_stats
from nlnet.engine.runtime import (
    autocast_factory,
    channels_last,
    global_flags,
    precision,
    restore_global_flags,
    setup,
    to_channels_last,
)
from nlnet.engine.samplers import ShardSampler, TrainBatchSampler, derive_seed
from nlnet.engine.task import Task, build_task
from nlnet.engine.threads import ThreadChoice, ThreadTuner
from nlnet.io import atomic_save, atomic_write_text
from nlnet.models.conv import guard_convolutions


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
        if cfg.train.threads < 0:
            raise ConfigError(
                f"train.threads must be 0 (measured) or a thread count, got {cfg.train.threads}"
            )
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
        #: ``train.amp`` and ``train.memory_format`` resolved for this device (logged at start).
        self.train_amp = precision(cfg.train.amp, self.device, training=True)
        self.channels_last = channels_last(cfg, self.device)
        self.autocast = autocast_factory(cfg, self.device, training=True)  # forward + backward
        self.eval_autocast = autocast_factory(cfg, self.device)  # validation
        self._stop_signal = 0
        self._last_good: Path | None = None  # the latest checkpoint written (or found)
        #: The ``early_stop`` record when ``train.stop_at_val_top1`` ended the run, else None.
        self.early_stop: dict[str, Any] | None = None
        #: Every record written to ``metrics.jsonl`` by this run, in memory (train/val/early_stop).
        self.history: list[dict[str, Any]] = []

    # -- set-up -------------------------------------------------------------------------------
    def _thread_tuner(self) -> ThreadTuner | None:
        """``train.threads``: a fixed count is set here; 0 measures (see the config key)."""
        n = self.cfg.train.threads
        if n > 0:
            torch.set_num_threads(n)
            return None
        cores = torch.get_num_threads()
        if self.device.type != "cpu" or self.world > 1 or cores < 2 or self.cfg.train.deterministic:
            return None  # deterministic: a timing-dependent thread count could change the bits
        return ThreadTuner([cores, 1])

    def _prepare(self) -> None:
        cfg = self.cfg
        self._resumed_stop: dict[str, Any] | None = None
        torch.manual_seed(derive_seed(cfg.train.seed, self.rank, 3))
        self.train_set = self.task.build_dataset("train")
        self.val_set = self.task.build_dataset("val") if cfg.train.eval_period > 0 else None
        model = self.model.to(self.device)
        if self.channels_last:
            to_channels_last(model)
        if self.device.type == "cpu" and self.train_amp == "bf16":
            guard_convolutions(model)  # oneDNN's bf16 weight-gradient bug (nlnet.models.conv)
        if cfg.train.sync_bn and self.world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            self.model = model
        self.schedule = build_schedule(cfg.solver, self.plan)
        self.optimizer = build_optimizer(model, cfg.solver, self.schedule.lr_at(0))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.train_amp == "fp16")
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
                atomic_write_text(self.out / "config.yaml", dump_yaml(self.cfg))
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
        atomic_write_text(f, "".join(ln + "\n" for ln in keep))

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
        self.model.train()  # frozen BN layers are FrozenBatchNorm: train() does not touch them

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
            # The statistics serve evaluation, so they are measured in its precision.
            with self.eval_autocast():
                self.task.training_step(model, batch, self.device)

        used = update_bn_stats(self.model, loader, fwd, n)
        _log(f"precise BN: statistics re-estimated from {used} batches per process")

    def evaluate(self) -> dict[str, Any]:
        self.model.eval()
        sampler = ShardSampler(len(self.val_set), self.rank, self.world)
        loader = self._loader(sampler, self.cfg.eval.num_workers, batch=False)
        with torch.no_grad(), self.eval_autocast():
            result = self.task.evaluate(self.model, loader, self.device, None)
        self._train_mode()
        return result

    def save(self) -> Path:
        path = checkpoint_path(self.out, self.iteration)
        rngs = dist.all_gather_object(rng_state())
        if dist.is_main():
            state = {
                # Self-describing (docs/models.md): arch, model_kwargs, classes, preprocessing.
                **weights_metadata(self.cfg, self.model),
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
        """The §4.1 loop: one optimiser step per iteration, then logging, precise BN,
        validation, early stop and checkpoints on their periods; a stop signal checkpoints."""
        self._prepare()
        self._announce()
        self._open_tensorboard()
        last_eval: dict[str, Any] = {}
        if self._already_finished():
            if self.tb is not None:
                self.tb.close()
            return last_eval
        data = iter(self._loader(self._train_sampler(), self.cfg.data.num_workers, batch=True))
        old_handlers = self._install_signals()
        bar = self._progress_bar()
        self._train_mode()
        window = _LogWindow(self.iteration)
        self._last_good = latest_checkpoint(self.out)
        threads, tuner = torch.get_num_threads(), self._thread_tuner()
        release = self.cfg.train.release_memory and self.device.type == "cpu"
        memory = ExitStack()  # the allocator setting holds for the loop only
        try:
            self._log_memory(memory.enter_context(release_freed_memory(release)))
            while self.iteration < self.schedule.max_iter:
                lr = self._step_lr()
                choice = tuner.choice if tuner is not None else None
                with tuner.iteration() if tuner is not None else nullcontext():
                    stop = self._optimizer_step(data, lr, window)
                if tuner is not None and tuner.choice is not choice:
                    self._log_threads(tuner.choice)
                self.iteration += 1
                if bar is not None:
                    bar.update(1)
                self._log_train(lr, window, bar)
                last_eval, finished = self._after_step(last_eval, stop)
                if finished:
                    break
        finally:
            memory.close()
            torch.set_num_threads(threads)
            for s, h in old_handlers.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
            if self.tb is not None:
                self.tb.close()
        return last_eval

    def _log_memory(self, policy: MemoryPolicy) -> None:
        if self.device.type == "cpu" and dist.is_main():
            _log(f"CPU memory: {'released' if policy.applied else 'kept'} ({policy.reason})")

    def _log_threads(self, choice: ThreadChoice | None) -> None:
        if choice is not None and dist.is_main():
            times = ", ".join(f"{n}: {t:.3g} s" for n, t in choice.seconds_per_step.items())
            _log(f"CPU threads: {choice.threads} (measured per iteration: {times})")

    # -- the steps of one iteration ---------------------------------------------------------
    def _announce(self) -> None:
        cfg, plan = self.cfg, self.plan
        _log(
            f"training {cfg.model.name} on {len(self.train_set)} samples: {self.world} process(es) × "
            f"{plan.batch_size} clips × {plan.accumulation} accumulation = {plan.global_batch} per "
            f"iteration, base LR {self.schedule.base_lr:g}, {self.schedule.max_iter} iterations, "
            f"device {self.device}, {self._precision_note()}"
        )

    def _precision_note(self) -> str:
        note = "float32" if self.train_amp == "none" else f"{self.train_amp} autocast"
        if self.channels_last:
            note += ", channels-last"
        return note + (" (train.amp=auto)" if self.cfg.train.amp == "auto" else "")

    def _already_finished(self) -> bool:
        """A resumed run that already stopped early under this target, or ran all iterations."""
        target, done = self.cfg.train.stop_at_val_top1, self._resumed_stop
        if done is not None and target is not None and done["video_top1"] >= target:
            # The checkpoint is the end of a run that stopped early under this same target.
            self.early_stop = done
            _log(f"already finished (stopped early at iteration {self.iteration}: {done})")
            return True
        if self.iteration >= self.schedule.max_iter:
            _log(f"already finished ({self.iteration}/{self.schedule.max_iter} iterations)")
            return True
        return False

    def _train_sampler(self) -> TrainBatchSampler:
        return TrainBatchSampler(
            len(self.train_set),
            self.plan.batch_size,
            seed=self.cfg.train.seed,
            start_iter=self.iteration,
            rank=self.rank,
            world_size=self.world,
            accumulation=self.plan.accumulation,
        )

    def _progress_bar(self) -> Any:
        if not (self.cfg.train.progress and dist.is_main()):
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.schedule.max_iter,
            initial=self.iteration,
            desc="train",
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def _step_lr(self) -> float:
        """The schedule's LR for this iteration (§4.1: steps, warm-up), set on the optimiser."""
        lr = self.schedule.lr_at(self.iteration)
        set_lr(self.optimizer, lr, self.cfg.solver.scale_momentum)
        return lr

    def _optimizer_step(self, data: Any, lr: float, window: _LogWindow) -> bool:
        """One optimiser step over ``plan.accumulation`` micro-batches; True if a stop signal came.

        Gradients are all-reduced only on the last micro-batch (``no_sync`` before it).
        """
        accumulation = self.plan.accumulation
        self.optimizer.zero_grad(set_to_none=True)
        stop = False
        for a in range(accumulation):
            batch = next(data)
            sync = (
                self.train_model.no_sync()
                if self.world > 1 and a < accumulation - 1 and hasattr(self.train_model, "no_sync")
                else nullcontext()
            )
            with sync:
                with self.autocast():
                    loss, scalars = self.task.training_step(self.train_model, batch, self.device)
                stop = self._check_loss_and_signals(loss, lr)
                self.scaler.scale(loss / accumulation).backward()
            window.add(scalars)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return stop

    def _check_loss_and_signals(self, loss: torch.Tensor, lr: float) -> bool:
        """NaN guard and stop signal, agreed by all processes in one all-reduce.

        Raises :class:`NonFiniteLossError` if any process's loss is not finite; returns True if
        any process received SIGTERM/SIGINT.
        """
        flags = torch.tensor(
            [0.0 if torch.isfinite(loss.detach()).item() else 1.0, float(self._stop_signal)]
        )
        flags = dist.all_reduce_sum(flags)
        if flags[0] > 0:
            raise NonFiniteLossError(
                f"the training loss is {float(loss.detach()):g} at iteration {self.iteration} "
                f"(LR {lr:g}); stopping. Last good checkpoint: "
                f"{self._last_good or 'none written yet'}. Lower solver.base_lr, add "
                "solver.warmup_iters, or check the data for broken clips."
            )
        return bool(flags[1] > 0)

    def _log_train(self, lr: float, window: _LogWindow, bar: Any) -> None:
        """Every ``train.log_period`` iterations (and at the end): the averaged training scalars
        and the throughput since the previous record."""
        it, max_iter = self.iteration, self.schedule.max_iter
        if not (it % self.cfg.train.log_period == 0 or it == max_iter):
            return
        keys = sorted(window.sums)
        avg = dist.all_reduce_mean(
            torch.tensor([window.sums[k] / max(window.count, 1) for k in keys], dtype=torch.float64)
        )
        rec = {"iteration": it, "split": "train", "lr": lr}
        rec.update({k: float(v) for k, v in zip(keys, avg)})
        rec["clips_per_s"] = window.throughput(it, self.plan.global_batch)
        self._record(rec)
        if bar is not None:
            bar.set_postfix(
                loss=f"{rec.get('loss', float('nan')):.4f}",
                lr=f"{lr:.3g}",
                clips_s=f"{rec['clips_per_s']:.1f}",
            )

    def _validate(self) -> dict[str, Any]:
        """Score the validation set, record and print the result."""
        it = self.iteration
        result = self.evaluate()
        numbers = {k: v for k, v in result.items() if isinstance(v, int | float)}
        self._record({"iteration": it, "split": "val", **numbers})
        floats = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float))
        _log(f"iteration {it}: val {floats}")
        return result

    def _after_step(self, last_eval: dict[str, Any], stop: bool) -> tuple[dict[str, Any], bool]:
        """Precise BN, validation, early stop, checkpoint and stop signal after an iteration.

        Returns the latest validation result and whether the run ends here (early stop); a stop
        signal raises :class:`Interrupted` after writing a checkpoint.
        """
        cfg, it, max_iter = self.cfg, self.iteration, self.schedule.max_iter
        target = cfg.train.stop_at_val_top1
        do_ckpt = it % cfg.train.checkpoint_period == 0 or it == max_iter
        do_eval = self.val_set is not None and (it % cfg.train.eval_period == 0 or it == max_iter)
        if do_ckpt or do_eval:
            self.precise_bn()
        if do_eval:
            last_eval = self._validate()
        reached = do_eval and target is not None and self._reached(last_eval, target)
        if reached:
            self.early_stop = {
                "iteration": it,
                "split": "early_stop",
                "video_top1": float(last_eval["video_top1"]),
                "stop_at_val_top1": target,
            }
        if do_ckpt or reached:
            self._last_good = self.save()
        if reached and self.early_stop is not None:
            self._record(self.early_stop)
            _log(
                f"iteration {it}: val video_top1 {last_eval['video_top1']:.4g} reached "
                f"train.stop_at_val_top1={target:g}; checkpoint {self._last_good}, stopping"
            )
            return last_eval, True
        if stop and it < max_iter:
            path = self._last_good if do_ckpt else self.save()
            raise Interrupted(self._stop_signal or signal.SIGTERM, it, path)
        return last_eval, False


@dataclass
class _LogWindow:
    """Training scalars summed, and the clock, since the previous training log record."""

    iteration: int
    start: float = field(default_factory=time.perf_counter)
    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def add(self, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def throughput(self, iteration: int, global_batch: int) -> float:
        """Clips per second since the window opened; then open a new window at ``iteration``."""
        now = time.perf_counter()
        rate = (iteration - self.iteration) * global_batch / max(now - self.start, 1e-9)
        self.iteration, self.start, self.sums, self.count = iteration, now, {}, 0
        return rate
