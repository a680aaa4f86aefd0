"""The optimiser of every training run: AdamW, a warm-up then a decay schedule, and an optional weight EMA."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from kdcache.config import OptimConfig
from kdcache.errors import UserError


def _cosine(step: int, total: int, warmup: int) -> float:
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _step(step: int, total: int, warmup: int) -> float:
    return 0.1 ** sum(step >= m * total for m in (170 / 210, 200 / 210))


# Decay after the warm-up, by OptimConfig.schedule (train --schedule): cosine to 0, or x0.1 at 81 % and again
# at 95 % of the run (ViTPose's epochs 170 and 200 of 210).
SCHEDULES: dict[str, Callable[[int, int, int], float]] = {"cosine": _cosine, "step": _step}


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine") -> float:
    """Linear warm-up from 1/1000 over `warmup` steps, then the decay `SCHEDULES[schedule]`."""
    if step < warmup:
        return 1e-3 + (1 - 1e-3) * step / warmup
    return SCHEDULES[schedule](step, total, warmup)


def make_optimizer(model: nn.Module, optim: OptimConfig, total: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, nn.Module | None]:
    """AdamW, its per-step schedule over `total` steps, and the EMA copy of the weights (None without EMA).

    The warm-up is at most a fifth of the run, so short runs still reach the peak rate.
    """
    if optim.schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {optim.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    warmup = min(optim.warmup_steps, max(1, total // 5))
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, optim.schedule))
    # The EMA copy is what validation sees and checkpoints hold; the raw weights are kept to resume.
    ema = (torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(
        optim.ema), use_buffers=True) if optim.ema > 0 else None)
    return opt, sched, ema
