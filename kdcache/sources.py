"""Training sources: where a model's targets come from. Each owns its dataset and its loss terms; the
training loop (`kdcache.train.fit`) runs any of them and does not know which.

    GroundTruth   augmented views of annotated people, ground-truth heatmaps (train-teacher, and train-student
                  with neither --cache nor --online-teacher)
    CachedKD      the views and heatmaps of one or more teacher caches, mixed with ground truth where a row has
                  some (train-student --cache A [--cache B ...])
    OnlineKD      augmented views, the teacher run on each batch (train-student --online-teacher: the baseline)

A source is any object with `dataset` (items: dicts of numpy arrays with "crop" uint8 [H, W, 3] and, when
the student sees changed pixels, "student_crop"), `loss(model, batch) -> scalar` over a collated batch
already on the device, `codec` (the codec its targets were made with) and `keypoint_set`: the student then
keeps both (a TokenPose teacher's students make and read TokenPose's heatmaps; a CrowdPose file's students
predict its 14 joints). `student_source` picks the one a TrainStudentConfig asks for; a new source is one
more class here, its branch there, and its tests.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from kdcache.cache import open_cache
from kdcache.cache_format import check_compatible
from kdcache.cache_reader import Cache
from kdcache.codec import CODECS, Codec
from kdcache.coco import instances_from_coco, keypoint_set_of, load_coco
from kdcache.config import TrainStudentConfig
from kdcache.data import CacheMix, CachedDataset, TrainViews, ViewDataset
from kdcache.errors import UserError
from kdcache.inference import input_heatmaps, to_input_tensor
from kdcache.keypoints import KeypointSet
from kdcache.losses import KDConfig, distillation_loss, heatmap_mse
from kdcache.student import StudentConfig
from kdcache.teacher import load_teacher, require_keypoint_set
from kdcache.transforms import AugmentConfig, ViewSampler

log = logging.getLogger(__name__)


class TrainingSource(Protocol):
    dataset: Dataset
    codec: Codec
    keypoint_set: KeypointSet

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scalar loss of `model` on a collated batch (tensors on the training device)."""


def student_input(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The normalised crops the trained model sees: [N, 3, H, W] (photometric changes included, if any)."""
    return to_input_tensor(batch.get("student_crop", batch["crop"]))


def annotated_views(ann: Path, images: Path, aug: AugmentConfig, codec: Codec, seed: int,
                    keypoint_set: str | None = None) -> ViewDataset:
    """One fresh view per annotated person per epoch, in the annotation file's keypoint set (`keypoint_set`:
    `--keypoint-set`, for a file that does not say)."""
    coco = load_coco(ann, keypoint_set)
    instances = instances_from_coco(coco, ann)
    if not instances:
        raise UserError(f"{ann} has no usable person instances; check the annotation file")
    return ViewDataset(instances, images, ViewSampler(aug, codec, keypoint_set_of(coco, ann), seed))


class _OnAnnotatedViews:
    """A source whose data are augmented views of annotated people: their codec and keypoint set."""

    dataset: TrainViews

    @property
    def codec(self) -> Codec:
        return self.dataset.views.sampler.codec

    @property
    def keypoint_set(self) -> KeypointSet:
        return self.dataset.views.sampler.keypoint_set


@dataclass
class GroundTruth(_OnAnnotatedViews):
    """Ground-truth heatmaps only: mmpose's weighted MSE on the codec's targets."""

    dataset: TrainViews

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return heatmap_mse(model(student_input(batch)), batch["target"], batch["target_weight"])


@dataclass
class CachedKD:
    """The cached teacher heatmaps of each view, mixed with its ground truth where the row has some (`KDConfig`)."""

    dataset: CacheMix
    kd: KDConfig

    @property
    def codec(self) -> Codec:
        return self.dataset.datasets[0].codec

    @property
    def keypoint_set(self) -> KeypointSet:
        return self.dataset.datasets[0].keypoint_set

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return distillation_loss(model(student_input(batch)), batch["teacher"], batch["target"],
                                 batch["target_weight"], self.kd, batch["teacher_confidence"], batch["labelled"],
                                 batch["box_score"])


@dataclass
class OnlineKD(_OnAnnotatedViews):
    """The teacher run on every batch, on the crop before photometric changes (as the dump sees it)."""

    dataset: TrainViews
    teacher: nn.Module
    kd: KDConfig

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = student_input(batch)
        sampler = self.dataset.views.sampler
        clean = to_input_tensor(batch["crop"]) if "student_crop" in batch else x  # the crop before photometrics
        target = input_heatmaps(self.teacher, clean, sampler.codec, sampler.keypoint_set)
        return distillation_loss(model(x), target, batch["target"], batch["target_weight"], self.kd,
                                 target.amax(dim=(2, 3)))


def check_cache_fits(cache: Cache, student: StudentConfig, sigma: float, codec: str | None = None) -> None:
    """Refuse a cache whose targets another codec made (kind, crop size, heatmap size, sigma) than the one the
    student trains with: `codec` by name, default the cache's own kind (the student follows its teacher)."""
    mismatch = check_compatible(cache.manifest, CODECS[codec or cache.codec.name].for_input(student.input_hw, sigma))
    if mismatch:
        hw = cache.input_hw
        raise UserError(f"cache {cache.path} does not match the student: {'; '.join(mismatch)}; pass "
                        f"--input-size {hw[0]}x{hw[1]} or dump a cache with the student's settings")


