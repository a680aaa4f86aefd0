"""The cache contract: folder layout, dataset names, dtypes, encodings, attributes, reading and writing.

A cache is a folder:

    manifest.json        schema version, dump configuration, teacher identity, and the list of
                         complete shards with their row counts and SHA-256
    shard-00000.h5       rows [0, shard_size) of the dump order, shard-00001.h5 the next, ...

Each row is one view (one person instance under one sampled augmentation). Datasets of a shard,
N rows, K keypoints, heatmap h x w (see README "Cache format" for reading it with h5py alone):

    crop            vlen uint8 [N]          the crop the teacher saw, JPEG-encoded (RGB decoded)
    heatmaps        uint8 [N, K, h, w]      teacher heatmaps, quantised per joint between heatmap_range
    heatmap_range   float32 [N, K, 2]       (lo, hi): value = lo + q / 255 * (hi - lo)
    affine          float64 [N, 2, 3]       original image -> crop, mirror included
    flip            bool [N]                the view is mirrored (keypoint pairs swapped)
    image_id, ann_id  int64 [N]             COCO ids
    view            int32 [N]               view index; 0 = un-augmented
    keypoints       float32 [N, K, 3]       ground truth in crop pixels: x, y, COCO visibility

A shard is written as `NAME.tmp` and renamed when complete; the manifest is rewritten atomically
after each shard, so a killed dump leaves only complete shards behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np

from kdcache.checkpoint import sha256_file
from kdcache.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CROP_ENCODING = "jpeg"
HEATMAP_ENCODING = "uint8-minmax-per-joint"
DEFAULT_JPEG_QUALITY = 95
COLUMNS = ("crop", "heatmaps", "heatmap_range", "affine", "flip", "image_id", "ann_id", "view", "keypoints")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


# ---- encodings -------------------------------------------------------------------------------

def encode_crop(crop: np.ndarray, quality: int = DEFAULT_JPEG_QUALITY) -> np.ndarray:
    """crop: [H, W, 3] uint8 RGB -> JPEG bytes as a uint8 vector."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding of a crop failed")
    return buf.reshape(-1)


