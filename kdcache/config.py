"""One frozen dataclass per stage; `cli.py` builds them from argv, the stage functions take nothing else."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcache.augment import StudentAugConfig
from kdcache.codec import DEFAULT_INPUT_HW, DEFAULT_SIGMA
from kdcache.errors import UserError
from kdcache.losses import KDConfig
from kdcache.predict import PredictConfig
from kdcache.student import StudentConfig
from kdcache.transforms import AugmentConfig


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule shared by teacher and student training."""

    epochs: int = 10            # passes over the training set
    max_steps: int = 0          # hard bound on optimiser steps (0 = none); for benchmarks and tests
    batch_size: int = 32        # crops per step
    lr: float = 1e-3            # peak AdamW learning rate
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    warmup_steps: int = 100     # linear warm-up from lr/1000 to lr, then the decay below
    schedule: str = "cosine"    # "cosine" to 0, or "step": x0.1 at 81% and 95% of the run (ViTPose's 170/200 of 210)
    grad_clip: float = 1.0      # max global gradient norm (0 = off)
    ema: float = 0.0            # EMA decay of the weights (e.g. 0.999); checkpoints then hold the EMA (0 = off)


@dataclass(frozen=True)
class RunConfig:
    """Where and how a stage runs."""

    out: Path                   # run folder (training) or output folder
    device: str = "cpu"         # "cpu" or "cuda[:i]"
    workers: int = 2            # DataLoader worker processes (0 = load in the main process)
    seed: int = 0               # every random choice derives from it
    progress: bool = True       # show progress bars (the command layer turns this off for tests)
    resume: bool = False        # training: continue from out/last.pt (the end of its last complete epoch)
    overwrite: bool = False     # training: start over in an `out` that already holds a run (its run files go)


@dataclass(frozen=True)
class ValConfig:
    """Validation during training: COCO AP on ground-truth boxes every `every` epochs."""

    ann: Path | None = None     # person_keypoints_val.json; None = no validation (best.pt = last.pt)
    images: Path | None = None  # folder of the validation images
    every: int = 1              # validate every N epochs (and always after the last)
    keypoint_set: str | None = None  # --keypoint-set: a built-in set or a description file, for files that do not say


@dataclass(frozen=True)
class TrainTeacherConfig:
    ann: Path                   # COCO person-keypoints annotation file (training split)
    images: Path                # folder holding its images
    run: RunConfig
    arch: str = "vitpose-s"     # a teacher preset (kdcache.teacher.ARCHS): vitpose-s/b/l/h, CPU sizes vitpose-tiny/nano
    head: str = "classic"       # "classic" (two deconvolutions) or "simple" (bilinear x4 + 3x3 conv)
    input_hw: tuple[int, int] = DEFAULT_INPUT_HW   # crop (H, W); heatmaps are a quarter of it
    sigma: float = DEFAULT_SIGMA  # target Gaussian sigma in heatmap pixels
    # ViTPose's schedule: 210 epochs of AdamW at 5e-4, weight decay 0.1.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=210, lr=5e-4, weight_decay=0.1))
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    val: ValConfig = field(default_factory=ValConfig)
    keypoint_set: str | None = None  # --keypoint-set: a built-in set or a description file, for files that do not say


@dataclass(frozen=True)
class DumpConfig:
    teacher: Path               # teacher checkpoint (kdcache, official ViTPose)
    ann: Path                   # COCO annotation file whose person instances are dumped (or whose images, --boxes)
    images: Path                # folder holding its images
    run: RunConfig
    boxes: Path | None = None   # COCO detection results: dump these people (no ground truth) instead of ann's
    box_score_thr: float = 0.0  # --boxes: detections below this score are not dumped
    persons: str = "labelled"   # ann's people to dump: "labelled", "unlabelled" (boxes, no keypoints) or "all"
    views: int = 15             # K views per instance; view 0 is un-augmented (14 = 210 epochs / 16, docs/benchmark.md)
    batch_size: int = 64        # teacher batch
    shard_size: int = 1024      # views per HDF5 shard
    crop_format: str = "jpeg90"             # "jpegQ" (quality Q), "png", or "none" (replay from the images)
    heatmap_storage: str = "int16-step"     # one of kdcache.heatmap_storage.HEATMAP_STORAGES
    heatmap_rel_error: float = 0.03     # "int16-step": relative L2 error of each joint's map (docs/benchmark.md)
    gzip_level: int = 2                     # deflate level of the heatmap chunks (1 fastest .. 9 smallest)
    teacher_flip: bool = False  # store the mean of the teacher on the crop and on its mirror (flipped back)
    skip_bad_images: bool = False  # go on past unreadable images, listing them in the manifest
    expert: str | int | None = None  # ViTPose++ expert (dataset name or index); None = COCO
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    keypoint_set: str | None = None  # --keypoint-set: a built-in set or a description file, for files that do not say


