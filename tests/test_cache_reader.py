"""Cache reader: write -> read gives back the same values (within each storage's error), the README's h5py-only
recipe reads the same thing, older schemas are read, foreign or unfinished caches refused, workers are safe."""

import json
import pickle

import cv2
import h5py
import numpy as np
import pytest
import torch

from kdcache.cache import open_cache
from kdcache.cache_format import encode_crop
from kdcache.cache_writer import write_manifest
from kdcache.codec import UDPHeatmap
from kdcache.errors import UserError
from kdcache.heatmap_storage import HEATMAP_STORAGES, heatmap_storage, peak_window
from kdcache.keypoints import COCO_17

K, H, W = 17, 32, 24


def _rel_l2(a, b, axis=None):
    return np.linalg.norm(a - b, axis=axis) / np.linalg.norm(b, axis=axis)


@pytest.mark.parametrize("storage", list(HEATMAP_STORAGES))
def test_write_read_round_trip(tmp_path, storage, make_cache):
    written = make_cache(tmp_path, storage=storage)
    cache = open_cache(tmp_path)
    assert len(cache) == 8
    for shard, (_, crops, heat, rows) in enumerate(written):
        for row in range(len(rows["view"])):
            got = cache[shard * 5 + row]
            np.testing.assert_array_equal(got["affine"], rows["affine"][row])
            np.testing.assert_array_equal(got["keypoints"], rows["keypoints"][row])
            np.testing.assert_array_equal(got["confidence"], rows["confidence"][row])
            assert got["flip"] == bool(rows["flip"][row])
            assert got["ann_id"] == rows["ann_id"][row] and got["view"] == rows["view"][row]
            assert got["image_id"] == rows["image_id"][row]
            assert got["crop"].shape == (H * 4, W * 4, 3) and got["crop"].dtype == np.uint8
            assert np.abs(got["crop"].astype(int) - crops[row]).mean() < 2.0  # JPEG q95 on a smooth crop
            assert got["heatmaps"].dtype == np.float32 and got["heatmaps"].shape == (K, H, W)
            assert not got["heatmaps"][3].any()
            rel = _rel_l2(got["heatmaps"], heat[row])
            if storage == "int16-step":  # the error budget is met, and used (not spent on needless bits)
                assert 0.006 < rel < 0.009
            elif storage == "int16-step-window":  # the budget on each peak's window, zeros elsewhere
                kept = np.where(peak_window(heat[row]), heat[row], 0)
                assert 0.006 < _rel_l2(got["heatmaps"], kept) < 0.009
                assert not got["heatmaps"][~peak_window(heat[row])].any()
            elif storage == "float16":
                assert rel < 1e-3
            else:  # uint8: at most half a step of each joint's range
                step = (heat[row].max(axis=(1, 2)) - heat[row].min(axis=(1, 2))) / 255.0
                assert np.all(np.abs(got["heatmaps"] - heat[row]).max(axis=(1, 2)) <= step * 0.5 + 1e-6)
    assert cache.attrs(1)["d"] == {"a": 1}


def test_png_crops_are_lossless(tmp_path, make_cache):
    written = make_cache(tmp_path, n_per_shard=(3,), crop="png")
    cache = open_cache(tmp_path)
    for row, crop in enumerate(written[0][1]):
        np.testing.assert_array_equal(cache[row]["crop"], crop)


