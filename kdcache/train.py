"""Training: the teacher on ground truth, and students from a training source (a cache, an online teacher,
or ground truth: `kdcache.sources`).

Both go through `fit`, which runs any source: AdamW, linear warm-up then cosine decay (`kdcache.optim`),
gradient clipping, bf16 autocast on GPU, DDP under torchrun, a checkpoint every epoch, validation AP with
`best.pt`, and a CSV metrics log. A run folder:

    config.json   the resolved stage config, kdcache version and git revision
    last.pt       kdcache checkpoint after the latest epoch, with the optimiser state to resume from
    best.pt       weights only: best validation AP so far (last.pt's weights when there is no validation set)
    metrics.csv   one row per epoch whose checkpoint landed

A folder that already holds a run is refused unless `run.resume` (continue it) or `run.overwrite` (start
over) says what to do with it; both are checked before any data, model or teacher is loaded.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from kdcache.augment import StudentAugConfig
from kdcache.checkpoint import atomic_torch_save, checkpoint_dict, provenance, read_checkpoint
from kdcache.coco import load_coco
from kdcache.config import OptimConfig, RunConfig, TrainStudentConfig, TrainTeacherConfig, ValConfig, to_jsonable
from kdcache.data import TrainViews
from kdcache.distributed import World, barrier, close_world, init_world
from kdcache.errors import UserError
from kdcache.evaluate import evaluate_model
from kdcache.metrics import require_scorable
from kdcache.optim import make_optimizer
from kdcache.predict import PredictConfig
from kdcache.sources import GroundTruth, TrainingSource, annotated_views, student_source
from kdcache.student import build_student
from kdcache.teacher import build_teacher

log = logging.getLogger(__name__)


RUN_FILES = ("last.pt", "best.pt", "metrics.csv", "config.json", "tensorboard")


def prepare_run_folder(run: RunConfig) -> None:
    """Check `run.out` before time is spent: a folder that can be written, and, when it already holds a
    run, that `resume` or `overwrite` says what to do with it (`overwrite` removes that run's files)."""
    out = Path(run.out)
    if run.resume and run.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite starts it over; pass one of them")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; pass a folder for the run")
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not (run.resume or run.overwrite):
        raise UserError(f"--out {out} already holds a training run ({', '.join(existing)}); pass --resume to "
                        "continue it, --overwrite to start over, or choose another --out")
    if run.resume and not (out / "last.pt").exists():
        log.warning("--resume: %s holds no last.pt yet; starting a fresh run", out)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 owns the folder
        return
    out.mkdir(parents=True, exist_ok=True)  # OSError (read-only, not a folder) -> one line from the CLI
    with tempfile.TemporaryFile(dir=out):  # writable: checked now rather than after the first epoch
        pass
    if run.overwrite:
        for name in existing:
            (shutil.rmtree if (out / name).is_dir() else os.remove)(out / name)
        if existing:
            log.info("--overwrite: removed the previous run's %s from %s", ", ".join(existing), out)


def check_resume_fits(run: RunConfig, model: nn.Module) -> None:
    """With `resume`, the checkpoint in `run.out` must be of the model being trained (same config)."""
    last = Path(run.out) / "last.pt"
    if not (run.resume and last.exists()):
        return
    # read through the config class, so that a field added since the file was written takes its default
    saved = type(model.config).from_dict(read_checkpoint(last).get("model_config") or {}).to_dict()
    now = model.config.to_dict()
    if saved != now:
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        shown = ", ".join(f"{k} {saved.get(k)!r} there, {now.get(k)!r} now" for k in diff[:3])
        raise UserError(f"--resume: {last} is another model ({shown}); pass the settings it was trained with, "
                        "or --overwrite / another --out to start a new run")


