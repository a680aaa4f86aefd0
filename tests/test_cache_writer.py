"""Cache writer: shards and manifest written crash-safely, concurrent ranks never lose entries, a failed
write leaves no temporary file and names it."""

import errno
import multiprocessing
import os

import pytest

from kdcache.cache import verify_cache
from kdcache.cache_format import LOCK, read_manifest, shard_name
from kdcache.cache_writer import add_shard, drop_shards, write_manifest, write_shard
import kdcache.cache_writer as writer_mod


def test_no_temporary_files_left(tmp_path, make_cache):
    make_cache(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LOCK, "manifest.json",
                                                                 "shard-00000.h5", "shard-00001.h5"])


def _add_entries(args):
    path, indices = args
    for i in indices:
        add_shard(path, {"name": shard_name(i), "index": i, "rows": 1, "sha256": "-",
                         "skipped_images": [f"img{i % 3}.jpg"] if i % 4 == 0 else []})


def test_concurrent_ranks_never_lose_manifest_entries(tmp_path):
    """Several processes recording shards at once (as torchrun ranks do) keep every entry."""
    write_manifest(tmp_path, {"num_shards": 40, "shards": [], "complete": False})
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_add_entries, [(tmp_path, range(r, 40, 4)) for r in range(4)])
    manifest = read_manifest(tmp_path)
    assert [s["index"] for s in manifest["shards"]] == list(range(40))
    assert manifest["complete"] and manifest["skipped_images"] == ["img0.jpg", "img1.jpg", "img2.jpg"]


def test_failed_writes_leave_no_temporary_file_and_name_it(tmp_path, monkeypatch, make_cache, make_rows):
    """A full disk mid-shard (h5py's OSError: errno 28, a multi-line message) or mid-manifest: the .tmp goes,
    the complete shard and the old manifest stay, and the error is one clean line naming the file."""
    make_cache(tmp_path, n_per_shard=(5,))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    rows = make_rows(3, seed=1)[0]

    def full_disk(tmp, *args):
        tmp.write_bytes(b"half a shard")
        raise OSError(errno.ENOSPC, "Can't write data (file write failed: time = ...\n, errno = 28, ...)")

    monkeypatch.setattr(writer_mod, "_write_h5", full_disk)
    with pytest.raises(OSError) as info:
        write_shard(tmp_path, 1, rows, {}, 2)
    assert str(info.value) == f"[Errno 28] No space left on device: '{tmp_path / 'shard-00001.h5.tmp'}'"
    monkeypatch.undo()

    def no_room(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_room)
    with pytest.raises(OSError) as info:
        add_shard(tmp_path, {"name": "shard-00001.h5", "index": 1, "rows": 3, "sha256": "-"})
    assert info.value.filename == str(tmp_path / "manifest.json.tmp")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert verify_cache(tmp_path) == []


def test_drop_shards_unlists_and_reopens_the_cache(tmp_path, make_cache):
    make_cache(tmp_path, n_per_shard=(2, 2, 2))
    manifest = read_manifest(tmp_path)
    assert manifest["complete"]
    manifest["shards"][1]["skipped_images"] = ["gone.jpg"]
    manifest["skipped_images"] = ["gone.jpg"]
    write_manifest(tmp_path, manifest)
    manifest = drop_shards(tmp_path, {1})
    assert [s["index"] for s in manifest["shards"]] == [0, 2] and not manifest["complete"]
    assert manifest["skipped_images"] == [] and read_manifest(tmp_path) == manifest


def test_an_empty_shard_has_every_dataset_with_zero_rows(tmp_path, make_rows):
    """A shard whose views were all skipped (bad images) still has every column, typed and shaped."""
    import h5py

    from kdcache.cache_format import ROW_COLUMNS
    from kdcache.cache_writer import ShardRows

    full = make_rows(1)[0]
    entry = write_shard(tmp_path, 0, ShardRows(full.heatmap_shape, full.storage, replay=False), {}, 2)
    assert entry["rows"] == 0
    with h5py.File(tmp_path / entry["name"], "r") as f:
        for column in ROW_COLUMNS:
            assert f[column.name].shape == (0, *column.row_shape(17)) and f[column.name].dtype == column.dtype
        assert f["heatmaps"].shape == (0, *full.heatmap_shape)
