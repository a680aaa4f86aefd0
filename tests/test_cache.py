"""Cache contract: write -> read gives back the same values; verification finds damage."""

import json

import cv2
import numpy as np
import pytest

from kdcache import cache as cachefmt
from kdcache.errors import UserError

K, H, W = 17, 32, 24


def _rows(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):  # smooth crops, so JPEG error stays small and measurable
        small = rng.integers(0, 255, (8, 6, 3), dtype=np.uint8)
        crops.append(cv2.resize(small, (W * 4, H * 4), interpolation=cv2.INTER_LINEAR))
    heat = rng.normal(0, 0.05, (n, K, H, W)).astype(np.float32)
    heat[:, :, 10, 12] += 0.9
    q, value_range = cachefmt.quantize_heatmaps(heat)
    rows = {
        "crop": [cachefmt.encode_crop(c, 95) for c in crops], "heatmaps": q, "heatmap_range": value_range,
        "affine": rng.normal(size=(n, 2, 3)), "flip": rng.random(n) < 0.5,
        "image_id": rng.integers(0, 1000, n), "ann_id": np.arange(n) + 100, "view": np.arange(n) % 3,
        "keypoints": rng.normal(size=(n, K, 3)).astype(np.float32),
    }
    return rows, crops, heat


def _write_cache(tmp_path, n_per_shard=(5, 3)):
    manifest = {"schema_version": cachefmt.SCHEMA_VERSION, "complete": True, "shards": [],
                "num_shards": len(n_per_shard), "input_hw": [H * 4, W * 4], "heatmap_hw": [H, W]}
    written = []
    for index, n in enumerate(n_per_shard):
        rows, crops, heat = _rows(n, seed=index)
        manifest["shards"].append(cachefmt.write_shard(tmp_path, index, rows, {"schema_version": 1, "d": {"a": 1}}))
        written.append((rows, crops, heat))
    cachefmt.write_manifest(tmp_path, manifest)
    return written


def test_write_read_round_trip(tmp_path):
    written = _write_cache(tmp_path)
    cache = cachefmt.open_cache(tmp_path)
    assert len(cache) == 8
    for shard, (rows, crops, heat) in enumerate(written):
        for row in range(len(rows["view"])):
            got = cache[shard * 5 + row]
            np.testing.assert_array_equal(got["affine"], rows["affine"][row])
            np.testing.assert_array_equal(got["keypoints"], rows["keypoints"][row])
            assert got["flip"] == bool(rows["flip"][row])
            assert got["ann_id"] == rows["ann_id"][row] and got["view"] == rows["view"][row]
            assert got["image_id"] == rows["image_id"][row]
            assert got["crop"].shape == (H * 4, W * 4, 3) and got["crop"].dtype == np.uint8
            assert np.abs(got["crop"].astype(int) - crops[row]).mean() < 2.0  # JPEG q95 on a smooth crop
            # uint8 per-joint quantisation: error at most half a step of the joint's range
            step = (heat[row].max(axis=(1, 2)) - heat[row].min(axis=(1, 2))) / 255.0
            err = np.abs(got["heatmaps"] - heat[row]).max(axis=(1, 2))
            assert np.all(err <= step * 0.5 + 1e-6)
    assert cache.attrs(1)["d"] == {"a": 1}


def test_no_temporary_files_left(tmp_path):
    _write_cache(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "shard-00000.h5", "shard-00001.h5"]


def test_verify_finds_corrupt_and_missing_shards(tmp_path):
    _write_cache(tmp_path)
    assert cachefmt.verify_cache(tmp_path) == []
    shard = tmp_path / "shard-00001.h5"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncate
    problems = cachefmt.verify_cache(tmp_path)
    assert len(problems) == 1 and "shard-00001.h5" in problems[0]
    (tmp_path / "shard-00000.h5").unlink()
    assert any("shard-00000.h5: missing" in p for p in cachefmt.verify_cache(tmp_path))


def test_incomplete_and_foreign_caches_are_refused(tmp_path):
    _write_cache(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["complete"] = False
    cachefmt.write_manifest(tmp_path, manifest)
    with pytest.raises(UserError, match="incomplete"):
        cachefmt.open_cache(tmp_path)
    manifest["complete"], manifest["schema_version"] = True, 999
    cachefmt.write_manifest(tmp_path, manifest)
    with pytest.raises(UserError, match="schema version 999"):
        cachefmt.open_cache(tmp_path)
    with pytest.raises(UserError, match="not a kdcache cache"):
        cachefmt.open_cache(tmp_path / "nowhere")


def test_reader_survives_pickling_into_workers(tmp_path):
    import pickle

    _write_cache(tmp_path)
    cache = cachefmt.open_cache(tmp_path)
    first = cache[6]["keypoints"]
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(clone[6]["keypoints"], first)
