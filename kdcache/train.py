"""Training: the teacher on ground truth, and students from the cache (or, as a baseline, online).

Both go through `_fit`: AdamW, linear warm-up then cosine decay, gradient clipping, bf16 autocast on
GPU, a checkpoint every epoch, validation AP with `best.pt`, and a CSV metrics log. A run folder:

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
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from kdcache.checkpoint import atomic_torch_save, checkpoint_dict, provenance, read_checkpoint
from kdcache.coco import load_instances
from kdcache.config import OptimConfig, RunConfig, TrainStudentConfig, TrainTeacherConfig, ValConfig, to_jsonable
from kdcache.data import CachedDataset, ViewDataset
from kdcache.distributed import barrier, close_world, init_world
from kdcache.errors import UserError
from kdcache.losses import KD_LOSSES, distillation_loss, heatmap_mse
from kdcache.student import build_student
from kdcache.teacher import build_vitpose, load_teacher, require_coco_keypoints, vitpose_config
from kdcache.transforms import to_input_tensor

log = logging.getLogger(__name__)

# loss_fn(model, batch, x) -> scalar loss; batch holds the collated item tensors, x the normalised crops.
LossFn = Callable[[nn.Module, dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


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
    saved, now = read_checkpoint(last).get("model_config") or {}, model.config.to_dict()
    if saved != now:
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        shown = ", ".join(f"{k} {saved.get(k)!r} there, {now.get(k)!r} now" for k in diff[:3])
        raise UserError(f"--resume: {last} is another model ({shown}); pass the settings it was trained with, "
                        "or --overwrite / another --out to start a new run")


def check_validation_set(val: ValConfig) -> None:
    """A validation set that could not be scored would fail after the first epoch: check it up front."""
    if val.ann is None:
        return
    from kdcache.coco import load_coco
    from kdcache.evaluate import require_scorable

    if not Path(val.images).is_dir():
        raise UserError(f"--val-images {val.images} is not a folder; pass the folder of {val.ann}'s images")
    require_scorable(load_coco(val.ann), val.ann)


def train_teacher(cfg: TrainTeacherConfig) -> Path:
    """Train a ViTPose model on ground-truth heatmaps; returns the run folder."""
    prepare_run_folder(cfg.run)
    check_validation_set(cfg.val)
    instances = load_instances(cfg.ann)
    if not instances:
        raise UserError(f"{cfg.ann} has no usable person instances; check the annotation file")
    torch.manual_seed(cfg.run.seed)  # the initial weights depend on the seed alone
    model = build_vitpose(vitpose_config(cfg.arch, head=cfg.head, input_hw=cfg.input_hw))
    check_resume_fits(cfg.run, model)
    dataset = ViewDataset(instances, cfg.images, cfg.input_hw, cfg.aug, cfg.run.seed, sigma=cfg.sigma)

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return heatmap_mse(model(x), batch["target"], batch["target_weight"])

    return _fit(model, dataset, loss_fn, cfg.optim, cfg.run, cfg.val, to_jsonable(cfg))


def train_student(cfg: TrainStudentConfig) -> Path:
    """Train a student from a teacher cache, online from a teacher checkpoint, or (neither given) on ground
    truth only; returns the run folder."""
    if cfg.cache is not None and cfg.online_teacher is not None:
        raise UserError("give one of --cache CACHE or --online-teacher CKPT, not both")
    if cfg.kd_loss not in KD_LOSSES:
        raise UserError(f"unknown --kd-loss {cfg.kd_loss!r}; choose one of {', '.join(KD_LOSSES)}")
    prepare_run_folder(cfg.run)
    check_validation_set(cfg.val)
    torch.manual_seed(cfg.run.seed)  # the initial weights depend on the seed alone
    model = build_student(cfg.student)
    check_resume_fits(cfg.run, model)

    def kd(pred: torch.Tensor, teacher: torch.Tensor, confidence: torch.Tensor,
           batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return distillation_loss(pred, teacher, batch["target"], batch["target_weight"], cfg.alpha, cfg.kd_loss,
                                 cfg.kd_temperature, confidence if cfg.confidence_weights else None)

    if cfg.cache is not None:
        dataset = CachedDataset(cfg.cache, cfg.sigma, cfg.flip_prob, cfg.run.seed, images=cfg.images,
                                student_aug=cfg.student_aug, train_views=cfg.train_views)
        cache_hw = dataset.cache.input_hw
        if tuple(cache_hw) != tuple(cfg.student.input_hw):
            raise UserError(f"cache {cfg.cache} holds {cache_hw[0]}x{cache_hw[1]} crops but the student is set "
                            f"to {cfg.student.input_hw[0]}x{cfg.student.input_hw[1]}; pass --input-size "
                            f"{cache_hw[0]}x{cache_hw[1]} or dump a cache at the student's size")

        def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return kd(model(x), batch["teacher"], batch["teacher_confidence"], batch)
    else:
        if cfg.ann is None or cfg.images is None:
            raise UserError("training without --cache needs --ann and --images (the ground truth to augment)")
        teacher = None
        if cfg.online_teacher is not None:
            teacher = load_teacher(cfg.online_teacher, cfg.run.device, expert=cfg.expert)
            require_coco_keypoints(teacher, cfg.online_teacher, cfg.expert)
            if tuple(teacher.config.input_hw) != tuple(cfg.student.input_hw):
                raise UserError(f"teacher takes {teacher.config.input_hw} crops, student {cfg.student.input_hw}; "
                                "pass --input-size to match them")
        elif cfg.alpha > 0:
            log.info("no --cache or --online-teacher: training on ground truth only (alpha ignored)")
        view_seed = cfg.run.seed if cfg.view_seed is None else cfg.view_seed
        dataset = ViewDataset(load_instances(cfg.ann), cfg.images, cfg.student.input_hw, cfg.aug, view_seed,
                              sigma=cfg.sigma, student_aug=cfg.student_aug, keep_clean=teacher is not None)

        def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            if teacher is None:
                return heatmap_mse(model(x), batch["target"], batch["target_weight"])
            # x is the student's input; the teacher sees the crop before photometric changes, as in the dump.
            clean = to_input_tensor(batch["crop"]) if "student_crop" in batch else x
            with torch.no_grad():
                target = teacher(clean).float()
            return kd(model(x), target, target.amax(dim=(2, 3)), batch)

    return _fit(model, dataset, loss_fn, cfg.optim, cfg.run, cfg.val, to_jsonable(cfg))


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine") -> float:
    """Linear warm-up from 1/1000 over `warmup` steps, then cosine decay to 0 at `total`, or step decay
    (x0.1 at 81 % and again at 95 % of the run, ViTPose's epochs 170 and 200 of 210)."""
    if step < warmup:
        return 1e-3 + (1 - 1e-3) * step / warmup
    if schedule == "step":
        return 0.1 ** sum(step >= m * total for m in (170 / 210, 200 / 210))
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _fit(model: nn.Module, dataset: Dataset, loss_fn: LossFn, optim: OptimConfig, run: RunConfig,
         val: ValConfig, config: dict[str, Any]) -> Path:
    out = Path(run.out)
    world = init_world(run.device)  # under torchrun: DDP, each rank a 1/world share of every epoch
    device = world.device
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(run.seed)
    model.to(device).train()
    trained = model
    if world.size > 1:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # Reseeded at every epoch, so epoch e's order does not depend on how the run got there (resume).
    order = torch.Generator()
    drop_last = len(dataset) >= 2 * optim.batch_size * world.size
    sampler = (DistributedSampler(dataset, world.size, world.rank, shuffle=True, seed=run.seed, drop_last=drop_last)
               if world.size > 1 else None)
    loader = DataLoader(dataset, batch_size=optim.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=run.workers, drop_last=drop_last, generator=order,
                        pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise UserError("the training set is empty; check --ann / --cache")
    total = optim.epochs * len(loader)
    if optim.max_steps > 0:
        total = min(total, optim.max_steps)
    epochs = math.ceil(total / len(loader))
    warmup = min(optim.warmup_steps, max(1, total // 5))  # short runs still reach the peak rate
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    if optim.schedule not in ("cosine", "step"):
        raise UserError(f"unknown schedule {optim.schedule!r}; choose cosine or step")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, optim.schedule))
    # The EMA copy is what validation sees and checkpoints hold; the raw weights are kept to resume.
    ema = (torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(
        optim.ema), use_buffers=True) if optim.ema > 0 else None)

    best_ap, step, first_epoch = -1.0, 0, 0
    if run.resume and (out / "last.pt").exists():
        state = read_checkpoint(out / "last.pt")
        if "optimizer" not in state:
            raise UserError(f"{out / 'last.pt'} holds no training state to resume from; start a new --out")
        model.load_state_dict(state["train_state_dict"] if ema is not None else state["state_dict"])
        if ema is not None:
            ema.module.load_state_dict(state["state_dict"])
            ema.n_averaged.fill_(state["ema_updates"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        best_ap, step, first_epoch = state["best_ap"], state["step"], state["epoch"]
        log.info("resuming %s after epoch %d (step %d)", out, first_epoch, step)
        if world.is_main:
            _keep_metrics_rows(out / "metrics.csv", first_epoch)
    elif world.is_main:
        (out / "config.json").write_text(json.dumps({"config": config, **provenance()}, indent=1))
    log.info("training %d steps (%d epochs of %d) on %s%s", total, epochs, len(loader), device,
             f", rank {world.rank} of {world.size}" if world.size > 1 else "")

    metrics = open(out / "metrics.csv", "a" if first_epoch else "w", newline="") if world.is_main else None
    board = _tensorboard(out) if world.is_main else None
    # One bar over the whole run's steps: its ETA is the run's, not the epoch's.
    bar = tqdm(total=total, initial=step, unit="step", disable=not (run.progress and world.is_main), leave=False)
    run_start, run_start_step = time.perf_counter(), step
    with metrics or contextlib.nullcontext(), board or contextlib.nullcontext(), bar:
        writer = csv.writer(metrics) if metrics else None
        if writer and not first_epoch:
            writer.writerow(["epoch", "step", "loss", "lr", "seconds", "crops_per_s", "val_AP"])
        for epoch in range(first_epoch, epochs):
            if step >= total:
                break
            order.manual_seed(run.seed * 100_003 + epoch)
            if sampler is not None:
                sampler.set_epoch(epoch)
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            start, losses, seen = time.perf_counter(), [], 0
            bar.set_description(f"epoch {epoch + 1}/{epochs}")
            for batch in loader:
                student_crop = batch.get("student_crop", batch["crop"])  # photometric changes, if any
                x = to_input_tensor(student_crop.to(device, non_blocking=True))
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()
                         if isinstance(v, torch.Tensor) and (k != "crop" or "student_crop" in batch)}
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss = loss_fn(trained, batch, x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if optim.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
                opt.step()
                sched.step()
                if ema is not None:
                    ema.update_parameters(model)
                step += 1
                seen += x.shape[0]
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.2e}", lr=f"{sched.get_last_lr()[0]:.1e}", refresh=False)
                if board is not None:
                    board.add_scalar("train/loss", losses[-1], step)
                    board.add_scalar("train/lr", sched.get_last_lr()[0], step)
                if step >= total:
                    break
            seconds = time.perf_counter() - start
            if not world.is_main:  # rank 0 validates and writes; the others wait for it
                barrier(world)
                continue
            shown = model if ema is None else ema.module
            extra = {} if ema is None else {"train_state_dict": {k: v.detach().cpu() for k, v in
                                                                 model.state_dict().items()},
                                            "ema_updates": int(ema.n_averaged)}

            def save_last(ap: float | None, best: float) -> None:
                atomic_torch_save(checkpoint_dict(shown, epoch=epoch + 1, step=step, val_ap=ap, best_ap=best,
                                                  optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                                                  rng=torch.get_rng_state(), **extra), out / "last.pt")

            try:
                ap = _validate(shown, val, epoch, last=step >= total or epoch == epochs - 1, progress=run.progress)
            except BaseException:
                save_last(None, best_ap)  # the epoch's training is kept; --resume goes on from here
                raise
            improved = ap is not None and ap > best_ap
            best_ap = ap if improved else best_ap
            save_last(ap, best_ap)
            if improved:
                atomic_torch_save(checkpoint_dict(shown, epoch=epoch + 1, step=step, val_ap=ap), out / "best.pt")
            # The row goes in only once its epoch's checkpoint has landed.
            writer.writerow([epoch + 1, step, f"{np.mean(losses):.6g}", f"{sched.get_last_lr()[0]:.6g}",
                             f"{seconds:.2f}", f"{seen / seconds:.2f}", "" if ap is None else f"{ap:.3f}"])
            metrics.flush()
            if board is not None:
                board.add_scalar("train/crops_per_s", seen / seconds, step)
                if ap is not None:
                    board.add_scalar("val/AP", ap, step)
            eta = (time.perf_counter() - run_start) / max(1, step - run_start_step) * (total - step)
            log.info("epoch %d/%d: loss %.4g, %.1f crops/s%s; %s", epoch + 1, epochs, np.mean(losses),
                     seen / seconds, "" if ap is None else f", val AP {ap:.2f}",
                     f"run ETA {_duration(eta)}" if step < total else "done")
            barrier(world)
    if world.is_main and best_ap < 0:  # no validation: best.pt is the last weights
        state = read_checkpoint(out / "last.pt")
        atomic_torch_save({k: v for k, v in state.items() if k not in TRAINING_STATE}, out / "best.pt")
    close_world(world)
    return out


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
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


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
    from kdcache.evaluate import evaluate_model

    metrics, _ = evaluate_model(model, val.ann, val.images, progress=progress)
    model.train()
    return metrics["AP"]
