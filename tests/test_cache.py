"""Cache contract: write -> read gives back the same values (within each encoding's error), the README's
h5py-only recipe reads the same thing, verification finds damage, older schemas are read or refused."""

import json
import multiprocessing

import cv2
import h5py
import numpy as np
import pytest

from kdcache import cache as cachefmt
from kdcache.errors import UserError

K, H, W = 17, 32, 24


def _teacher_like(n: int, rng: np.random.Generator) -> np.ndarray:
    """[n, K, H, W] float32: a Gaussian peak per joint on a noisy background, like a trained teacher's."""
    ys, xs = np.mgrid[0:H, 0:W]
    heat = rng.normal(0, 0.01, (n, K, H, W))
    cy, cx = rng.uniform(3, H - 3, (n, K)), rng.uniform(3, W - 3, (n, K))
    peak = rng.uniform(0.2, 0.9, (n, K))
    heat += peak[..., None, None] * np.exp(-((ys - cy[..., None, None]) ** 2 + (xs - cx[..., None, None]) ** 2) / 8)
    heat[:, 3] = 0.0  # an all-zero map must survive every encoding
    return heat.astype(np.float32)


def _rows(n: int, seed: int = 0, encoding: str = "int16-step", crop: str = "jpeg95") -> tuple[dict, list, np.ndarray]:
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):  # smooth crops, so JPEG error stays small and measurable
        small = rng.integers(0, 255, (8, 6, 3), dtype=np.uint8)
        crops.append(cv2.resize(small, (W * 4, H * 4), interpolation=cv2.INTER_LINEAR))
    heat = _teacher_like(n, rng)
    chunks, side = cachefmt.encode_heatmap_rows(heat, encoding, 0.008)
    rows = {
        "crop": [cachefmt.encode_crop(c, crop) for c in crops], "heatmaps": chunks,
        "confidence": heat.max(axis=(2, 3)), "affine": rng.normal(size=(n, 2, 3)), "flip": rng.random(n) < 0.5,
        "image_id": rng.integers(0, 1000, n), "ann_id": np.arange(n) + 100, "view": np.arange(n) % 3,
        "keypoints": rng.normal(size=(n, K, 3)).astype(np.float32),
    }
    if side is not None:
        rows[cachefmt.heatmap_encoding(encoding).side] = side
    return rows, crops, heat


def _write_cache(path, n_per_shard=(5, 3), encoding="int16-step", crop="jpeg95"):
    path.mkdir(exist_ok=True)
    manifest = {"schema_version": cachefmt.SCHEMA_VERSION, "complete": False, "shards": [],
                "num_shards": len(n_per_shard), "input_hw": [H * 4, W * 4], "heatmap_hw": [H, W], "sigma": 2.0,
                "heatmap_encoding": encoding, "crop_encoding": crop}
    cachefmt.write_manifest(path, manifest)
    written = []
    for index, n in enumerate(n_per_shard):
        rows, crops, heat = _rows(n, seed=index, encoding=encoding, crop=crop)
        entry = cachefmt.write_shard(path, index, rows, {"schema_version": 2, "d": {"a": 1}}, (K, H, W), encoding)
        cachefmt.add_shard(path, entry)
        written.append((rows, crops, heat))
    return written


def _rel_l2(a, b, axis=None):
    return np.linalg.norm(a - b, axis=axis) / np.linalg.norm(b, axis=axis)


@pytest.mark.parametrize("encoding", list(cachefmt.HEATMAP_ENCODINGS))
def test_write_read_round_trip(tmp_path, encoding):
    written = _write_cache(tmp_path, encoding=encoding)
    cache = cachefmt.open_cache(tmp_path)
    assert len(cache) == 8
    for shard, (rows, crops, heat) in enumerate(written):
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
            if encoding == "int16-step":  # the error budget is met, and used (not spent on needless bits)
                assert 0.006 < rel < 0.009
            elif encoding == "float16":
                assert rel < 1e-3
            else:  # uint8: at most half a step of each joint's range
                step = (heat[row].max(axis=(1, 2)) - heat[row].min(axis=(1, 2))) / 255.0
                assert np.all(np.abs(got["heatmaps"] - heat[row]).max(axis=(1, 2)) <= step * 0.5 + 1e-6)
    assert cache.attrs(1)["d"] == {"a": 1}