def cache_mix(cfg: TrainStudentConfig) -> CacheMix:
    """The caches of `cfg`, each checked (readable, complete, the student's codec), mixed by weight; they must
    share one keypoint set, which the student then predicts."""
    datasets = []
    for path in cfg.caches:
        cache = open_cache(path, images=cfg.images)
        if datasets and cache.codec.name != datasets[0].codec.name:
            raise UserError(f"cache {path} holds {cache.codec.name} targets, {cfg.caches[0]} {datasets[0].codec.name} "
                            "ones; a student learns one codec: train on caches of teachers of one kind")
        check_cache_fits(cache, cfg.student, cfg.sigma)
        datasets.append(CachedDataset(cache, cfg.flip_prob, cfg.run.seed, cfg.student_aug, cfg.train_views))
    names = {d.keypoint_set.name for d in datasets}
    if len(names) > 1:
        raise UserError(f"the caches hold different keypoint sets ({', '.join(sorted(names))}); train on caches of "
                        "one keypoint set")
    teachers = {d.cache.manifest["teacher"]["sha256"] for d in datasets}
    if len(teachers) > 1:
        log.info("the %d caches were dumped by %d different teachers", len(datasets), len(teachers))
    mix = CacheMix(datasets, list(cfg.cache_weights or [1.0] * len(datasets)), cfg.run.seed)
    for path, dataset, draws in zip(cfg.caches, datasets, mix.draws):
        labelled = dataset.cache.manifest.get("persons", {}).get("labelled", len(dataset))
        log.info("cache %s: %d people (%d with ground truth), %d draws per epoch", path, len(dataset), labelled,
                 draws)
    return mix


def student_source(cfg: TrainStudentConfig) -> GroundTruth | CachedKD | OnlineKD:
    """The source a train-student config asks for: a cache, an online teacher, or (neither) ground truth."""
    if cfg.caches:
        return CachedKD(cache_mix(cfg), cfg.kd)
    if cfg.ann is None or cfg.images is None:
        raise UserError("training without --cache needs --ann and --images (the ground truth to augment)")
    view_seed = cfg.run.seed if cfg.view_seed is None else cfg.view_seed
    teacher = None
    codec = CODECS[cfg.student.codec].for_input(cfg.student.input_hw, cfg.sigma)
    if cfg.online_teacher is not None:
        teacher = load_teacher(cfg.online_teacher, cfg.run.device, expert=cfg.expert)
        if tuple(teacher.config.input_hw) != tuple(cfg.student.input_hw):
            raise UserError(f"teacher takes {teacher.config.input_hw} crops, student {cfg.student.input_hw}; "
                            "pass --input-size to match them")
        codec = dataclasses.replace(teacher.codec, sigma=cfg.sigma)  # views cut as the teacher was trained
    views = annotated_views(cfg.ann, cfg.images, cfg.aug, codec, view_seed, cfg.keypoint_set)
    if teacher is None:
        if cfg.kd.alpha > 0:
            log.info("no --cache or --online-teacher: training on ground truth only (alpha ignored)")
        return GroundTruth(TrainViews(views, cfg.student_aug))
    require_keypoint_set(teacher, views.sampler.keypoint_set, cfg.online_teacher, cfg.expert)
    return OnlineKD(TrainViews(views, cfg.student_aug, keep_clean=True), teacher, cfg.kd)
