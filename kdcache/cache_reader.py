"""Random access to a cache's rows: the reader behind `kdcache.cache.open_cache`.

The layout it reads is the contract in `kdcache.cache_format`; this module only makes reading it fast and
safe in DataLoader workers: each shard is indexed once with h5py, then every row is `os.pread` + inflate.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from kdcache import cache_format as fmt
from kdcache.codec import Codec
from kdcache.images import ImageMemo
from kdcache.errors import UserError
from kdcache.heatmap_storage import heatmap_storage, inflate_row
from kdcache.keypoints import KeypointSet
from kdcache.transforms import warp_crop


@dataclass
class _ShardIndex:
    """Where each column of one shard lies in its file, read once with h5py; rows are then `pread`."""

    columns: dict[str, tuple[int, np.dtype, tuple[int, ...]]]  # contiguous: (offset, dtype, row shape)
    chunk_offset: np.ndarray   # int64 [N] file offset of each row's heatmap chunk
    chunk_size: np.ndarray     # int64 [N] its stored size
    heat_dtype: np.dtype
    heat_shape: tuple[int, ...]
    heat_filters: tuple[bool, bool]  # (shuffle, deflate)
    crop_offset: np.ndarray | None   # int64 [N + 1] into the `crop` column (schema 2)


def _index_shard(path: Path) -> _ShardIndex:
    with h5py.File(path, "r") as f:
        columns = {}
        for name, ds in f.items():
            if ds.chunks is None and ds.dtype.kind in "biuf" and ds.id.get_offset() is not None:
                columns[name] = (ds.id.get_offset(), ds.dtype, ds.shape[1:])
        heat = f["heatmaps"]
        n = heat.shape[0]
        chunk_offset = np.zeros(n, np.int64)
        chunk_size = np.zeros(n, np.int64)
        if heat.chunks is not None:
            def visit(info: Any) -> None:
                chunk_offset[info.chunk_offset[0]] = info.byte_offset
                chunk_size[info.chunk_offset[0]] = info.size
            try:
                heat.id.chunk_iter(visit)  # one pass over the chunk index (HDF5 >= 1.14)
            except (AttributeError, NotImplementedError, RuntimeError):
                for i in range(heat.id.get_num_chunks()):
                    visit(heat.id.get_chunk_info(i))
        else:  # contiguous (an empty shard): read like any column
            columns["heatmaps"] = (heat.id.get_offset() or 0, heat.dtype, heat.shape[1:])
        filters = (bool(heat.shuffle), heat.compression == "gzip")
        if heat.compression not in (None, "gzip") or heat.scaleoffset is not None or heat.fletcher32:
            raise UserError(f"{path}: heatmaps use HDF5 filters kdcache does not write; dump the cache again")
        crop_offset = f["crop_offset"][:] if "crop_offset" in f else None
        return _ShardIndex(columns, chunk_offset, chunk_size, heat.dtype, heat.shape[1:], filters, crop_offset)


class Cache:
    """Read-only view of a cache folder; safe to use from DataLoader worker processes.

    Each shard is indexed once per process with h5py (where every column and heatmap chunk lies); a row
    is then a few `os.pread` calls, inflate and decode, with no HDF5 call. File descriptors are opened
    lazily (at most MAX_OPEN at a time) and never shared across a fork. Replaying crops (crop encoding
    "none"), each image's size and SHA-256 are checked against the dump's, once per image and process.
    """

    MAX_OPEN = 64

    def __init__(self, path: Path, allow_incomplete: bool = False, images: Path | None = None):
        """
        Args:
            images: image folder for crop replay when the cache stores no crops (default: the dump's).
        """
        self.path = Path(path)
        manifest = fmt.read_manifest(self.path)
        if manifest is None:
            raise UserError(f"{self.path} is not a kdcache cache (no {fmt.MANIFEST}); "
                            "make one with `kdcache dump-teacher --out DIR`")
        version = manifest.get("schema_version")
        if version not in fmt.READABLE_SCHEMAS:
            readable = ", ".join(map(str, fmt.READABLE_SCHEMAS))
            raise UserError(f"cache {self.path} has schema version {version}, this kdcache reads versions "
                            f"{readable}; dump the teacher again with this version")
        if not manifest.get("complete") and not allow_incomplete:
            done = len(manifest.get("shards", []))
            raise UserError(f"cache {self.path} is incomplete ({done} of {manifest.get('num_shards')} shards); "
                            "re-run the same `kdcache dump-teacher` command to finish it")
        self.manifest = manifest
        self.schema_version = version
        self.storage = heatmap_storage(manifest["heatmap_encoding"])
        self.crop_format = fmt.parse_crop_format(manifest["crop_encoding"])[0]
        self.codec: Codec = fmt.manifest_codec(manifest)  # what made the targets
        self.keypoint_set: KeypointSet = fmt.manifest_keypoint_set(manifest)
        self.images = Path(images if images is not None else manifest.get("dump", {}).get("images", "."))
        self.shards = sorted(manifest["shards"], key=lambda s: s["index"])
        counts = np.array([s["rows"] for s in self.shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._index: dict[int, _ShardIndex] = {}
        self._same_image: set[tuple[str, bytes]] = set()  # (file, SHA-256) checked: once per image and process
        self._reset_handles()

    def _reset_handles(self) -> None:
        self._fds: dict[int, int] = {}
        self._h5: dict[int, h5py.File] = {}
        self._images = ImageMemo(self.images)  # crop replay ("none" crop encoding)
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def input_hw(self) -> tuple[int, int]:
        return tuple(self.manifest["input_hw"])

    @property
    def heatmap_hw(self) -> tuple[int, int]:
        return tuple(self.manifest["heatmap_hw"])

    def _shard_path(self, shard: int) -> Path:
        path = self.path / self.shards[shard]["name"]
        if not path.exists():
            raise UserError(f"cache shard {path} is missing; run `kdcache inspect {self.path} --verify`")
        return path

    def _fd(self, shard: int) -> int:
        if os.getpid() != self._pid:  # forked into a worker: the parent's handles are not ours
            self._reset_handles()
        fd = self._fds.pop(shard, None)
        if fd is None:
            if len(self._fds) >= self.MAX_OPEN:  # close the least recently used shard
                oldest = next(iter(self._fds))
                os.close(self._fds.pop(oldest))
                if oldest in self._h5:
                    self._h5.pop(oldest).close()
            fd = os.open(self._shard_path(shard), os.O_RDONLY)
        self._fds[shard] = fd  # most recently used last
        return fd

    def _h5file(self, shard: int) -> h5py.File:
        """h5py handle for the columns pread cannot serve (vlen crops of schema 1, image_file)."""
        self._fd(shard)  # also resets handles after a fork
        f = self._h5.get(shard)
        if f is None:
            f = self._h5[shard] = h5py.File(self._shard_path(shard), "r")
        return f

    def _shard_index(self, shard: int) -> _ShardIndex:
        index = self._index.get(shard)
        if index is None:
            try:
                index = self._index[shard] = _index_shard(self._shard_path(shard))
            except OSError as exc:
                raise UserError(f"cache shard {self._shard_path(shard)} is unreadable ({exc}); "
                                f"run `kdcache inspect {self.path} --verify`") from None
        return index

    def locate(self, index: int) -> tuple[int, int]:
        """Global row index -> (shard position, row within shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for a cache of {len(self)} views")
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        return shard, index - int(self._starts[shard])

    def _column(self, shard: int, index: _ShardIndex, name: str, row: int) -> np.ndarray:
        offset, dtype, shape = index.columns[name]
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = os.pread(self._fd(shard), size, offset + row * size)
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def _heatmaps(self, shard: int, index: _ShardIndex, row: int) -> np.ndarray:
        raw = os.pread(self._fd(shard), int(index.chunk_size[row]), int(index.chunk_offset[row]))
        stored = inflate_row(raw, index.heat_dtype, index.heat_shape, *index.heat_filters)
        side = self._column(shard, index, self.storage.side, row) if self.storage.side else None
        return self.storage.decode(stored, side)

    def _crop(self, shard: int, index: _ShardIndex, row: int, affine: np.ndarray) -> np.ndarray:
        if self.crop_format == "none":
            return self._replay_crop(shard, index, row, affine)
        if index.crop_offset is None:  # schema 1: vlen uint8 per row
            return fmt.decode_crop(self._h5file(shard)["crop"][row])
        start, stop = int(index.crop_offset[row]), int(index.crop_offset[row + 1])
        return fmt.decode_crop(os.pread(self._fd(shard), stop - start, index.columns["crop"][0] + start))

    def _replay_crop(self, shard: int, index: _ShardIndex, row: int, affine: np.ndarray) -> np.ndarray:
        name = self._h5file(shard)["image_file"][row].decode()
        image = self._images(name)  # a missing or undecodable file: UserError naming it
        if all(column.name in index.columns for column in fmt.REPLAY_COLUMNS):  # older caches: unchecked
            self._check_image(name, image.shape[:2], self._column(shard, index, "image_hw", row),
                              self._column(shard, index, "image_sha256", row).tobytes())
        return warp_crop(image, affine, self.input_hw)

    def _check_image(self, name: str, image_hw: tuple[int, int], dumped_hw: np.ndarray, dumped_sha: bytes) -> None:
        """Refuse to replay a crop from an image that is not the one the teacher saw (a silent wrong target)."""
        if (name, dumped_sha) in self._same_image:
            return
        path = self.images / name
        if tuple(image_hw) != tuple(int(v) for v in dumped_hw):
            change = (f"it is {image_hw[0]}x{image_hw[1]} (HxW) pixels, the cache's was "
                      f"{dumped_hw[0]}x{dumped_hw[1]}")
        elif (digest := fmt.sha256_file(path)) != dumped_sha.hex():
            change = f"same size, other content: SHA-256 {digest[:12]}..., the cache's {dumped_sha.hex()[:12]}..."
        else:
            self._same_image.add((name, dumped_sha))
            return
        raise UserError(f"image {path} has changed since cache {self.path} was dumped ({change}); restore the "
                        "images the cache was dumped from, or dump the teacher again from these")

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One view: crop [H,W,3] uint8 RGB, heatmaps [K,h,w] float32, confidence [K] (schema 2), affine [2,3],
        flip, image_id, ann_id, view, keypoints [K,3], labelled (the person has ground truth), box_score."""
        shard, row = self.locate(int(index))
        ix = self._shard_index(shard)
        meta = {c.name: self._column(shard, ix, c.name, row) for c in fmt.ROW_COLUMNS if c.name in ix.columns}
        out = {
            "crop": self._crop(shard, ix, row, meta["affine"]),
            "heatmaps": self._heatmaps(shard, ix, row),
            "affine": meta["affine"].copy(),
            "flip": bool(meta["flip"]),
            "image_id": int(meta["image_id"]),
            "ann_id": int(meta["ann_id"]),
            "view": int(meta["view"]),
            "keypoints": meta["keypoints"].copy(),
        }
        if "confidence" in meta:
            out["confidence"] = meta["confidence"].copy()
        for name, default in fmt.COLUMN_DEFAULTS.items():  # schema 4: rows without ground truth, box scores
            value = meta.get(name, default)
            out[name] = bool(value) if value.dtype == np.bool_ else float(value)
        return out

    def attrs(self, shard: int = 0) -> dict[str, Any]:
        """A shard's attributes, JSON values decoded."""
        out = {}
        with h5py.File(self._shard_path(shard), "r") as f:
            for key, value in f.attrs.items():
                if isinstance(value, str) and value[:1] in "[{":
                    value = json.loads(value)
                out[key] = value
        return out

    def close(self) -> None:
        if os.getpid() == self._pid:
            for fd in self._fds.values():
                os.close(fd)
            for f in self._h5.values():
                f.close()
        self._reset_handles()

    def __getstate__(self) -> dict[str, Any]:  # pickled into workers without open handles
        state = self.__dict__.copy()
        state.update(_fds={}, _h5={}, _images=ImageMemo(self.images), _pid=-1)
        return state
