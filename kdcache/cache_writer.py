"""Writing a cache (the contract is `kdcache.cache_format`): shards and the manifest, crash-safely.

A shard is written as `NAME.tmp` and renamed when complete, and the manifest is updated under a file lock
and replaced atomically, so a killed dump leaves only complete shards listed, and concurrent ranks never
lose each other's entries. A write that fails (a full disk) removes its temporary file and raises the
OSError with the file's name; what was complete before stays listed and intact. `ShardWriter` is the dump's
writer: it encodes heatmaps and writes shards on background threads while the teacher runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np

from kdcache.cache_format import LOCK, MANIFEST, REPLAY_COLUMNS, ROW_COLUMNS, read_manifest, sha256_file, shard_name
from kdcache.heatmap_storage import HeatmapStorage, encode_rows


@dataclass
class ShardRows:
    """One shard's rows as they arrive, batch by batch; `write_shard` turns them into datasets.

    Attributes:
        heatmap_shape: (K, h, w) of every row's heatmaps.
        storage: how the heatmap chunks were encoded.
        replay: crop format "none": rows name their image (and its identity) instead of holding a crop.
    """

    heatmap_shape: tuple[int, int, int]
    storage: HeatmapStorage
    replay: bool
    chunks: list[bytes] = field(default_factory=list)          # one deflated heatmap chunk per row
    side: list[np.ndarray] = field(default_factory=list)       # the storage's side arrays, per batch
    columns: dict[str, list[np.ndarray]] = field(default_factory=dict)  # ROW/REPLAY_COLUMNS arrays, per batch
    crops: list[np.ndarray] = field(default_factory=list)      # encoded crop bytes, per row
    image_files: list[str] = field(default_factory=list)       # per row (replay)
    skipped_images: list[str] = field(default_factory=list)    # files whose views are missing from the shard

    def add(self, chunks: list[bytes], side: np.ndarray | None, columns: dict[str, np.ndarray],
            crops: list[np.ndarray], image_files: list[str]) -> None:
        """A batch of rows: its heatmap chunks and side array, its column arrays [n, ...], and per-row crops
        (or, replaying, image files; their REPLAY_COLUMNS come in `columns`)."""
        self.chunks.extend(chunks)
        if side is not None:
            self.side.append(side)
        for name, values in columns.items():
            self.columns.setdefault(name, []).append(values)
        self.crops.extend(crops)
        self.image_files.extend(image_files)

    def __len__(self) -> int:
        return len(self.chunks)


@contextlib.contextmanager
def _temporary(tmp: Path) -> Iterator[None]:
    """Remove `tmp` if the block fails, and name it in an OSError that does not name a file.

    A full disk (ENOSPC) or a lost permission must not leave a half-written `.tmp` behind, and the
    caller's one-line report needs the file: h5py's OSErrors carry an errno but a multi-line message.
    """
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            raise OSError(exc.errno, os.strerror(exc.errno), str(tmp)) from exc
        raise


def write_manifest(cache_dir: Path, manifest: dict[str, Any]) -> None:
    """Atomic rewrite: a kill or a failed write leaves the old manifest, or the new one, never half of one."""
    path = Path(cache_dir) / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    with _temporary(tmp):
        with open(tmp, "w") as handle:
            handle.write(json.dumps(manifest, indent=1, sort_keys=True))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)


@contextlib.contextmanager
def manifest_lock(cache_dir: Path) -> Iterator[None]:
    """Exclusive lock on the cache's manifest (flock; local disks and NFS), for concurrent ranks."""
    with open(Path(cache_dir) / LOCK, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _update_shards(cache_dir: Path, change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
                   ) -> dict[str, Any]:
    """Apply `change` to the manifest's shard list under the lock; the derived fields follow."""
    with manifest_lock(cache_dir):
        manifest = read_manifest(cache_dir)
        manifest["shards"] = sorted(change(manifest["shards"]), key=lambda s: s["index"])
        manifest["skipped_images"] = sorted({f for s in manifest["shards"] for f in s.get("skipped_images", [])})
        manifest["complete"] = len(manifest["shards"]) == manifest["num_shards"]
        write_manifest(cache_dir, manifest)
    return manifest


def add_shard(cache_dir: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Record a complete shard in the manifest (under the lock); returns the updated manifest."""
    return _update_shards(cache_dir, lambda shards: [s for s in shards if s["index"] != entry["index"]] + [entry])


def drop_shards(cache_dir: Path, indices: set[int]) -> dict[str, Any]:
    """Unlist shards (damaged ones, to be rewritten) under the lock; returns the updated manifest."""
    return _update_shards(cache_dir, lambda shards: [s for s in shards if s["index"] not in indices])


def write_shard(cache_dir: Path, index: int, rows: ShardRows, attrs: dict[str, Any], gzip_level: int) -> dict[str, Any]:
    """Write one complete shard crash-safely and return its manifest entry.

    Args:
        attrs: shard attributes; nested values are stored as JSON strings.
        gzip_level: the deflate level `rows.chunks` were compressed with (recorded in the dataset).

    Raises:
        OSError: the write failed (e.g. ENOSPC); the temporary file is gone and `filename` names it.
    """
    final = Path(cache_dir) / shard_name(index)
    tmp = final.with_name(final.name + ".tmp")
    with _temporary(tmp):
        _write_h5(tmp, rows, attrs, gzip_level)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    return {"name": final.name, "index": index, "rows": len(rows), "bytes": final.stat().st_size,
            "sha256": sha256_file(final), "skipped_images": sorted(set(rows.skipped_images))}


def _write_h5(tmp: Path, rows: ShardRows, attrs: dict[str, Any], gzip_level: int) -> None:
    """The shard's datasets (`kdcache.cache_format`) and attributes, into the file `tmp`."""
    n, shape, storage = len(rows), rows.heatmap_shape, rows.storage
    k = shape[0]
    # No timestamps in object headers: the same rows give the same bytes (bit-for-bit reruns).
    opts = {"track_times": False}
    with h5py.File(tmp, "w") as f:
        if not rows.replay:
            sizes = np.array([len(blob) for blob in rows.crops], dtype=np.int64)
            blob = np.concatenate(rows.crops).astype(np.uint8) if n else np.zeros(0, np.uint8)
            f.create_dataset("crop", data=blob, **opts)
            f.create_dataset("crop_offset", data=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), **opts)
        else:
            f.create_dataset("image_file", data=np.array(rows.image_files, dtype=object),
                             dtype=h5py.string_dtype(), **opts)
            for column in REPLAY_COLUMNS:
                f.create_dataset(column.name, data=column.stack(rows.columns.get(column.name, []), k), **opts)
        if n:
            ds = f.create_dataset("heatmaps", shape=(n, *shape), dtype=storage.dtype, chunks=(1, *shape),
                                  compression="gzip", compression_opts=gzip_level,
                                  shuffle=np.dtype(storage.dtype).itemsize > 1, **opts)
            for i, chunk in enumerate(rows.chunks):
                ds.id.write_direct_chunk((i, 0, 0, 0), chunk)
        else:  # HDF5 chunks cannot be larger than a fixed-size empty dataset
            f.create_dataset("heatmaps", shape=(n, *shape), dtype=storage.dtype, **opts)
        if storage.side:
            side = np.concatenate(rows.side) if rows.side else np.zeros(0, np.float32)
            side = np.asarray(side, dtype=np.float32).reshape(n, k, *storage.side_shape)
            f.create_dataset(storage.side, data=side, **opts)
        for column in ROW_COLUMNS:
            data = column.stack(rows.columns.get(column.name, []), k)
            if len(data) != n:  # a writer that forgot a column would make a shard no reader can trust
                raise ValueError(f"column {column.name} has {len(data)} rows, the shard {n}")
            f.create_dataset(column.name, data=data, **opts)
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value


class ShardWriter:
    """The dump's writer: heatmap encoding on a small thread pool, shard assembly and writes on one background
    thread.

    Batches arrive in order on a bounded queue (the teacher never runs more than a few batches ahead);
    each batch's quantisation and deflate starts at once on the pool (zlib and numpy release the GIL),
    so on a GPU machine one thread's ~2 ms per view does not cap the dump. An error on either is raised
    in the main thread at its next `put` or at `close`.
    """

    ENCODE_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))  # the other half: teacher and workers

    def __init__(self, out: Path, attrs: dict[str, Any], heatmap_shape: tuple[int, int, int], storage: HeatmapStorage,
                 rel_error: float, gzip_level: int, replay: bool):
        """`attrs`: every shard's HDF5 attributes (its index is added); `replay`: crops are not stored."""
        self.out, self.attrs, self.storage = out, attrs, storage
        self.rel_error, self.gzip_level = rel_error, gzip_level
        self.sigma = float(attrs["sigma"])  # the codec's: "int16-step-window"'s window is 3 sigma
        self.new_rows = lambda: ShardRows(heatmap_shape, storage, replay=replay)
        self.rows = self.new_rows()
        self.pool = ThreadPoolExecutor(self.ENCODE_THREADS, thread_name_prefix="kdcache-encode")
        self.queue: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="kdcache-shard-writer", daemon=True)
        self.thread.start()

    def put(self, shard: int, batch: dict[str, Any], heat: np.ndarray | None) -> None:
        self._raise()
        batch = {k: v for k, v in batch.items() if k != "crop"}  # the writer keeps the encoded crops only
        encoded = None if heat is None else self.pool.submit(self._encode, heat)
        self.queue.put(("batch", shard, batch, encoded))

    def end_shard(self, shard: int) -> None:
        self._raise()
        self.queue.put(("end", shard, None, None))

    def close(self) -> None:
        """Finish the queued work (shards already ended are written; a partial shard is dropped)."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        self.pool.shutdown()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _encode(self, heat: np.ndarray) -> tuple[list[bytes], np.ndarray | None, np.ndarray]:
        """heat: [B, K, h, w] float32 -> (deflated chunks, side array, confidence [B, K])."""
        chunks, side = encode_rows(heat, self.storage, self.rel_error, self.gzip_level, self.sigma)
        return chunks, side, heat.max(axis=(2, 3))

    def _loop(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain: the main thread raises the error
            try:
                self._do(*job)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self.error = exc

    def _do(self, kind: str, shard: int, batch: dict[str, Any] | None, encoded: Future | None) -> None:
        if kind == "end":
            entry = write_shard(self.out, shard, self.rows, {**self.attrs, "shard_index": shard}, self.gzip_level)
            add_shard(self.out, entry)
            self.rows = self.new_rows()
            return
        self.rows.skipped_images.extend(name for name, _ in batch["bad"])
        if encoded is None:  # every view of the batch was skipped
            return
        chunks, side, confidence = encoded.result()
        columns = {name: batch[name] for name in (c.name for c in ROW_COLUMNS + REPLAY_COLUMNS)
                   if batch.get(name) is not None}
        replay = self.rows.replay
        self.rows.add(chunks, side, {**columns, "confidence": confidence}, [] if replay else batch["crop_bytes"],
                      batch["file_name"] if replay else [])
