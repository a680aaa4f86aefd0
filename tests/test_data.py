"""Datasets: augmented views of annotated people (reproducible, keypoints where the crop shows them), their training
targets and student crops, and cached views mirrored with their teacher heatmaps."""

import numpy as np
import pytest

from kdcache.augment import StudentAugConfig
from kdcache.cache import open_cache
from kdcache.codec import UDPHeatmap
from kdcache.coco import load_instances
from kdcache.images import read_image
from kdcache.data import CacheMix, CachedDataset, TrainViews, ViewDataset
from kdcache.errors import UserError
from kdcache.keypoints import COCO_17
from kdcache.transforms import AugmentConfig, ViewSampler, crop_to_image, warp_crop

INPUT_HW = (64, 64)
SEED = 3


@pytest.fixture(scope="module")
def tiny(student_cache):
    """Six one-person images and a nano teacher's cache of 3 views per instance, dumped with SEED."""
    made = student_cache(SEED)
    return {"instances": load_instances(made["ann"]), "images": made["images"], "cache": open_cache(made["cache"])}


def views(tiny, seed=SEED, items=None) -> ViewDataset:
    sampler = ViewSampler(AugmentConfig(), UDPHeatmap.for_input(INPUT_HW), COCO_17, seed)
    return ViewDataset(tiny["instances"], tiny["images"], sampler, items)


def test_a_view_is_reproducible_from_seed_ann_id_and_view(tiny):
    items = [(i, v) for i in range(len(tiny["instances"])) for v in range(3)]
    a, b = views(tiny, items=items), views(tiny, items=items[::-1])  # other order, other dataset object
    for index, (i, v) in enumerate(items):
        x, y = a[index], b[len(items) - 1 - index]
        assert (x["ann_id"], x["view"]) == (tiny["instances"][i].ann_id, v)
        for key in ("crop", "keypoints", "affine", "flip"):
            np.testing.assert_array_equal(x[key], y[key])
    other = views(tiny, seed=SEED + 1, items=items)
    assert not np.allclose(other[1]["affine"], a[1]["affine"])  # the seed matters for augmented views
    np.testing.assert_array_equal(other[0]["affine"], a[0]["affine"])  # view 0 is the plain crop of any seed


