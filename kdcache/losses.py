"""Heatmap losses: ground-truth MSE with target weights, and distillation terms against teacher heatmaps.

A new teacher term is one function `fn(pred, teacher, weight [N, K] or None, temperature) -> scalar` and its
entry in `KD_LOSSES` (train-student --kd-loss offers every entry).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdcache.errors import UserError


def heatmap_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """mmpose's JointsMSELoss: 0.5 * mean over N, K, h, w of (w * (pred - target))^2.

    Args:
        pred, target: [N, K, h, w] heatmaps.
        weight: [N, K] per-joint weights (0 for unlabelled joints); None = all ones.
    """
    diff = pred.float() - target.float()
    if weight is not None:
        diff = diff * weight.float()[..., None, None]
    return 0.5 * diff.pow(2).mean()


def heatmap_kl(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the spatially softmaxed heatmaps, per joint, times T^2 (Hinton).

    Heatmap values are ~[0, 1], so logits are scaled by 1 / (T * 0.05): a peak of 1 then dominates its
    neighbourhood the way a confident classifier's logit does. Returns the mean over N and K.
    """
    n, k = pred.shape[:2]
    scale = 1.0 / (temperature * 0.05)
    log_p = F.log_softmax(pred.float().reshape(n, k, -1) * scale, dim=-1)
    log_q = F.log_softmax(target.float().reshape(n, k, -1) * scale, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)  # [N, K]
    if weight is not None:
        kl = kl * weight.float()
    return kl.mean() * temperature ** 2


def kd_mse(pred: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor | None = None,
           temperature: float = 1.0) -> torch.Tensor:
    """Heatmap MSE as a teacher term: `weight` [N, K] multiplies each joint's loss (linearly; heatmap_mse
    squares its weight with the difference, hence the square root). `temperature` is unused."""
    return heatmap_mse(pred, teacher, None if weight is None else weight.clamp(min=0).sqrt())


# Teacher terms by --kd-loss name: fn(pred, teacher, weight [N, K] or None, temperature) -> scalar.
KD_LOSSES = {"mse": kd_mse, "kl": heatmap_kl}


@dataclass(frozen=True)
class KDConfig:
    """The distillation loss: which teacher term, and how it mixes with ground truth."""

    alpha: float = 0.5          # weight of the teacher (KD) term; 1 - alpha on ground-truth heatmaps
    loss: str = "mse"           # the teacher term, one of KD_LOSSES
    temperature: float = 1.0    # "kl": softmax temperature (the loss is scaled by T^2)
    confidence_weights: bool = False  # weight each joint's teacher term by the teacher's confidence (its peak)
    box_score_weights: bool = False   # weight each row's teacher term by its box's score (a detector's; 1 annotated)

    def __post_init__(self) -> None:
        if self.loss not in KD_LOSSES:
            raise UserError(f"unknown --kd-loss {self.loss!r}; choose one of {', '.join(KD_LOSSES)}")


def distillation_loss(pred: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor,
                      target_weight: torch.Tensor, kd: KDConfig, confidence: torch.Tensor | None = None,
                      labelled: torch.Tensor | None = None, box_score: torch.Tensor | None = None) -> torch.Tensor:
    """alpha * KD(pred, teacher) + (1 - alpha) * MSE(pred, ground truth), the latter over rows with ground truth.

    The teacher term covers every joint of every row (the teacher has an opinion on unlabelled joints and
    people too); the ground-truth term uses the target weights and is the mean over the rows that have
    ground truth only (a batch holding people from boxes alone does not dilute it; none: the term is 0).
    This is the usual semi-supervised sum: a supervised loss on labelled rows, a teacher loss on all.

    Args:
        pred, teacher, target: [N, K, h, w] heatmaps; target_weight: [N, K].
        confidence: [N, K] the teacher's per-joint confidence; it multiplies each joint's teacher term when
            `kd.confidence_weights` (else it is not used).
        labelled: [N] 1 for rows with ground truth, 0 for rows without; None = all have it.
        box_score: [N] each row's person-box score; it multiplies the row's teacher term when
            `kd.box_score_weights`.
    """
    loss = pred.new_zeros((), dtype=torch.float32)
    if kd.alpha > 0:
        weight = confidence.float() if kd.confidence_weights else None
        if kd.box_score_weights and box_score is not None:
            rows = box_score.float()[:, None].expand(pred.shape[:2])
            weight = rows if weight is None else weight * rows
        loss = loss + kd.alpha * KD_LOSSES[kd.loss](pred, teacher, weight, kd.temperature)
    if kd.alpha < 1:
        if labelled is None:
            loss = loss + (1 - kd.alpha) * heatmap_mse(pred, target, target_weight)
        else:
            rows = labelled.float()  # mean over labelled rows = mean over all rows * N / (labelled rows); none: 0
            gt = heatmap_mse(pred, target, target_weight * rows[:, None]) * (len(rows) / rows.sum().clamp(min=1))
            loss = loss + (1 - kd.alpha) * gt
    return loss