def decode_crop(data: np.ndarray) -> np.ndarray:
    """JPEG bytes -> [H, W, 3] uint8 RGB."""
    bgr = cv2.imdecode(np.asarray(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def quantize_heatmaps(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """heatmaps: [N, K, h, w] float32 teacher output -> (q uint8 [N, K, h, w], range float32 [N, K, 2])."""
    lo = heatmaps.min(axis=(2, 3))
    hi = heatmaps.max(axis=(2, 3))
    span = np.maximum(hi - lo, 1e-12)[..., None, None]
    q = np.rint((heatmaps - lo[..., None, None]) / span * 255.0)
    return q.astype(np.uint8), np.stack([lo, hi], axis=-1).astype(np.float32)


def dequantize_heatmaps(q: np.ndarray, value_range: np.ndarray) -> np.ndarray:
    """Inverse of quantize_heatmaps: q [..., K, h, w] uint8, range [..., K, 2] -> float32."""
    lo = value_range[..., 0, None, None]
    hi = value_range[..., 1, None, None]
    return (lo + q.astype(np.float32) * ((hi - lo) / 255.0)).astype(np.float32)


# ---- manifest --------------------------------------------------------------------------------

def read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON; the cache is damaged, dump it again into a new --out") from None


def write_manifest(cache_dir: Path, manifest: dict[str, Any]) -> None:
    """Atomic rewrite: a kill leaves either the old or the new manifest, never half of one."""
    path = Path(cache_dir) / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# ---- writing ---------------------------------------------------------------------------------

def write_shard(cache_dir: Path, index: int, rows: dict[str, Any], attrs: dict[str, Any]) -> dict[str, Any]:
    """Write one complete shard crash-safely and return its manifest entry.

    Args:
        rows: one array (or list, for `crop`) per name in COLUMNS, all of the same length N.
        attrs: shard attributes; nested values are stored as JSON strings.
    """
    final = Path(cache_dir) / shard_name(index)
    tmp = final.with_name(final.name + ".tmp")
    n = len(rows["view"])
    with h5py.File(tmp, "w") as f:
        # No timestamps in object headers: the same rows give the same bytes (bit-for-bit reruns).
        crops = f.create_dataset("crop", (n,), dtype=h5py.vlen_dtype(np.uint8), track_times=False)
        for i, blob in enumerate(rows["crop"]):
            crops[i] = blob
        heat = np.asarray(rows["heatmaps"], dtype=np.uint8)
        f.create_dataset("heatmaps", data=heat, chunks=(1, *heat.shape[1:]), compression="gzip",
                         compression_opts=4, shuffle=False, track_times=False)
        f.create_dataset("heatmap_range", data=np.asarray(rows["heatmap_range"], dtype=np.float32), track_times=False)
        f.create_dataset("affine", data=np.asarray(rows["affine"], dtype=np.float64), track_times=False)
        f.create_dataset("flip", data=np.asarray(rows["flip"], dtype=bool), track_times=False)
        f.create_dataset("image_id", data=np.asarray(rows["image_id"], dtype=np.int64), track_times=False)
        f.create_dataset("ann_id", data=np.asarray(rows["ann_id"], dtype=np.int64), track_times=False)
        f.create_dataset("view", data=np.asarray(rows["view"], dtype=np.int32), track_times=False)
        f.create_dataset("keypoints", data=np.asarray(rows["keypoints"], dtype=np.float32), track_times=False)
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    return {"name": final.name, "index": index, "rows": n, "sha256": sha256_file(final)}


# ---- reading ---------------------------------------------------------------------------------

class Cache:
    """Read-only view of a cache folder; safe to use from DataLoader worker processes.

    HDF5 files are opened lazily per process (a handle opened before a fork is never reused).
    """

    def __init__(self, path: Path, allow_incomplete: bool = False):
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise UserError(f"{self.path} is not a kdcache cache (no {MANIFEST}); "
                            "make one with `kdcache dump-teacher --out DIR`")
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise UserError(f"cache {self.path} has schema version {manifest.get('schema_version')}, this "
                            f"kdcache reads version {SCHEMA_VERSION}; dump the teacher again with this version")
        if not manifest.get("complete") and not allow_incomplete:
            done = len(manifest.get("shards", []))
            raise UserError(f"cache {self.path} is incomplete ({done} of {manifest.get('num_shards')} shards); "
                            "re-run the same `kdcache dump-teacher` command to finish it")
        self.manifest = manifest
        self.shards = sorted(manifest["shards"], key=lambda s: s["index"])
        counts = np.array([s["rows"] for s in self.shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._files: dict[int, h5py.File] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def input_hw(self) -> tuple[int, int]:
        return tuple(self.manifest["input_hw"])

    @property
    def heatmap_hw(self) -> tuple[int, int]:
        return tuple(self.manifest["heatmap_hw"])

    def _file(self, shard: int) -> h5py.File:
        if os.getpid() != self._pid:  # forked into a worker: drop the parent's handles
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            path = self.path / self.shards[shard]["name"]
            if not path.exists():
                raise UserError(f"cache shard {path} is missing; run `kdcache inspect {self.path} --verify`")
            f = self._files[shard] = h5py.File(path, "r")
        return f

    def locate(self, index: int) -> tuple[int, int]:
        """Global row index -> (shard position, row within shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for a cache of {len(self)} views")
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        return shard, index - int(self._starts[shard])

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One view: crop [H,W,3] uint8 RGB, heatmaps [K,h,w] float32, affine [2,3], flip, ids, keypoints [K,3]."""
        shard, row = self.locate(int(index))
        f = self._file(shard)
        return {
            "crop": decode_crop(f["crop"][row]),
            "heatmaps": dequantize_heatmaps(f["heatmaps"][row], f["heatmap_range"][row]),
            "affine": f["affine"][row],
            "flip": bool(f["flip"][row]),
            "image_id": int(f["image_id"][row]),
            "ann_id": int(f["ann_id"][row]),
            "view": int(f["view"][row]),
            "keypoints": f["keypoints"][row],
        }

    def attrs(self, shard: int = 0) -> dict[str, Any]:
        """A shard's attributes, JSON values decoded."""
        out = {}
        for key, value in self._file(shard).attrs.items():
            if isinstance(value, str) and value[:1] in "[{":
                value = json.loads(value)
            out[key] = value
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getstate__(self) -> dict[str, Any]:  # pickled into workers without open handles
        state = self.__dict__.copy()
        state["_files"] = {}
        return state


def open_cache(path: Path, allow_incomplete: bool = False) -> Cache:
    """Read-only view of the cache at `path` (see module docstring)."""
    return Cache(path, allow_incomplete=allow_incomplete)


def verify_cache(path: Path) -> list[str]:
    """Problems found in a cache: missing, truncated or corrupt shards (checksum and HDF5 read). Empty = sound."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        return [f"{path / MANIFEST} is missing"]
    problems = []
    if not manifest.get("complete"):
        problems.append(f"incomplete: {len(manifest.get('shards', []))} of {manifest.get('num_shards')} shards")
    for entry in manifest.get("shards", []):
        shard = path / entry["name"]
        if not shard.exists():
            problems.append(f"{entry['name']}: missing")
            continue
        if sha256_file(shard) != entry["sha256"]:
            problems.append(f"{entry['name']}: checksum mismatch (truncated or corrupt)")
            continue
        try:
            with h5py.File(shard, "r") as f:
                if len(f["view"]) != entry["rows"]:
                    problems.append(f"{entry['name']}: {len(f['view'])} rows, manifest says {entry['rows']}")
        except OSError as exc:
            problems.append(f"{entry['name']}: unreadable HDF5 ({exc})")
    return problems