def test_readme_recipe_reads_the_same_with_h5py_alone(tmp_path, make_cache):
    """README "Cache format": a reader with h5py, numpy and cv2 only, no kdcache."""
    make_cache(tmp_path, n_per_shard=(4,))
    cache = open_cache(tmp_path)
    with h5py.File(tmp_path / "shard-00000.h5", "r") as f:
        i = 2
        o = f["crop_offset"]
        crop = cv2.cvtColor(cv2.imdecode(f["crop"][o[i]:o[i + 1]], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        z = f["heatmaps"][i].astype(np.int32)
        heatmaps = ((z >> 1) ^ -(z & 1)) * f["heatmap_step"][i][:, None, None]
        np.testing.assert_array_equal(crop, cache[i]["crop"])
        np.testing.assert_array_equal(heatmaps.astype(np.float32), cache[i]["heatmaps"])


def test_incomplete_and_foreign_caches_are_refused(tmp_path, make_cache):
    make_cache(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["complete"] = False
    write_manifest(tmp_path, manifest)
    with pytest.raises(UserError, match="incomplete"):
        open_cache(tmp_path)
    assert len(open_cache(tmp_path, allow_incomplete=True)) == 8
    manifest["complete"], manifest["schema_version"] = True, 999
    write_manifest(tmp_path, manifest)
    with pytest.raises(UserError, match="schema version 999"):
        open_cache(tmp_path)
    with pytest.raises(UserError, match="not a kdcache cache"):
        open_cache(tmp_path / "nowhere")


def test_schema_1_cache_is_still_read(tmp_path, make_heatmaps):
    """kdcache 0.1 wrote vlen JPEG crops and uint8 min/max heatmaps with no confidence."""
    rng = np.random.default_rng(0)
    heat = make_heatmaps(3, rng)
    stored, value_range = heatmap_storage("uint8-minmax-per-joint").encode(heat, 0.0, 2.0)
    crop = cv2.resize(rng.integers(0, 255, (8, 6, 3), dtype=np.uint8), (W * 4, H * 4))
    with h5py.File(tmp_path / "shard-00000.h5", "w") as f:
        crops = f.create_dataset("crop", (3,), dtype=h5py.vlen_dtype(np.uint8))
        for i in range(3):
            crops[i] = encode_crop(crop, "jpeg95")
        f.create_dataset("heatmaps", data=stored, chunks=(1, K, H, W), compression="gzip")
        f.create_dataset("heatmap_range", data=value_range)
        f.create_dataset("affine", data=np.zeros((3, 2, 3)))
        f.create_dataset("flip", data=np.zeros(3, bool))
        for name in ("image_id", "ann_id"):
            f.create_dataset(name, data=np.arange(3, dtype=np.int64))
        f.create_dataset("view", data=np.arange(3, dtype=np.int32))
        f.create_dataset("keypoints", data=np.zeros((3, K, 3), np.float32))
    write_manifest(tmp_path, {
        "schema_version": 1, "complete": True, "num_shards": 1, "input_hw": [H * 4, W * 4], "heatmap_hw": [H, W],
        "sigma": 2.0, "crop_encoding": "jpeg95", "heatmap_encoding": "uint8-minmax-per-joint",
        "shards": [{"name": "shard-00000.h5", "index": 0, "rows": 3, "sha256": "-"}]})
    cache = open_cache(tmp_path)
    row = cache[2]
    assert row["view"] == 2 and "confidence" not in row and row["crop"].shape == (H * 4, W * 4, 3)
    assert _rel_l2(row["heatmaps"], heat[2]) < 0.03
    # Older schemas hold UDP heatmaps of their recorded sizes, in COCO-17.
    assert cache.codec == UDPHeatmap((H * 4, W * 4), (H, W), 2.0) and cache.keypoint_set == COCO_17


def test_reader_survives_pickling_and_dataloader_workers(tmp_path, make_cache):
    make_cache(tmp_path)
    cache = open_cache(tmp_path)
    first = cache[6]  # handles opened in the parent before the fork
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(clone[6]["heatmaps"], first["heatmaps"])
    loader = torch.utils.data.DataLoader(cache, batch_size=None, num_workers=2,
                                         multiprocessing_context="fork", sampler=[6, 0, 7, 6])
    got = [row["heatmaps"].numpy() for row in loader]
    np.testing.assert_array_equal(got[0], first["heatmaps"])
    np.testing.assert_array_equal(got[3], first["heatmaps"])
    np.testing.assert_array_equal(got[1], cache[0]["heatmaps"])


def test_reader_reads_the_codec_and_keypoint_set_a_schema_3_cache_records(tmp_path, make_cache):
    make_cache(tmp_path, n_per_shard=(2,))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    codec = UDPHeatmap((128, 96), (32, 24), sigma=3.0)
    write_manifest(tmp_path, {**manifest, "codec": codec.to_record(), "keypoint_set": "coco-17"})
    cache = open_cache(tmp_path)
    assert cache.codec == codec and cache.keypoint_set is COCO_17
    write_manifest(tmp_path, {**manifest, "keypoint_set": "halpe-26"})
    with pytest.raises(UserError, match="unknown keypoint set 'halpe-26'"):
        open_cache(tmp_path)


def test_rows_say_whether_they_have_ground_truth_and_older_caches_read_as_labelled(tmp_path, make_cache):
    (_, _, _, columns), = make_cache(tmp_path, n_per_shard=(6,))
    cache = open_cache(tmp_path)
    assert [cache[i]["labelled"] for i in range(6)] == columns["labelled"].tolist()
    assert [cache[i]["box_score"] for i in range(6)] == pytest.approx(columns["box_score"].tolist())
    assert not all(columns["labelled"]) and any(columns["labelled"])  # the test sees both kinds
    with h5py.File(tmp_path / "shard-00000.h5", "a") as f:  # a schema 3 shard has neither column
        del f["labelled"], f["box_score"]
    old = open_cache(tmp_path)
    assert all(old[i]["labelled"] is True and old[i]["box_score"] == 1.0 for i in range(6))
