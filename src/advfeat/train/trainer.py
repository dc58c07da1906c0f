"""The trainer: one loop for every method, resumable, atomic, NaN-guarded, DDP-ready.

``Trainer(cfg, out_dir).fit()`` trains ``cfg.method`` and writes into ``out_dir``:

* ``config.yaml``: the resolved configuration;
* ``checkpoint.pt``: model, method, optimiser and history, written atomically after every epoch
  (``best.pt`` too when ``select_best`` keeps the best-validation epoch, the papers' protocol);
* ``history.csv`` and ``metrics.json`` (``method``, ``model``, ``dataset``, ``epochs``, ``seed``,
  ``clean_acc``, ``train_time_s``, ``history``, and accuracy on shifted domains where the dataset
  has them).

Every run trains through its task (:class:`advfeat.tasks.Task`): batches are collated and moved
by the task, the running loss is averaged over images (with the task's running metrics: training
accuracy for classification), and evaluation is the task's: ``metrics.json`` holds
``clean_<metric>`` for each of the task's metrics (``clean_acc`` / ``clean_top5``;
``clean_ap``, ``clean_ap50``, ``clean_ap75``; ``clean_miou``, ``clean_pixel_acc``), the
history ``val_<metric>`` / ``test_<metric>``, ``best_val_<primary metric>`` and
``shifted_<primary metric>`` per shifted domain. Detection never runs under autocast.

Reproducibility: the model is initialised from ``seed``; each epoch re-seeds the global RNG and the
sampler from ``(seed, epoch)``, so a run killed after epoch *k* and resumed ends with the same
weights as one that never stopped.

Batches come from a DataLoader or, with ``device_data`` (the default on CUDA for the in-memory
datasets), from the training images held on the device (:mod:`advfeat.train.device_data`: crop
and flip draws seeded by ``(seed, epoch)`` too). A step never waits for the device: the running
sums and the divergence watch stay there (:mod:`advfeat.train.running`) and are read at the end
of the epoch, before a mid-epoch checkpoint and every :data:`PROGRESS_EVERY` steps of the bar.
"""

from __future__ import annotations

import csv
import io
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from advfeat.attacks.base import ImageRange, deferred_finite_checks, deferred_image_checks
from advfeat.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
)
from advfeat.errors import AdvfeatError
from advfeat.methods import unwrap
from advfeat.tasks import Task
from advfeat.train.build import build_parts
from advfeat.train.config import TrainConfig
from advfeat.train.device_data import DeviceEpoch, augment_seed, device_images
from advfeat.train.distributed import EpochSampler, init_distributed
from advfeat.train.ema import ModelEMA
from advfeat.train.graphs import (
    CapturedStep,
    CudaGraphs,
    resolve_cuda_graph,
    run_refusal,
    set_learning_rate,
    use_tensor_learning_rates,
    warn_capture_failed,
)
from advfeat.train.loggers import Loggers
from advfeat.train.optim import build_optimizer
from advfeat.train.precision import MixedPrecision
from advfeat.train.preemption import PREEMPTED_EXIT, Preempted, PreemptionWatch
from advfeat.train.rundir import (
    RunLock,
    check_run_folder,
    clear_run,
    config_differences,
    resume_refusal,
)
from advfeat.train.running import DivergenceWatch, RunningSums, weight_norm
from advfeat.train.runtime import (
    cap_cuda_memory,
    resolve_device,
    set_deterministic,
    sync_batchnorm,
)
from advfeat.train.schedule import check_warmup, describe_schedule, lr_factor, warmup_length