def check_validation_set(val: ValConfig) -> None:
    """A validation set that could not be scored would fail after the first epoch: check it up front."""
    if val.ann is None:
        return
    if not Path(val.images).is_dir():
        raise UserError(f"--val-images {val.images} is not a folder; pass the folder of {val.ann}'s images")
    require_scorable(load_coco(val.ann, val.keypoint_set), val.ann)


def train_teacher(cfg: TrainTeacherConfig) -> Path:
    """Train a teacher (a family's preset, `cfg.arch`) on ground-truth heatmaps; returns the run folder."""
    prepare_run_folder(cfg.run)
    check_validation_set(cfg.val)
    with torch.device("meta"):  # the family's own targets (UDP, TokenPose's), before the data says K
        codec = dataclasses.replace(build_teacher(cfg.arch, cfg.head, cfg.input_hw).codec, sigma=cfg.sigma)
    views = annotated_views(cfg.ann, cfg.images, cfg.aug, codec, cfg.run.seed, cfg.keypoint_set)
    torch.manual_seed(cfg.run.seed)  # the initial weights depend on the seed alone
    model = build_teacher(cfg.arch, cfg.head, cfg.input_hw, views.sampler.keypoint_set.num_keypoints)
    check_resume_fits(cfg.run, model)
    return fit(model, GroundTruth(TrainViews(views, StudentAugConfig())), cfg.optim, cfg.run, cfg.val, to_jsonable(cfg))


def train_student(cfg: TrainStudentConfig) -> Path:
    """Train a student from the source `cfg` asks for (`sources.student_source`: a teacher cache, an online
    teacher, or ground truth only); returns the run folder."""
    prepare_run_folder(cfg.run)
    check_validation_set(cfg.val)
    source = student_source(cfg)
    # The student makes and reads heatmaps as its targets were made (its teacher's codec), for its data's keypoints.
    cfg = dataclasses.replace(cfg, student=dataclasses.replace(
        cfg.student, codec=source.codec.name, num_keypoints=source.keypoint_set.num_keypoints,
        keypoint_set=source.keypoint_set.name))
    torch.manual_seed(cfg.run.seed)  # the initial weights depend on the seed alone
    model = build_student(cfg.student)
    check_resume_fits(cfg.run, model)
    return fit(model, source, cfg.optim, cfg.run, cfg.val, to_jsonable(cfg))


def fit(model: nn.Module, source: TrainingSource, optim: OptimConfig, run: RunConfig, val: ValConfig,
        config: dict[str, Any]) -> Path:
    """Train `model` on `source` into the run folder `run.out`; returns it. `config` goes into config.json."""
    world = init_world(run.device)  # under torchrun: DDP, each rank a 1/world share of every epoch
    trainer = _Trainer(model, source, optim, run, val, world)
    trainer.start(config)
    out = trainer.out
    metrics = open(out / "metrics.csv", "a" if trainer.first_epoch else "w", newline="") if world.is_main else None
    board = _tensorboard(out) if world.is_main else None
    # One bar over the whole run's steps: its ETA is the run's, not the epoch's.
    bar = tqdm(total=trainer.total, initial=trainer.step, unit="step", disable=not (run.progress and world.is_main),
               leave=False)
    with metrics or contextlib.nullcontext(), board or contextlib.nullcontext(), bar:
        writer = csv.writer(metrics) if metrics else None
        if writer and not trainer.first_epoch:
            writer.writerow(["epoch", "step", "loss", "lr", "seconds", "crops_per_s", "val_AP"])
        for epoch in range(trainer.first_epoch, trainer.epochs):
            if trainer.step >= trainer.total:
                break
            losses, seen, seconds = trainer.train_epoch(epoch, bar, board)
            if world.is_main:  # rank 0 validates and writes; the others wait for it
                trainer.end_epoch(epoch, losses, seen, seconds, board)
                writer.writerow(trainer.metrics_row)
                metrics.flush()
            barrier(world)
    if world.is_main and trainer.best_ap < 0:  # no validation: best.pt is the last weights
        state = read_checkpoint(out / "last.pt")
        atomic_torch_save({k: v for k, v in state.items() if k not in TRAINING_STATE}, out / "best.pt")
    close_world(world)
    return out