def test_int16_step_error_is_the_budget_per_joint():
    rng = np.random.default_rng(3)
    heat = _teacher_like(64, rng)
    chunks, step = cachefmt.encode_heatmap_rows(heat, "int16-step", 0.005)
    import zlib
    stored = np.stack([cachefmt.unshuffle_bytes(zlib.decompress(c), 2).view(np.uint16).reshape(K, H, W)
                       for c in chunks])
    back = cachefmt.HEATMAP_ENCODINGS["int16-step"].decode(stored, step)
    live = np.ones(K, bool)
    live[3] = False  # the all-zero map
    rel = _rel_l2(back[:, live].reshape(64, K - 1, -1), heat[:, live].reshape(64, K - 1, -1), axis=-1)
    assert np.all(rel < 0.005 * 1.2) and np.median(rel) > 0.005 * 0.8
    assert not back[:, 3].any()


def test_png_crops_are_lossless(tmp_path):
    written = _write_cache(tmp_path, n_per_shard=(3,), crop="png")
    cache = cachefmt.open_cache(tmp_path)
    for row, crop in enumerate(written[0][1]):
        np.testing.assert_array_equal(cache[row]["crop"], crop)


def test_readme_recipe_reads_the_same_with_h5py_alone(tmp_path):
    """README "Cache format": a reader with h5py, numpy and cv2 only, no kdcache."""
    _write_cache(tmp_path, n_per_shard=(4,))
    cache = cachefmt.open_cache(tmp_path)
    with h5py.File(tmp_path / "shard-00000.h5", "r") as f:
        i = 2
        o = f["crop_offset"]
        crop = cv2.cvtColor(cv2.imdecode(f["crop"][o[i]:o[i + 1]], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        z = f["heatmaps"][i].astype(np.int32)
        heatmaps = ((z >> 1) ^ -(z & 1)) * f["heatmap_step"][i][:, None, None]
        np.testing.assert_array_equal(crop, cache[i]["crop"])
        np.testing.assert_array_equal(heatmaps.astype(np.float32), cache[i]["heatmaps"])


def test_no_temporary_files_left(tmp_path):
    _write_cache(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cachefmt.LOCK, "manifest.json",
                                                                 "shard-00000.h5", "shard-00001.h5"])


def test_verify_names_truncated_corrupt_and_missing_shards(tmp_path):
    _write_cache(tmp_path, n_per_shard=(5, 3, 2))
    assert cachefmt.verify_cache(tmp_path) == []
    shard = tmp_path / "shard-00001.h5"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncate
    data = bytearray((tmp_path / "shard-00002.h5").read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    (tmp_path / "shard-00002.h5").write_bytes(bytes(data))
    problems = cachefmt.verify_cache(tmp_path)
    assert len(problems) == 2
    assert "shard-00001.h5" in problems[0] and "truncated" in problems[0]
    assert "shard-00002.h5" in problems[1] and "checksum" in problems[1]
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


def test_schema_1_cache_is_still_read(tmp_path):
    """kdcache 0.1 wrote vlen JPEG crops and uint8 min/max heatmaps with no confidence."""
    rng = np.random.default_rng(0)
    heat = _teacher_like(3, rng)
    stored, value_range = cachefmt._encode_minmax(heat, 0.0)
    crop = cv2.resize(rng.integers(0, 255, (8, 6, 3), dtype=np.uint8), (W * 4, H * 4))
    with h5py.File(tmp_path / "shard-00000.h5", "w") as f:
        crops = f.create_dataset("crop", (3,), dtype=h5py.vlen_dtype(np.uint8))
        for i in range(3):
            crops[i] = cachefmt.encode_crop(crop, "jpeg95")
        f.create_dataset("heatmaps", data=stored, chunks=(1, K, H, W), compression="gzip")
        f.create_dataset("heatmap_range", data=value_range)
        f.create_dataset("affine", data=np.zeros((3, 2, 3)))
        f.create_dataset("flip", data=np.zeros(3, bool))
        for name in ("image_id", "ann_id"):
            f.create_dataset(name, data=np.arange(3, dtype=np.int64))
        f.create_dataset("view", data=np.arange(3, dtype=np.int32))
        f.create_dataset("keypoints", data=np.zeros((3, K, 3), np.float32))
    cachefmt.write_manifest(tmp_path, {
        "schema_version": 1, "complete": True, "num_shards": 1, "input_hw": [H * 4, W * 4], "heatmap_hw": [H, W],
        "crop_encoding": "jpeg95", "heatmap_encoding": "uint8-minmax-per-joint",
        "shards": [{"name": "shard-00000.h5", "index": 0, "rows": 3, "sha256": "-"}]})
    cache = cachefmt.open_cache(tmp_path)
    row = cache[2]
    assert row["view"] == 2 and "confidence" not in row and row["crop"].shape == (H * 4, W * 4, 3)
    assert _rel_l2(row["heatmaps"], heat[2]) < 0.03


def test_reader_survives_pickling_and_dataloader_workers(tmp_path):
    import pickle

    import torch

    _write_cache(tmp_path)
    cache = cachefmt.open_cache(tmp_path)
    first = cache[6]  # handles opened in the parent before the fork
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(clone[6]["heatmaps"], first["heatmaps"])
    loader = torch.utils.data.DataLoader(cache, batch_size=None, num_workers=2,
                                         multiprocessing_context="fork", sampler=[6, 0, 7, 6])
    got = [row["heatmaps"].numpy() for row in loader]
    np.testing.assert_array_equal(got[0], first["heatmaps"])
    np.testing.assert_array_equal(got[3], first["heatmaps"])
    np.testing.assert_array_equal(got[1], cache[0]["heatmaps"])


def _add_entries(args):
    path, indices = args
    for i in indices:
        cachefmt.add_shard(path, {"name": cachefmt.shard_name(i), "index": i, "rows": 1, "sha256": "-",
                                  "skipped_images": [f"img{i % 3}.jpg"] if i % 4 == 0 else []})


def test_concurrent_ranks_never_lose_manifest_entries(tmp_path):
    """Several processes recording shards at once (as torchrun ranks do) keep every entry."""
    cachefmt.write_manifest(tmp_path, {"num_shards": 40, "shards": [], "complete": False})
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_add_entries, [(tmp_path, range(r, 40, 4)) for r in range(4)])
    manifest = cachefmt.read_manifest(tmp_path)
    assert [s["index"] for s in manifest["shards"]] == list(range(40))
    assert manifest["complete"] and manifest["skipped_images"] == ["img0.jpg", "img1.jpg", "img2.jpg"]


def test_check_compatible_names_each_mismatch():
    manifest = {"input_hw": [256, 192], "heatmap_hw": [64, 48], "sigma": 2.0}
    assert cachefmt.check_compatible(manifest, (256, 192), (64, 48), 2.0) == []
    problems = cachefmt.check_compatible(manifest, (128, 96), (32, 24), 3.0)
    assert [p.split()[0] for p in problems] == ["input_hw", "heatmap_hw", "sigma"]


def test_failed_writes_leave_no_temporary_file_and_name_it(tmp_path, monkeypatch):
    """A full disk mid-shard (h5py's OSError: errno 28, a multi-line message) or mid-manifest: the .tmp goes,
    the complete shard and the old manifest stay, and the error is one clean line naming the file."""
    import errno
    import os

    _write_cache(tmp_path, n_per_shard=(5,))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    rows, _, _ = _rows(3, seed=1)

    def full_disk(tmp, *args):
        tmp.write_bytes(b"half a shard")
        raise OSError(errno.ENOSPC, "Can't write data (file write failed: time = ...\n, errno = 28, ...)")

    monkeypatch.setattr(cachefmt, "_write_h5", full_disk)
    with pytest.raises(OSError) as info:
        cachefmt.write_shard(tmp_path, 1, rows, {}, (K, H, W))
    assert str(info.value) == f"[Errno 28] No space left on device: '{tmp_path / 'shard-00001.h5.tmp'}'"
    monkeypatch.undo()

    def no_room(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_room)
    with pytest.raises(OSError) as info:
        cachefmt.add_shard(tmp_path, {"name": "shard-00001.h5", "index": 1, "rows": 3, "sha256": "-"})
    assert info.value.filename == str(tmp_path / "manifest.json.tmp")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert cachefmt.verify_cache(tmp_path) == []


def test_drop_shards_unlists_and_reopens_the_cache(tmp_path):
    _write_cache(tmp_path, n_per_shard=(2, 2, 2))
    manifest = cachefmt.read_manifest(tmp_path)
    manifest["shards"][1]["skipped_images"] = ["gone.jpg"]
    manifest["skipped_images"] = ["gone.jpg"]
    cachefmt.write_manifest(tmp_path, manifest)
    manifest = cachefmt.drop_shards(tmp_path, {1})
    assert [s["index"] for s in manifest["shards"]] == [0, 2] and not manifest["complete"]
    assert manifest["skipped_images"] == [] and cachefmt.read_manifest(tmp_path) == manifest


def test_contract_and_reader_import_without_torch():
    """README: h5py, numpy and OpenCV alone read a cache; kdcache's reader must not pull in torch either."""
    import subprocess
    import sys

    code = "import sys, kdcache.cache, kdcache.cache_reader; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