__all__ = ["PREEMPTED_EXIT", "Preempted", "Trainer", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite; the last good checkpoint is kept."""


PROGRESS_EVERY = 50
"""Steps between two updates of the progress bar's running averages: each reads the running sums
from the device (a synchronisation); without the bar they are read once, at the end of the epoch."""


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch * 7919 + 1


class Trainer:
    """Train one run described by a :class:`TrainConfig` into ``out_dir``.

    :meth:`fit` runs the epochs; each one calls the public steps :meth:`train_epoch` (which sets
    the learning rate through :meth:`set_lr` at every step), :meth:`evaluate_into` for the
    validation and test splits, and the run ends with :meth:`finish`. A subclass (or a test) may
    wrap these steps; they are the trainer's only extension points.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: str | Path,
        *,
        resume: bool = False,
        force: bool = False,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.out = Path(out_dir)
        self.resume = resume
        self.device = resolve_device(cfg.device)
        self.dist = init_distributed(self.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        cap_cuda_memory(self.device)  # runs sharing a GPU (advfeat compare --jobs N)
        if cfg.batch_size % self.dist.world_size:
            raise AdvfeatError(
                f"batch_size {cfg.batch_size} must be divisible by the {self.dist.world_size} processes"
            )
        self.force = force
        check_run_folder(self.out, resume=resume, force=force)
        self._lock = RunLock(self.out)
        set_deterministic(cfg.deterministic)
        torch.manual_seed(cfg.seed)
        parts = build_parts(cfg)
        self.data, self.method = parts.data, parts.method
        self.task: Task = self.method.task
        self.model = parts.model.to(self.device)
        self.method.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(
            cfg.optimizer,
            self.method.parameter_groups(self.model),
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
            betas=cfg.adam_betas,
        )
        # a task may refuse autocast: torchvision's box coder and ROI pooling want float32
        self.precision = MixedPrecision(
            self.device, enabled=cfg.amp and self.task.autocast, dtype=cfg.amp_dtype
        )
        self.ema = ModelEMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.train_model: nn.Module = self.model
        if self.dist.enabled and cfg.sync_bn:
            self.model = sync_batchnorm(self.model)
            self.train_model = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)  # type: ignore[assignment]
        refusal = run_refusal(
            cfg, self.device, self.method.capture_refusal(), distributed=self.dist.enabled
        )
        self.cuda_graph = resolve_cuda_graph(cfg.cuda_graph, refusal)
        """Whether each epoch's steps are captured as one CUDA graph (``cuda_graph``)."""
        self.graph_note = (
            "captured" if self.cuda_graph else f"eager ({refusal or 'cuda_graph=false'})"
        )
        """How the steps ran, for metrics.json: captured, or eager and why."""
        if self.cuda_graph:
            use_tensor_learning_rates(self.optimizer, self.device)
        self._captured: CapturedStep | None = None
        # what a step writes to, kept for the whole run so that a captured step writes there
        self._sums = RunningSums(self.device)
        self._watch = DivergenceWatch(self.device)
        self._image_range = ImageRange(self.device)  # attacks' images, checked after step 1
        self._step_index = torch.zeros((), dtype=torch.int64, device=self.device)
        self.sampler = EpochSampler(
            len(self.data.train),  # type: ignore[arg-type]
            seed=cfg.seed,
            info=self.dist,
        )
        self.device_images = device_images(
            cfg.device_data, self.data.train, self.device, name=cfg.dataset
        )
        """The training images held on the device (``device_data``), or ``None``: a DataLoader."""
        warmup = warmup_length(cfg.warmup_epochs, cfg.warmup_steps, self.steps_per_epoch)
        check_warmup(
            warmup, total_epochs=cfg.epochs, schedule=cfg.schedule, milestones=cfg.milestones
        )
        self.schedule = describe_schedule(
            lr=cfg.lr,
            total_epochs=cfg.epochs,
            schedule=cfg.schedule,
            warmup=warmup,
            warmup_steps=cfg.warmup_steps if warmup > cfg.warmup_epochs else 0,
            milestones=cfg.milestones,
            gamma=cfg.gamma,
            power=cfg.poly_power,
        )
        """The learning-rate schedule in words (printed at the start, saved in metrics.json)."""
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.best_val = -1.0
        self.best_epoch = -1
        self.train_time = 0.0
        self._resume_stat: tuple[int, int, int] | None = None
        self._partial: dict[str, Any] | None = None
        self._preemption = PreemptionWatch(self.device, distributed=self.dist.enabled)
        self._resume_state = self._read_resume() if resume else None
        self.loggers = Loggers(cfg.loggers, self.out, cfg.to_dict()) if self.dist.is_main else None

    # ----------------------------------------------------------------------------- run folder
    def _read_resume(self) -> dict[str, Any]:
        """Load and verify the checkpoint to resume; refuse a different experiment (reads only)."""
        path = self.out / "checkpoint.pt"
        state = load_checkpoint(path, map_location=self.device)
        if "config" not in state or "model" not in state:
            raise AdvfeatError(f"{str(path)!r} holds no run configuration and model weights")
        saved = TrainConfig.from_dict(state["config"])
        diffs = config_differences(saved, self.cfg)
        if diffs:
            raise resume_refusal(self.out, diffs)
        self._resume_stat = _stat_key(path)
        return state

    def _open_run_folder(self) -> None:
        """Take the run folder's lock and prepare it (main process): re-check it under the lock,
        clear the old run on ``--force``, repair ``best.pt``, write ``config.yaml``."""
        self._lock.acquire()
        check_run_folder(self.out, resume=self.resume, force=self.force, locked=True)
        if self.resume and _stat_key(self.out / "checkpoint.pt") != self._resume_stat:
            self._resume_state = self._read_resume()  # another process wrote it meanwhile
        if self.force:
            clear_run(self.out)
        if self._resume_state is not None:
            self._repair_best(self._resume_state)
        atomic_write_text(
            self.out / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
        )

    def _repair_best(self, state: dict[str, Any]) -> None:
        """Make ``best.pt`` hold the epoch ``checkpoint.pt`` records as best.

        ``checkpoint.pt`` is written before ``best.pt``: a kill between the two leaves a
        checkpoint whose own epoch is the best one, which is then copied to ``best.pt``.
        """
        best_epoch = int(state.get("best_epoch", -1))
        if not self.cfg.select_best or best_epoch < 0:
            return
        path = self.out / "best.pt"
        if path.is_file():
            try:
                if int(load_checkpoint(path).get("epoch", -1)) == best_epoch:
                    return
            except AdvfeatError:
                pass  # damaged: rewritten below when possible
        if int(state["epoch"]) == best_epoch and "partial" not in state:
            save_checkpoint(path, {k: v for k, v in state.items() if k not in ("format", "digest")})
            return
        raise AdvfeatError(
            f"{str(path)!r} does not hold epoch {best_epoch + 1}, the best epoch recorded in "
            "checkpoint.pt, and cannot be rebuilt; start the run again with --force"
        )

    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "epoch": epoch,
            "model": unwrap(self.model).state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            **({"scaler": self.precision.state_dict()} if self.precision.scaler else {}),
            "history": self.history,
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "train_time_s": self.train_time,
            "num_classes": self.data.num_classes,
            "class_names": list(self.data.class_names),
            "data": {  # what the model needs of its data: evaluation elsewhere need not rebuild it
                "task": self.data.task,
                "image_size": int(self.data.image_size),
                "mean": [float(v) for v in self.data.mean],
                "std": [float(v) for v in self.data.std],
            },
        }

    def _load_resume(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.cuda_graph:  # the rates come back as numbers or CPU tensors
            use_tensor_learning_rates(self.optimizer, self.device)
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        self.precision.load_state_dict(state.get("scaler", {}))
        self.history = list(state["history"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best_val = float(state["best_val"])
        self.best_epoch = int(state.get("best_epoch", -1))
        self.train_time = float(state["train_time_s"])
        self._partial = state.get("partial")

    # ----------------------------------------------------------------------------- training
    @property
    def local_batch_size(self) -> int:
        """This process's share of the global batch."""
        return self.cfg.batch_size // self.dist.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch (full batches of this process's share of the data)."""
        steps = len(self.sampler) // self.local_batch_size
        cap = self.cfg.max_steps_per_epoch
        return steps if cap is None else min(steps, cap)

    def set_lr(self, progress: float, steps_per_epoch: int = 1) -> float:
        """Set every parameter group's learning rate for ``progress`` (epochs done, fractional;
        a group's ``lr_scale`` multiplies it) and return the base learning rate."""
        cfg = self.cfg
        warmup = warmup_length(cfg.warmup_epochs, cfg.warmup_steps, steps_per_epoch)
        factor = lr_factor(
            progress,
            total_epochs=cfg.epochs,
            schedule=cfg.schedule,
            warmup_epochs=min(warmup, cfg.epochs),
            milestones=cfg.milestones,
            gamma=cfg.gamma,
            power=cfg.poly_power,
        )
        for group in self.optimizer.param_groups:
            set_learning_rate(group, cfg.lr * factor * group.get("lr_scale", 1.0))
        return cfg.lr * factor

    def _loader(self, epoch: int) -> DataLoader | DeviceEpoch:
        """Epoch ``epoch``'s batches of this process: cut on the device (``device_data``) or
        loaded by a DataLoader; both start after the sampler's ``skip`` items when iterated."""
        self.sampler.set_epoch(epoch)
        batch_size = self.local_batch_size
        if self.device_images is not None:
            seed = augment_seed(self.cfg.seed, epoch)
            return DeviceEpoch(self.device_images, self.sampler, batch_size, seed=seed)
        g = torch.Generator().manual_seed(_epoch_seed(self.cfg.seed, epoch))
        return DataLoader(
            self.data.train,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=self.cfg.workers,
            drop_last=True,
            generator=g,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            collate_fn=self.task.collate,
        )

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """Train epoch ``epoch`` (0-based; a resumed partial epoch continues) and return its
        history row (``epoch``, ``train_loss``, the method's logs, ``epoch_time_s``, ...)."""
        cfg = self.cfg
        torch.manual_seed(_epoch_seed(cfg.seed, epoch))
        self.sampler.skip = 0
        loader = self._loader(epoch)
        steps = self.steps_per_epoch
        if steps == 0:
            raise AdvfeatError(
                f"the training set ({self.sampler.n} items) is smaller than one batch "
                f"of {cfg.batch_size}"
            )
        self.train_model.train()
        restored: dict[str, float] = {}
        seen = 0
        first = 0
        elapsed = 0.0
        partial, self._partial = self._partial, None
        if partial is not None and int(partial["epoch"]) == epoch:
            # resumed mid-epoch: skip the batches already trained on, restore the RNG and sums
            first = int(partial["step"])
            self.sampler.skip = first * self.local_batch_size
            restored = {str(k): float(v) for k, v in partial["sums"].items()}
            seen = int(partial["seen"])
            if partial.get("correct") and "train_acc" not in restored:  # checkpoints before Task
                restored["train_acc"] = float(partial["correct"])
            elapsed = float(partial["elapsed_s"])
            torch.set_rng_state(partial["rng"])
            if self.device.type == "cuda" and partial.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(partial["cuda_rng"], self.device)
        sums, watch = self._sums, self._watch
        sums.reset(restored)
        watch.reset()
        self._captured = self._capture_epoch() if self.cuda_graph else None
        bar = self._progress(steps, epoch)
        if bar is not None and first:
            bar.update(first)
        start = time.perf_counter() - elapsed
        lr = self.set_lr(epoch + first / steps, steps)
        try:
            for step, (x, y) in enumerate(loader, start=first):
                if step >= steps:
                    break
                lr = self.set_lr(epoch + step / steps, steps)
                seen += self._train_step(x, y, step, sums, watch)
                if step == first and epoch == self.start_epoch:
                    self._image_range.check()  # at once, not only at the epoch's end
                if bar is not None:
                    bar.update(1)
                    if (step - first) % PROGRESS_EVERY == 0:
                        self._show_progress(bar, sums.read(), seen, time.perf_counter() - start)
                if step + 1 < steps and self._preemption.requested():
                    self._raise_if_diverged(watch, epoch)
                    self._save_preempted(
                        epoch,
                        step + 1,
                        {"sums": sums.read(), "seen": seen},
                        time.perf_counter() - start,
                    )
        except (TrainingDiverged, Preempted):
            raise
        except Exception:
            self._raise_if_diverged(watch, epoch)  # the failure may come from non-finite values
            raise
        self._raise_if_diverged(watch, epoch)
        self._image_range.check()
        totals = sums.read()
        if bar is not None:
            bar.close()
        if self.dist.enabled:  # history holds global averages, as one process would log them
            keys = sorted(totals)
            packed = torch.tensor(
                [seen, *(totals[k] for k in keys)], dtype=torch.float64, device=self.device
            )
            torch.distributed.all_reduce(packed)
            seen = int(packed[0])
            totals = {k: float(v) for k, v in zip(keys, packed[1:].tolist(), strict=True)}
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
        row.update({f"train_{k}" if k == "loss" else k: v / seen for k, v in totals.items()})
        row["epoch_time_s"] = time.perf_counter() - start
        return row

    def _train_step(
        self, x: Any, y: Any, step: int, sums: RunningSums, watch: DivergenceWatch
    ) -> int:
        """One optimiser step on the batch ``(x, y)``; return its number of images.

        Nothing here waits for the device: the step's metrics are added to ``sums`` and its loss
        and weight norm to ``watch`` as device tensors, and the attacks' own finiteness checks
        are left to ``watch`` (a non-finite perturbation makes the loss non-finite). Under
        ``cuda_graph`` the epoch's captured step runs it (:meth:`_capture_epoch`).
        """
        x, y = self.task.to_device(x, y, self.device)
        if self.cfg.channels_last and isinstance(x, torch.Tensor):
            x = x.contiguous(memory_format=torch.channels_last)
        self._step_index.fill_(step)
        if self._captured is not None:
            self._captured(x, y)
        else:
            self._step_on(x, y, sums, watch)
        return int(self.task.batch_size(x))

    def _capture_epoch(self) -> CapturedStep | None:
        """This epoch's captured step (captured anew each epoch, so that what a method changes
        between epochs is seen), or ``None`` once a capture has failed in this run."""
        if self.graph_note != "captured":
            return None

        def failed(reason: str) -> None:
            self.graph_note = f"eager (capture failed: {reason})"
            if self.dist.is_main:
                warn_capture_failed(reason)

        return CapturedStep(
            lambda x, y: self._step_on(x, y, self._sums, self._watch),
            CudaGraphs(self.device),
            warmup=3 if self._captured is None else 1,
            required=self.cfg.cuda_graph == "true",
            on_failure=failed,
        )

    def _step_on(self, x: Any, y: Any, sums: RunningSums, watch: DivergenceWatch) -> None:
        """The step itself: the method's passes, backward, update, EMA and the running sums."""
        with (
            self.precision.autocast(),
            deferred_finite_checks(),
            deferred_image_checks(self._image_range),
        ):
            out = self.method(self.train_model, x, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.step(out.loss, self.optimizer)
        if self.ema is not None:
            self.ema.update(unwrap(self.model))
        watch.observe(self._step_index, out.loss, weight_norm(self.model, self.device))
        n = self.task.batch_size(x)
        running = self.task.running_metrics(out.logits, y)
        sums.add({f"train_{k}": v for k, v in running.items()})
        sums.add({"loss": out.loss, **out.log_values}, weight=n)

    def _raise_if_diverged(self, watch: DivergenceWatch, epoch: int) -> None:
        """Raise :class:`TrainingDiverged` when ``watch`` saw a non-finite loss or weight norm
        in epoch ``epoch`` (checked before every checkpoint and at the end of each epoch)."""
        seen = watch.first()
        if seen is None:
            return
        where = f"at epoch {epoch + 1}, step {seen.step + 1}"
        if seen.what == "loss":
            raise TrainingDiverged(
                f"the loss became {seen.value} {where}; stopped (lower the lr). "
                + self._kept_message()
            )
        raise TrainingDiverged(
            f"the weights became {'non-finite' if math.isnan(seen.value) else 'too large'} "
            f"(their norm overflowed to {seen.value}) {where}; stopped (lower the lr). "
            + self._kept_message()
        )

    def _show_progress(self, bar: Any, totals: dict[str, float], seen: int, elapsed: float) -> None:
        """The running loss, running metrics and images per second on the progress bar."""
        running = {k.removeprefix("train_"): v for k, v in totals.items() if k.startswith("train_")}
        shown = {k: f"{v / seen:.3f}" for k, v in {"loss": totals["loss"], **running}.items()}
        rate = seen * self.dist.world_size / max(elapsed, 1e-9)
        bar.set_postfix(**shown, img_s=f"{rate:.0f}")

    def _check_finite_state(self, epoch: int) -> None:
        """Refuse to checkpoint weights or buffers (BN statistics) that are not finite."""
        for name, t in unwrap(self.model).state_dict().items():
            if t.is_floating_point() and not math.isfinite(
                float(torch.linalg.vector_norm(t.float()))
            ):
                raise TrainingDiverged(
                    f"{name} became non-finite or too large after epoch {epoch + 1}; stopped "
                    "(lower the lr). " + self._kept_message()
                )

    def _kept_message(self) -> str:
        ckpt = self.out / "checkpoint.pt"
        if ckpt.exists():
            return f"The last good checkpoint is kept at {str(ckpt)!r}."
        return "No epoch had finished, so no checkpoint was written."

    def _progress(self, steps: int, epoch: int) -> Any:
        if not (self.cfg.progress and self.dist.is_main):
            return None
        from tqdm import tqdm

        return tqdm(
            total=steps,
            desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
            leave=False,
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def _evaluated(self) -> nn.Module:
        """What the run evaluates: the weights' moving average when ``ema_decay`` is set."""
        return self.ema.model if self.ema is not None else unwrap(self.model)

    def _evaluate(self, dataset: Any, *, detailed: bool = False) -> dict[str, float]:
        """The task's metrics (accuracy / AP, AP50, AP75 / mIoU, pixel accuracy) on ``dataset``;
        ``detailed`` adds the secondary ones (top-5 accuracy)."""
        model = self.method.eval_model(self._evaluated())
        loader = DataLoader(
            dataset,
            batch_size=self.cfg.eval_batch_size,
            num_workers=self.cfg.workers,
            collate_fn=self.task.collate,
        )
        result = self.task.evaluate(model, loader, device=self.device, detailed=detailed)
        return {k: float(v) for k, v in result.items() if isinstance(v, int | float)}

    def evaluate_into(self, row: dict[str, Any], split: str, dataset: Any) -> float:
        """Add ``{split}_<metric>`` to ``row``; return the primary metric (selects the best)."""
        result = self._evaluate(dataset)
        row.update({f"{split}_{k}": v for k, v in result.items()})
        return result[self.task.primary_metric]

    def fit(self) -> dict[str, Any]:
        """Train (or finish training) and return the metrics written to ``metrics.json``.

        The run folder's lock is held from the first write to the last.
        """
        try:
            with self._preemption:  # from here on a signal asks for a checkpoint and a stop
                if self.dist.is_main:
                    self._open_run_folder()
                if self.dist.enabled:
                    torch.distributed.barrier()
                if self._resume_state is not None:
                    self._load_resume(self._resume_state)
                    self._resume_state = None
                if self.cfg.progress and self.dist.is_main:
                    print(f"schedule: {self.schedule}", file=sys.stderr, flush=True)
                return self._train()
        finally:
            self._lock.release()

    # ----------------------------------------------------------------------------- preemption
    def _save_preempted(self, epoch: int, step: int, sums: dict[str, Any], elapsed: float) -> None:
        """Checkpoint in the middle of ``epoch`` after ``step`` steps, then raise
        :class:`Preempted`: everything needed to continue bit-identically is saved (the last
        finished epoch's record, the weights, optimiser and method state now, the sampler's
        position, the RNG states and the epoch's running sums)."""
        if self.dist.is_main:
            state = self._state(epoch - 1)
            state["partial"] = {
                "epoch": epoch,
                "step": step,
                **sums,
                "elapsed_s": elapsed,
                "rng": torch.get_rng_state(),
                "cuda_rng": (
                    torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
                ),
            }
            save_checkpoint(self.out / "checkpoint.pt", state)
        if self.dist.enabled:
            torch.distributed.barrier()
        raise Preempted(
            f"{self._preemption.name()} received: checkpoint written at epoch {epoch + 1}, step "
            f"{step}; continue with `advfeat train --out {self.out} --resume`"
        )

    def _train(self) -> dict[str, Any]:
        cfg = self.cfg
        for epoch in range(self.start_epoch, cfg.epochs):
            row = self.train_epoch(epoch)
            self.train_time += row["epoch_time_s"]
            row.update(self.method.on_epoch_end(unwrap(self.model), epoch))
            self._check_finite_state(epoch)
            if self.dist.is_main:
                val = -math.inf
                if self.data.val is not None:
                    val = self.evaluate_into(row, "val", self.data.val)
                last = epoch == cfg.epochs - 1
                if last or (epoch + 1) % cfg.eval_every == 0:
                    self.evaluate_into(row, "test", self.data.test)
                self.history.append(row)
                improved = self.data.val is not None and val > self.best_val
                if improved:
                    self.best_val = val
                    self.best_epoch = epoch
                state = self._state(epoch)
                # checkpoint.pt first: a kill before best.pt is written leaves a checkpoint whose
                # own epoch is the recorded best, from which best.pt is rebuilt on --resume
                save_checkpoint(self.out / "checkpoint.pt", state)
                if cfg.select_best and improved:
                    save_checkpoint(self.out / "best.pt", state)
                self._write_history()
                self._log_epoch(row)
                if self.loggers is not None:
                    self.loggers.log(row)
            else:
                self.history.append(row)
            if epoch + 1 < cfg.epochs and self._preemption.requested():
                if self.dist.enabled:
                    torch.distributed.barrier()
                raise Preempted(
                    f"{self._preemption.name('SIGTERM')} received: epoch "
                    f"{epoch + 1} finished and checkpointed; continue with "
                    f"`advfeat train --out {self.out} --resume`"
                )
        return self.finish()

    def _log_epoch(self, row: dict[str, Any]) -> None:
        if not self.cfg.progress:
            return
        parts = [f"epoch {row['epoch']}/{self.cfg.epochs}", f"loss {row['train_loss']:.4f}"]
        key = self.task.primary_metric
        for split in ("train", "val", "test"):
            if f"{split}_{key}" in row:
                parts.append(f"{split} {key} {row[f'{split}_{key}']:.3f}")
        parts.append(f"{row['epoch_time_s']:.1f}s")
        print("  ".join(parts), file=sys.stderr, flush=True)

    def _write_history(self) -> None:
        keys: list[str] = []
        for row in self.history:
            keys += [k for k in row if k not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(self.out / "history.csv", buf.getvalue())

    def finish(self) -> dict[str, Any]:
        """End the run: close the loggers, restore ``best.pt`` when ``select_best`` (refusing a
        ``best.pt`` that is not the recorded best epoch), write and return ``metrics.json``."""
        cfg = self.cfg
        if self.loggers is not None:
            self.loggers.close()
        if self.dist.enabled:
            torch.distributed.barrier()
        if not self.dist.is_main:
            return {}
        if cfg.select_best and (self.out / "best.pt").exists():
            best = load_checkpoint(self.out / "best.pt", map_location=self.device)
            if self.best_epoch >= 0 and int(best["epoch"]) != self.best_epoch:
                raise AdvfeatError(
                    f"{str(self.out / 'best.pt')!r} holds epoch {int(best['epoch']) + 1}, not the "
                    f"best epoch {self.best_epoch + 1}; run again with --resume to repair it"
                )
            unwrap(self.model).load_state_dict(best["model"])
            if self.ema is not None and "ema" in best:
                self.ema.load_state_dict(best["ema"])
            self.method.load_state_dict(best["method"])
        metrics = self._task_metrics()
        metrics["schedule"] = self.schedule
        metrics["history"] = self.history
        metrics["config"] = cfg.to_dict()
        metrics["environment"] = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": str(self.device),
            "world_size": self.dist.world_size,
        }
        atomic_write_json(self.out / "metrics.json", metrics)
        return metrics

    def _run_summary(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "method": cfg.method,
            "model": cfg.model,
            "dataset": cfg.dataset,
            "epochs": cfg.epochs,
            "seed": cfg.seed,
            "steps": self.graph_note,
        }

    def _task_metrics(self) -> dict[str, Any]:
        """``clean_<metric>`` for each of the task's metrics, the best validation value and the
        primary metric per shifted domain."""
        cfg = self.cfg
        metrics = self._run_summary()
        clean = self._evaluate(self.data.test, detailed=True)
        metrics.update({f"clean_{k}": v for k, v in clean.items()})
        metrics["train_time_s"] = round(self.train_time, 3)
        key = self.task.primary_metric
        if cfg.select_best and self.data.val is not None:
            metrics[f"best_val_{key}"] = self.best_val
        if cfg.eval_shifted and self.data.shifted:
            metrics[f"shifted_{key}"] = {
                name: self._evaluate(ds)[key] for name, ds in self.data.shifted.items()
            }
        return metrics