class _Trainer:
    """One training run's state: model (DDP-wrapped under torchrun), loader, optimiser, EMA, step, best AP."""

    def __init__(self, model: nn.Module, source: TrainingSource, optim: OptimConfig, run: RunConfig,
                 val: ValConfig, world: World):
        self.out, self.run, self.val, self.world, self.source = Path(run.out), run, val, world, source
        self.device, self.grad_clip = world.device, optim.grad_clip
        if world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(run.seed)
        self.model = model.to(self.device).train()
        self.trained = model
        if world.size > 1:
            self.trained = DistributedDataParallel(model, device_ids=[self.device.index]
                                                   if self.device.type == "cuda" else None)
        # Reseeded at every epoch, so epoch e's order does not depend on how the run got there (resume).
        self.order = torch.Generator()
        dataset = source.dataset
        drop_last = len(dataset) >= 2 * optim.batch_size * world.size
        self.sampler = (DistributedSampler(dataset, world.size, world.rank, shuffle=True, seed=run.seed,
                                           drop_last=drop_last) if world.size > 1 else None)
        self.loader = DataLoader(dataset, batch_size=optim.batch_size, shuffle=self.sampler is None,
                                 sampler=self.sampler, num_workers=run.workers, drop_last=drop_last,
                                 generator=self.order, pin_memory=self.device.type == "cuda")
        if len(self.loader) == 0:
            raise UserError("the training set is empty; check --ann / --cache")
        self.total = optim.epochs * len(self.loader)
        if optim.max_steps > 0:
            self.total = min(self.total, optim.max_steps)
        self.epochs = math.ceil(self.total / len(self.loader))
        self.opt, self.sched, self.ema = make_optimizer(model, optim, self.total)
        self.best_ap, self.step, self.first_epoch = -1.0, 0, 0
        self.run_start, self.run_start_step = 0.0, 0
        self.metrics_row: list[Any] = []

    def start(self, config: dict[str, Any]) -> None:
        """Resume from last.pt (`run.resume`), or write config.json for a new run."""
        out, last = self.out, self.out / "last.pt"
        if self.run.resume and last.exists():
            state = read_checkpoint(last)
            if "optimizer" not in state:
                raise UserError(f"{last} holds no training state to resume from; start a new --out")
            ema = self.ema
            self.model.load_state_dict(state["train_state_dict"] if ema is not None else state["state_dict"])
            if ema is not None:
                ema.module.load_state_dict(state["state_dict"])
                ema.n_averaged.fill_(state["ema_updates"])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            self.best_ap, self.step, self.first_epoch = state["best_ap"], state["step"], state["epoch"]
            log.info("resuming %s after epoch %d (step %d)", out, self.first_epoch, self.step)
            if self.world.is_main:
                _keep_metrics_rows(out / "metrics.csv", self.first_epoch)
        elif self.world.is_main:
            (out / "config.json").write_text(json.dumps({"config": config, **provenance()}, indent=1))
        self.run_start, self.run_start_step = time.perf_counter(), self.step
        log.info("training %d steps (%d epochs of %d) on %s%s", self.total, self.epochs, len(self.loader),
                 self.device, f", rank {self.world.rank} of {self.world.size}" if self.world.size > 1 else "")

    def train_epoch(self, epoch: int, bar: tqdm, board: Any) -> tuple[list[float], int, float]:
        """One pass over the loader (or up to the run's last step); returns the losses, crops seen, seconds."""
        self.order.manual_seed(self.run.seed * 100_003 + epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        if hasattr(self.source.dataset, "set_epoch"):
            self.source.dataset.set_epoch(epoch)
        start, losses, seen = time.perf_counter(), [], 0
        bar.set_description(f"epoch {epoch + 1}/{self.epochs}")
        device = self.device
        for batch in self.loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = self.source.loss(self.trained, batch)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.opt.step()
            self.sched.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.step += 1
            seen += len(batch["crop"])
            losses.append(float(loss.detach()))
            lr = self.sched.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.2e}", lr=f"{lr:.1e}", refresh=False)
            if board is not None:
                board.add_scalar("train/loss", losses[-1], self.step)
                board.add_scalar("train/lr", lr, self.step)
            if self.step >= self.total:
                break
        return losses, seen, time.perf_counter() - start

    def end_epoch(self, epoch: int, losses: list[float], seen: int, seconds: float, board: Any) -> None:
        """Validate, write last.pt (and best.pt when AP improved), log; `metrics_row` is the epoch's CSV row.

        The row is written by the caller only once the epoch's checkpoint has landed; a validation that fails
        still leaves the epoch's last.pt, so --resume goes on from here.
        """
        shown = self.model if self.ema is None else self.ema.module
        extra = {} if self.ema is None else {"train_state_dict": {k: v.detach().cpu() for k, v in
                                                                  self.model.state_dict().items()},
                                             "ema_updates": int(self.ema.n_averaged)}

        def save_last(ap: float | None, best: float) -> None:
            atomic_torch_save(checkpoint_dict(shown, epoch=epoch + 1, step=self.step, val_ap=ap, best_ap=best,
                                              optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(),
                                              rng=torch.get_rng_state(), **extra), self.out / "last.pt")

        last = self.step >= self.total or epoch == self.epochs - 1
        try:
            ap = _validate(shown, self.val, epoch, last=last, progress=self.run.progress)
        except BaseException:
            save_last(None, self.best_ap)
            raise
        improved = ap is not None and ap > self.best_ap
        self.best_ap = ap if improved else self.best_ap
        save_last(ap, self.best_ap)
        if improved:
            atomic_torch_save(checkpoint_dict(shown, epoch=epoch + 1, step=self.step, val_ap=ap), self.out / "best.pt")
        lr = self.sched.get_last_lr()[0]
        self.metrics_row = [epoch + 1, self.step, f"{np.mean(losses):.6g}", f"{lr:.6g}", f"{seconds:.2f}",
                            f"{seen / seconds:.2f}", "" if ap is None else f"{ap:.3f}"]
        if board is not None:
            board.add_scalar("train/crops_per_s", seen / seconds, self.step)
            if ap is not None:
                board.add_scalar("val/AP", ap, self.step)
        per_step = (time.perf_counter() - self.run_start) / max(1, self.step - self.run_start_step)
        eta = per_step * (self.total - self.step)
        log.info("epoch %d/%d: loss %.4g, %.1f crops/s%s; %s", epoch + 1, self.epochs, np.mean(losses),
                 seen / seconds, "" if ap is None else f", val AP {ap:.2f}",
                 f"run ETA {_duration(eta)}" if self.step < self.total else "done")


# What last.pt holds beyond the weights, for --resume only; best.pt leaves it out.
TRAINING_STATE = ("optimizer", "scheduler", "rng", "train_state_dict", "ema_updates", "best_ap")


def _keep_metrics_rows(path: Path, epochs: int) -> None:
    """Drop metrics.csv rows past the checkpoint being resumed from (an epoch whose checkpoint never landed)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= epochs]
    if len(kept) != len(rows):
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(kept)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _tensorboard(out: Path) -> Any:
    """A TensorBoard writer logging to out/tensorboard when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: `pip install tensorboard`
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _validate(model: nn.Module, val: ValConfig, epoch: int, last: bool, progress: bool = False) -> float | None:
    if val.ann is None or not (last or (epoch + 1) % val.every == 0):
        return None
    metrics, _ = evaluate_model(model, val.ann, val.images, predict=PredictConfig(progress=progress),
                                keypoint_set=val.keypoint_set)
    model.train()
    return metrics["AP"]
