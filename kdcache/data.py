"""Torch datasets: augmented views of annotated people (the dump, ground-truth and online training), cached
views (cached distillation), and several caches mixed by weight.

Every item is a dict of numpy arrays; crops stay uint8 [H, W, 3] until the training step normalises a
whole batch with `inference.to_input_tensor` (cheaper than per item, and workers ship 4x fewer bytes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from kdcache.augment import StudentAugConfig, jitter, photometric
from kdcache.cache_reader import Cache
from kdcache.coco import Instance
from kdcache.images import ImageMemo
from kdcache.errors import UserError
from kdcache.transforms import ViewSampler, flip_crop, keypoints_to_crop, warp_crop


class ViewDataset(Dataset):
    """Crops of (instance, view) pairs, each view derived from (seed, ann_id, view) by `sampler`.

    With `items` (the dump) the pairs are fixed; without, item i is view e + 1 of instance i in epoch e
    (`set_epoch`), so each epoch sees fresh augmentations and a rerun sees the same ones.

    Items: crop uint8 [H, W, 3], keypoints float32 [K, 3] (crop pixels, visibility), affine float64 [2, 3],
    flip, image_id, ann_id, view.
    """

    def __init__(self, instances: list[Instance], images_dir: Path, sampler: ViewSampler,
                 items: list[tuple[int, int]] | None = None):
        """
        Args:
            items: (instance index, view) pairs; None = one view per instance, chosen by `set_epoch`.
        """
        self.instances = instances
        self.sampler = sampler
        self.items = items
        self.epoch = 0
        self._images = ImageMemo(images_dir)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items) if self.items is not None else len(self.instances)

    def __getitem__(self, index: int) -> dict[str, Any]:
        inst_index, view = self.items[index] if self.items is not None else (index, self.epoch + 1)
        inst = self.instances[inst_index]
        geom = self.sampler.geometry(inst.bbox_xywh, inst.keypoints, inst.ann_id, view)
        input_hw = self.sampler.codec.input_hw
        # The size check catches images that are not the ones annotated (other folder, rotated copies).
        crop = warp_crop(self._images(inst.file_name, inst.image_wh), geom.affine, input_hw)
        keypoints = keypoints_to_crop(inst.keypoints, geom.affine, geom.flip, self.sampler.keypoint_set.flip_index)
        return {"crop": crop, "keypoints": keypoints, "affine": geom.affine.astype(np.float64),
                "flip": np.bool_(geom.flip), "image_id": np.int64(inst.image_id),
                "ann_id": np.int64(inst.ann_id), "view": np.int32(view)}


class TrainViews(Dataset):
    """Views with their ground-truth targets and the student's photometric changes, for training.

    Adds `target` [K, h, w] and `target_weight` [K] (the sampler's codec) to each `ViewDataset` item.
    `student_aug` changes the crop's pixels (its jitter is for cached views only); with `keep_clean` the
    changed crop goes to `student_crop` and `crop` stays as warped, the online teacher's input.
    """

    def __init__(self, views: ViewDataset, student_aug: StudentAugConfig, keep_clean: bool = False):
        self.views = views
        self.student_aug = student_aug
        self.keep_clean = keep_clean

    def set_epoch(self, epoch: int) -> None:
        self.views.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.views[index]
        item["target"], item["target_weight"] = self.views.sampler.codec.encode(item["keypoints"])
        if self.student_aug.changes_pixels:
            rng = np.random.default_rng([self.views.sampler.seed, int(item["ann_id"]), int(item["view"]), 1])
            changed = photometric(item["crop"], rng, self.student_aug)
            item["student_crop" if self.keep_clean else "crop"] = changed
        return item


class CachedDataset(Dataset):
    """Cached views, one per instance per epoch, with targets kept true under train-time augmentation.

    Epoch e reads view 1 + e mod k of every instance, k = K - 1 training views (view 0, the plain crop, when
    K = 1), or the first `train_views` of them: the views an online run draws in epochs 0 .. k - 1, then the
    same again, so "epochs" mean the same with and without the cache. A mirror (probability `flip_prob`,
    decided by (seed, epoch, index)) flips crop and teacher heatmaps together (the cache's codec, pairs of its
    keypoint set swapped). `student_aug` adds photometric changes and occlusion (targets unchanged) and,
    optionally, a small affine jitter of crop, heatmaps and keypoints together. Ground-truth targets are made
    with the cache's codec. A cache dumped with no crops (crop format "none") replays each crop from its image
    with the stored affine.

    Items: crop, teacher [K, h, w], teacher_confidence [K], target [K, h, w], target_weight [K], labelled (1: the
    row has ground truth, 0: dumped from a box alone), box_score.
    """

    def __init__(self, cache: Cache, flip_prob: float, seed: int, student_aug: StudentAugConfig | None = None,
                 train_views: int = 0):
        """
        Args:
            train_views: train on cached views 1 .. train_views only (0 = all K - 1 augmented views).
        """
        self.cache = cache
        self.codec = cache.codec
        self.keypoint_set = cache.keypoint_set
        self.views = int(cache.manifest.get("dump", {}).get("views") or 1)
        if len(cache) % self.views:
            raise UserError(f"cache {cache.path} holds {len(cache)} rows, not a multiple of its "
                            f"{self.views} views per instance; dump it again")
        available = max(1, self.views - 1)
        if not 0 <= train_views <= available:
            raise UserError(f"--train-views {train_views}: cache {cache.path} holds {available} augmented views "
                            f"per instance; pass 1..{available}, or 0 for all of them")
        self.train_views = train_views or available
        self.flip_prob = flip_prob
        self.seed = seed
        self.student_aug = student_aug or StudentAugConfig()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.cache) // self.views

    def row_of(self, index: int, draw: int | None = None) -> int:
        """Cache row of instance `index` at its `draw`-th draw (None: the current epoch's; rows are
        instance-major, views inner): view 1 + draw mod k."""
        draw = self.epoch if draw is None else draw
        view = 1 + draw % self.train_views if self.views > 1 else 0
        return index * self.views + view

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.item(index, self.epoch, (self.seed, self.epoch, index))

    def item(self, index: int, draw: int, key: tuple[int, ...]) -> dict[str, Any]:
        """Instance `index` at its `draw`-th draw, its train-time changes drawn from `np.random.default_rng(key)`."""
        row = self.cache[self.row_of(index, draw)]
        crop, teacher, keypoints = row["crop"], row["heatmaps"], row["keypoints"]
        confidence = row["confidence"] if "confidence" in row else teacher.max(axis=(1, 2))  # schema 1: none
        rng = np.random.default_rng(list(key))
        if rng.random() < self.flip_prob:
            swap = list(self.keypoint_set.flip_index)
            crop = flip_crop(crop)
            teacher = self.codec.flip(teacher, self.keypoint_set)
            confidence = confidence[swap]
            keypoints = keypoints[swap].copy()
            keypoints[:, 0] = (crop.shape[1] - 1) - keypoints[:, 0]
        crop, teacher, keypoints = jitter(crop, teacher, keypoints, rng, self.student_aug, self.codec)
        crop = photometric(crop, rng, self.student_aug)
        target, weight = self.codec.encode(keypoints)
        return {"crop": np.ascontiguousarray(crop), "teacher": np.ascontiguousarray(teacher),
                "teacher_confidence": np.ascontiguousarray(confidence, dtype=np.float32),
                "target": target, "target_weight": weight,
                "labelled": np.float32(row["labelled"]), "box_score": np.float32(row["box_score"])}


class CacheMix(Dataset):
    """Several caches trained on at once (train-student --cache A --cache B ...), each drawn as often as its weight.

    What an epoch is: cache c, holding n_c people, gives round(w_c * n_c) draws (at least 1) per epoch, w_c its
    weight: w = 1 draws each of its people once (a single cache of weight 1 is exactly its CachedDataset),
    w = 0.5 a fresh random half of them every epoch, w = 2 each of them twice, the two draws reading two
    different views. So an epoch holds sum_c round(w_c * n_c) items whatever the epoch, and every epoch of
    a person advances its views as `CachedDataset` does: its d-th draw over the run reads view 1 + d mod k.
    Which people a fractional weight draws in epoch e comes from (seed, e, c) alone.

    Items are `CachedDataset` items; `labelled` tells the loss which rows have ground truth.
    """

    def __init__(self, datasets: list[CachedDataset], weights: list[float], seed: int):
        if len(datasets) != len(weights) or not datasets:
            raise UserError(f"{len(weights)} cache weights for {len(datasets)} caches; give one --cache-weight per "
                            "--cache, in the same order")
        bad = [w for w in weights if not (w > 0 and np.isfinite(w))]
        if bad:
            raise UserError(f"cache weight {bad[0]} is not a positive number; a weight is how many times each "
                            "person of its cache is drawn per epoch (1: once)")
        self.datasets, self.weights, self.seed = datasets, [float(w) for w in weights], seed
        self.draws = [max(1, round(w * len(d))) for d, w in zip(datasets, self.weights)]
        self._per_epoch = [-(-draws // len(d)) for d, draws in zip(datasets, self.draws)]  # most draws of a person
        self.epoch = 0
        self._plan = self._make_plan(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._plan = self._make_plan(epoch)
        for dataset in self.datasets:
            dataset.set_epoch(epoch)

    def _make_plan(self, epoch: int) -> np.ndarray:
        """[L, 3] int64 (cache, instance, repeat) of every item of `epoch`."""
        parts = []
        for c, (dataset, draws) in enumerate(zip(self.datasets, self.draws)):
            n = len(dataset)
            full, rest = divmod(draws, n)
            instances = [np.arange(n)] * full
            if rest:
                instances.append(np.sort(np.random.default_rng([self.seed, epoch, c]).permutation(n)[:rest]))
            for repeat, chosen in enumerate(instances):
                parts.append(np.stack([np.full(len(chosen), c), chosen, np.full(len(chosen), repeat)], axis=1))
        return np.concatenate(parts).astype(np.int64)

    def __len__(self) -> int:
        return sum(self.draws)

    def __getitem__(self, index: int) -> dict[str, Any]:
        c, instance, repeat = (int(v) for v in self._plan[index])
        key = (self.seed, self.epoch, instance, *((c, repeat) if c or repeat else ()))  # cache 0, once: CachedDataset's
        return self.datasets[c].item(instance, self.epoch * self._per_epoch[c] + repeat, key)