def test_views_are_the_views_the_dump_cached(tiny):
    """Same (seed, ann_id, view): the same affine, mirror and keypoints as the cache rows dumped with SEED."""
    rows = tiny["cache"]
    dataset = views(tiny, items=[(r // 3, r % 3) for r in range(len(rows))])
    for r in range(len(rows)):
        item, row = dataset[r], rows[r]
        assert (item["ann_id"], item["view"], bool(item["flip"])) == (row["ann_id"], row["view"], row["flip"])
        np.testing.assert_allclose(item["affine"], row["affine"], atol=1e-9)
        np.testing.assert_array_equal(item["keypoints"], row["keypoints"])


def test_crop_and_keypoints_are_the_image_through_the_affine(tiny):
    dataset = views(tiny, items=[(i, v) for i in range(6) for v in range(1, 4)])
    assert any(dataset[k]["flip"] for k in range(len(dataset))) and not all(
        dataset[k]["flip"] for k in range(len(dataset)))
    for k in range(len(dataset)):
        item, inst = dataset[k], tiny["instances"][k // 3]
        image = read_image(tiny["images"] / inst.file_name)
        np.testing.assert_array_equal(item["crop"], warp_crop(image, item["affine"], INPUT_HW))
        swap = list(COCO_17.flip_index) if item["flip"] else list(range(17))
        back = crop_to_image(item["keypoints"][swap, :2], item["affine"])  # undo the pair swap, then the warp
        np.testing.assert_allclose(back, inst.keypoints[:, :2], atol=1e-3)
        np.testing.assert_array_equal(item["keypoints"][swap, 2], inst.keypoints[:, 2])


def test_epoch_e_draws_view_e_plus_1(tiny):
    dataset, fixed = views(tiny), views(tiny, items=[(2, 3)])
    dataset.set_epoch(2)
    assert len(dataset) == 6 and dataset[2]["view"] == 3
    np.testing.assert_array_equal(dataset[2]["crop"], fixed[0]["crop"])


@pytest.mark.parametrize("keep_clean", [False, True])
def test_train_views_add_codec_targets_and_student_crops(tiny, keep_clean):
    plain = views(tiny)
    aug = StudentAugConfig(color_prob=1.0, noise_prob=1.0)
    dataset = TrainViews(views(tiny), aug, keep_clean=keep_clean)
    for i in range(len(dataset)):
        item = dataset[i]
        target, weight = plain.sampler.codec.encode(item["keypoints"])
        np.testing.assert_array_equal(item["target"], target)
        np.testing.assert_array_equal(item["target_weight"], weight)
        assert item["target"].shape == (17, 16, 16) and weight.sum() > 0
        changed = item["student_crop"] if keep_clean else item["crop"]
        assert ("student_crop" in item) == keep_clean
        assert not np.array_equal(changed, plain[i]["crop"])  # photometric changes ...
        np.testing.assert_array_equal(changed, dataset[i]["student_crop" if keep_clean else "crop"])  # ... fixed
        if keep_clean:
            np.testing.assert_array_equal(item["crop"], plain[i]["crop"])  # the teacher's input stays clean


def test_train_views_without_pixel_changes_pass_the_crop_through(tiny):
    item = TrainViews(views(tiny), StudentAugConfig(), keep_clean=True)[0]
    assert "student_crop" not in item
    np.testing.assert_array_equal(item["crop"], views(tiny)[0]["crop"])


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_cached_mirror_flips_crop_and_teacher_together(tiny, flip_prob):
    rows = tiny["cache"]
    dataset = CachedDataset(rows, flip_prob=flip_prob, seed=0)
    codec, swap = rows.codec, list(COCO_17.flip_index)
    for i in range(len(dataset)):
        item, row = dataset[i], rows[dataset.row_of(i)]
        keypoints = row["keypoints"].copy()
        if flip_prob:
            np.testing.assert_array_equal(item["crop"], row["crop"][:, ::-1])
            np.testing.assert_array_equal(item["teacher"], row["heatmaps"][swap, :, ::-1])
            np.testing.assert_array_equal(item["teacher_confidence"], row["confidence"][swap])
            keypoints = keypoints[swap]
            keypoints[:, 0] = INPUT_HW[1] - 1 - keypoints[:, 0]
            # Under UDP the targets of joints inside the crop mirror exactly (outside, the window cut does not).
            inside = (keypoints[:, 0] >= 0) & (keypoints[:, 0] <= INPUT_HW[1] - 1)
            mirrored = codec.flip(codec.encode(row["keypoints"])[0], COCO_17)
            np.testing.assert_allclose(item["target"][inside], mirrored[inside], atol=1e-6)
        else:
            np.testing.assert_array_equal(item["crop"], row["crop"])
            np.testing.assert_array_equal(item["teacher"], row["heatmaps"])
        target, weight = codec.encode(keypoints)
        np.testing.assert_array_equal(item["target"], target)
        np.testing.assert_array_equal(item["target_weight"], weight)


def test_cached_mirror_is_decided_per_seed_epoch_and_instance(tiny):
    dataset = CachedDataset(tiny["cache"], flip_prob=0.5, seed=1)
    flipped = []
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            crop = dataset[i]["crop"]
            np.testing.assert_array_equal(crop, dataset[i]["crop"])  # the same item twice
            flipped.append(not np.array_equal(crop, tiny["cache"][dataset.row_of(i)]["crop"]))
    assert 0 < sum(flipped) < len(flipped)


class Rows:
    """A cache-like object of `n` rows dumped with `views` views per instance."""

    def __init__(self, n, views):
        self.n, self.path, self.codec, self.keypoint_set = n, "c", UDPHeatmap(), COCO_17
        self.manifest = {"dump": {"views": views}}

    def __len__(self):
        return self.n


def test_cached_dataset_refuses_a_partial_instance():
    with pytest.raises(UserError, match=r"cache c holds 7 rows, not a multiple of its 3 views per instance"):
        CachedDataset(Rows(7, 3), flip_prob=0.5, seed=0)
    assert len(CachedDataset(Rows(6, 3), flip_prob=0.5, seed=0)) == 2



class NumberedRows(Rows):
    """Rows whose teacher heatmaps hold their row number (constant maps: a mirror keeps them), even rows labelled."""

    def __getitem__(self, row):
        k = self.keypoint_set.num_keypoints
        return {"crop": np.zeros((*self.codec.input_hw, 3), np.uint8),
                "heatmaps": np.full((k, *self.codec.heatmap_hw), row, np.float32),
                "keypoints": np.zeros((k, 3), np.float32), "labelled": row % 2 == 0, "box_score": 0.25}


def test_one_cache_of_weight_one_is_its_cached_dataset(tiny):
    single = CachedDataset(tiny["cache"], flip_prob=0.5, seed=2, student_aug=StudentAugConfig(jitter_prob=0.5))
    mix = CacheMix([CachedDataset(tiny["cache"], flip_prob=0.5, seed=2, student_aug=StudentAugConfig(jitter_prob=0.5))],
                   [1.0], seed=2)
    assert len(mix) == len(single)
    for epoch in (0, 3):
        single.set_epoch(epoch)
        mix.set_epoch(epoch)
        for i in range(len(mix)):
            a, b = single[i], mix[i]
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


def test_weights_set_how_often_each_cache_is_drawn_per_epoch():
    """Cache A (4 people, 5 views) weight 2: each person twice per epoch on two views; B (6 people, 3 views)
    weight 0.5: a fresh random half per epoch, its views advancing per draw; the epoch length never changes."""
    a, b = CachedDataset(NumberedRows(20, 5), 0.0, 0), CachedDataset(NumberedRows(18, 3), 0.0, 0)
    mix = CacheMix([a, b], [2.0, 0.5], seed=7)
    assert mix.draws == [8, 3] and len(mix) == 11
    halves = []
    for epoch in range(3):
        mix.set_epoch(epoch)
        items = [mix[i] for i in range(len(mix))]
        read = [(int(mix._plan[i][0]), int(item["teacher"][0, 0, 0])) for i, item in enumerate(items)]
        rows_a = sorted(row for c, row in read if c == 0)
        # person p of A at its draws 2e and 2e + 1: views 1 + (2e) mod 4 and 1 + (2e + 1) mod 4
        assert rows_a == sorted(p * 5 + 1 + d % 4 for p in range(4) for d in (2 * epoch, 2 * epoch + 1))
        rows_b = [row for c, row in read if c == 1]
        people = sorted(row // 3 for row in rows_b)
        assert len(set(people)) == 3 and all(row % 3 == 1 + epoch % 2 for row in rows_b)
        halves.append(people)
        for item, (c, row) in zip(items, read):  # what the loss needs to tell rows apart
            assert item["labelled"] == np.float32(row % 2 == 0) and item["box_score"] == np.float32(0.25)
    assert halves[0] != halves[1] or halves[1] != halves[2]  # a fresh half
    again = CacheMix([a, b], [2.0, 0.5], seed=7)
    again.set_epoch(1)
    mix.set_epoch(1)
    assert [int(again[i]["teacher"][0, 0, 0]) for i in range(11)] == [int(mix[i]["teacher"][0, 0, 0])
                                                                       for i in range(11)]


def test_cache_weights_are_checked():
    a = CachedDataset(NumberedRows(6, 3), 0.0, 0)
    with pytest.raises(UserError, match="2 cache weights for 1 caches; give one --cache-weight per --cache"):
        CacheMix([a], [1.0, 2.0], seed=0)
    with pytest.raises(UserError, match="cache weight 0.0 is not a positive number"):
        CacheMix([a], [0.0], seed=0)