@dataclass(frozen=True)
class TrainStudentConfig:
    student: StudentConfig
    run: RunConfig
    caches: tuple[Path, ...] = ()       # teacher caches (stage 1 output), trained on together
    cache_weights: tuple[float, ...] = ()  # draws per person per epoch, one per cache (() = 1 each; data.CacheMix)
    online_teacher: Path | None = None  # baseline: run this teacher every step; neither = ground truth only
    expert: str | int | None = None     # ViTPose++ expert of the online teacher; None = COCO
    ann: Path | None = None             # ground truth for the online baseline
    images: Path | None = None
    kd: KDConfig = field(default_factory=KDConfig)  # the teacher term and its mix with ground truth
    sigma: float = DEFAULT_SIGMA  # ground-truth Gaussian sigma in heatmap pixels (a cache's must be the same)
    flip_prob: float = AugmentConfig.flip_prob  # train-time mirror of cached views (maps flipped, pairs swapped)
    train_views: int = 0        # cached views 1..k only, epoch e reading view 1 + e mod k (0 = all K - 1)
    optim: OptimConfig = field(default_factory=OptimConfig)
    aug: AugmentConfig = field(default_factory=AugmentConfig)  # view sampling (online and ground-truth runs)
    view_seed: int | None = None  # online / ground truth: views from (view_seed, ann_id, view), None = run seed;
    # the dump's seed gives an online run the very views a cache holds, for a paired comparison
    student_aug: StudentAugConfig = field(default_factory=StudentAugConfig)  # photometric/occlusion/jitter
    val: ValConfig = field(default_factory=ValConfig)
    keypoint_set: str | None = None  # --keypoint-set: a built-in set or a description file, for files that do not say

    def __post_init__(self) -> None:
        if self.caches and self.online_teacher is not None:
            raise UserError("give one of --cache CACHE or --online-teacher CKPT, not both")
        check_cache_weights(len(self.caches), self.cache_weights)


def check_cache_weights(caches: int, weights: tuple[float, ...] | list[float]) -> None:
    """Refuse --cache-weight given, but not once per --cache."""
    if weights and len(weights) != caches:
        raise UserError(f"{len(weights)} --cache-weight for {caches} --cache; give one weight per cache, in the same "
                        "order, or none (1 each)")


@dataclass(frozen=True)
class EvalConfig:
    model: Path                 # checkpoint of any kind
    ann: Path                   # COCO annotation file (ground truth)
    images: Path                # folder holding its images
    boxes: Path | None = None   # COCO detection results; None = ground-truth boxes
    expert: str | int | None = None  # ViTPose++ expert (dataset name or index); None = COCO
    box_score_thr: float = 0.0  # detections below this score are dropped
    # flip test, batch size, workers (a command's usual loader processes), progress bar
    predict: PredictConfig = field(default_factory=lambda: PredictConfig(workers=RunConfig.workers))
    device: str = RunConfig.device  # "cpu" or "cuda[:i]"
    metrics_out: Path | None = None  # the metrics as JSON
    results_out: Path | None = None  # the COCO keypoint results as JSON
    vis_dir: Path | None = None  # PNGs of predictions over ground truth for the first vis_count images (None = off)
    vis_count: int = 20         # images drawn into vis_dir
    keypoint_set: str | None = None  # --keypoint-set: a built-in set or a description file, for files that do not say


def to_jsonable(obj: Any) -> Any:
    """A config (nested dataclasses, Paths, tuples) as plain JSON values, for config.json and cache attrs.
    Paths become absolute, so a record says which files were used wherever it was made from."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Path):
        return str(obj.resolve())
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    return obj
