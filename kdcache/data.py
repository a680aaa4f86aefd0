"""Torch datasets: augmented ground-truth crops (teacher training, dump, online KD) and cached views.

Every item is a dict of numpy arrays; crops stay uint8 [H, W, 3] until the training step normalises a
whole batch with `transforms.to_input_tensor` (cheaper than per item, and workers ship 4x fewer bytes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from kdcache import heatmaps as codec
from kdcache.augment import StudentAugConfig, jitter, photometric
from kdcache.cache import open_cache
from kdcache.coco import ImageMemo, Instance
from kdcache.errors import UserError
from kdcache.keypoints import FLIP_INDEX
from kdcache.transforms import AugmentConfig, flip_crop, keypoints_to_crop, sample_view, warp_crop


def heatmap_hw_for(input_hw: tuple[int, int]) -> tuple[int, int]:
    """Heatmaps are at stride 4 of the input: 256x192 -> 64x48."""
    return input_hw[0] // 4, input_hw[1] // 4


class ViewDataset(Dataset):
    """Crops of (instance, view) pairs, each view derived from (seed, ann_id, view).

    Used by the dump (a fixed list of views) and by ground-truth training, where `set_epoch` makes epoch e
    draw view e + 1 of every instance, so each epoch sees fresh augmentations and a rerun sees the same ones.
    """

    def __init__(self, instances: list[Instance], images_dir: Path, input_hw: tuple[int, int],
                 aug: AugmentConfig, seed: int, items: list[tuple[int, int]] | None = None,
                 sigma: float | None = None, student_aug: StudentAugConfig | None = None,
                 keep_clean: bool = False):
        """
        Args:
            items: (instance index, view) pairs; None = one view per instance, chosen by `set_epoch`.
            sigma: when given, items carry ground-truth `target` heatmaps [K, h, w] and `target_weight` [K].
            student_aug: photometric changes and occlusion of the crop (its jitter is for cached views only).
            keep_clean: with `student_aug`, keep `crop` as warped (the online teacher's input) and put the
                changed one in `student_crop`.
        """
        self.instances = instances
        self.items = items
        self.input_hw = tuple(input_hw)
        self.aug = aug
        self.seed = seed
        self.sigma = sigma
        self.student_aug = student_aug or StudentAugConfig()
        self.keep_clean = keep_clean
        self.epoch = 0
        self._images = ImageMemo(images_dir)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items) if self.items is not None else len(self.instances)

    def __getitem__(self, index: int) -> dict[str, Any]:
        inst_index, view = self.items[index] if self.items is not None else (index, self.epoch + 1)
        inst = self.instances[inst_index]
        geom = sample_view(inst.bbox_xywh, inst.keypoints, self.seed, inst.ann_id, view, self.aug, self.input_hw)
        # The size check catches images that are not the ones annotated (other folder, rotated copies).
        crop = warp_crop(self._images(inst.file_name, inst.image_wh), geom.affine, self.input_hw)
        keypoints = keypoints_to_crop(inst.keypoints, geom.affine, geom.flip)
        item = {"crop": crop, "keypoints": keypoints, "affine": geom.affine.astype(np.float64),
                "flip": np.bool_(geom.flip), "image_id": np.int64(inst.image_id),
                "ann_id": np.int64(inst.ann_id), "view": np.int32(view)}
        if self.sigma is not None:
            item["target"], item["target_weight"] = codec.encode(
                keypoints, self.input_hw, heatmap_hw_for(self.input_hw), self.sigma)
        if self.student_aug.changes_pixels:
            changed = photometric(crop, np.random.default_rng([self.seed, inst.ann_id, view, 1]), self.student_aug)
            item["student_crop" if self.keep_clean else "crop"] = changed
        return item


class CachedDataset(Dataset):
    """Cached views, one per instance per epoch, with targets kept true under train-time augmentation.

    Epoch e reads view 1 + e mod k of every instance, k = K - 1 training views (view 0, the plain crop, when
    K = 1), or the first `train_views` of them: the views an online run draws in epochs 0 .. k - 1, then the
    same again, so "epochs" mean the same with and without the cache. A mirror (probability `flip_prob`,
    decided by (seed, epoch, index)) flips crop and teacher heatmaps together and swaps keypoint pairs; UDP
    makes the heatmap mirror exact, with no shift.
    `student_aug` adds photometric changes and occlusion (targets unchanged) and, optionally, a small
    affine jitter of crop, heatmaps and keypoints together. A cache dumped with no crops (crop encoding
    "none") replays each crop from its image with the stored affine.
    """

    def __init__(self, cache_path: Path, sigma: float, flip_prob: float, seed: int, images: Path | None = None,
                 student_aug: StudentAugConfig | None = None, train_views: int = 0):
        """
        Args:
            images: image folder for crop replay (default: the one the cache was dumped from).
            train_views: train on cached views 1 .. train_views only (0 = all K - 1 augmented views).
        """
        self.cache = open_cache(cache_path, images=images)
        self.views = int(self.cache.manifest.get("dump", {}).get("views") or 1)
        if len(self.cache) % self.views:
            raise UserError(f"cache {cache_path} holds {len(self.cache)} rows, not a multiple of its "
                            f"{self.views} views per instance; dump it again")
        available = max(1, self.views - 1)
        if not 0 <= train_views <= available:
            raise UserError(f"--train-views {train_views}: cache {cache_path} holds {available} augmented views "
                            f"per instance; pass 1..{available}, or 0 for all of them")
        self.train_views = train_views or available
        self.sigma = sigma
        self.flip_prob = flip_prob
        self.seed = seed
        self.student_aug = student_aug or StudentAugConfig()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.cache) // self.views

    def row_of(self, index: int) -> int:
        """Cache row of instance `index` in the current epoch (rows are instance-major, views inner)."""
        view = 1 + self.epoch % self.train_views if self.views > 1 else 0
        return index * self.views + view

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.cache[self.row_of(index)]
        crop, teacher, keypoints = row["crop"], row["heatmaps"], row["keypoints"]
        confidence = row["confidence"] if "confidence" in row else teacher.max(axis=(1, 2))  # schema 1: none
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if rng.random() < self.flip_prob:
            crop = flip_crop(crop)
            teacher = codec.flip_heatmaps(teacher)
            confidence = confidence[list(FLIP_INDEX)]
            width = crop.shape[1]
            keypoints = keypoints[list(FLIP_INDEX)].copy()
            keypoints[:, 0] = (width - 1) - keypoints[:, 0]
        crop, teacher, keypoints = jitter(crop, teacher, keypoints, rng, self.student_aug)
        crop = photometric(crop, rng, self.student_aug)
        input_hw = crop.shape[:2]
        target, weight = codec.encode(keypoints, input_hw, teacher.shape[-2:], self.sigma)
        return {"crop": np.ascontiguousarray(crop), "teacher": np.ascontiguousarray(teacher),
                "teacher_confidence": np.ascontiguousarray(confidence, dtype=np.float32),
                "target": target, "target_weight": weight}
