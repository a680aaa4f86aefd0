"""The cache contract: folder layout, dataset names, dtypes, encodings, attributes, reading and writing.

A cache is a folder:

    manifest.json        schema version, sizes, sigma, encodings, teacher identity, dump configuration,
                         and the complete shards with their row counts, byte sizes and SHA-256
    shard-00000.h5       the views of dump-order rows [0, shard_size), shard-00001.h5 the next, ...

Datasets of a shard of N rows (schema 2; K keypoints, heatmaps h x w; README "Cache format" reads
them with h5py alone):

    crop            uint8 [B]             the crops as the teacher saw them, encoded (JPEG or PNG) and
    crop_offset     int64 [N + 1]         concatenated: row i is crop[crop_offset[i]:crop_offset[i + 1]]
                                          (both absent with crop encoding "none": replay from the images)
    image_file      str [N]               the image a row was cut from (crop encoding "none" only)
    image_hw        int32 [N, 2]          ("none" only) that image's (H, W) in pixels when it was dumped
    image_sha256    uint8 [N, 32]         ("none" only) SHA-256 of that image file's bytes (full digest);
                                          replay refuses an image whose size or bytes differ. Older
                                          "none" caches lack both: they replay unchecked.
    heatmaps        [N, K, h, w]          teacher heatmaps in the manifest's heatmap encoding, one chunk
                                          per row, deflate (after byte-shuffle for 16-bit dtypes):
        "int16-step":   uint16 zigzag z, q = (z >> 1) ^ -(z & 1), value = q * heatmap_step[n, k]
        "float16":      float16 values
        "uint8-minmax-per-joint": uint8 q, value = lo + q / 255 * (hi - lo), (lo, hi) = heatmap_range[n, k]
    heatmap_step    float32 [N, K]        ("int16-step") quantisation step of each joint's map
    heatmap_range   float32 [N, K, 2]     ("uint8-minmax-per-joint") (lo, hi) of each joint's map
    confidence      float32 [N, K]        the teacher's per-joint maximum, from its float32 output
    affine          float64 [N, 2, 3]     original image -> crop, mirror included
    flip            bool [N]              the view is mirrored (keypoint pairs swapped)
    image_id, ann_id  int64 [N]           COCO ids
    view            int32 [N]             view index; 0 = un-augmented
    keypoints       float32 [N, K, 3]     ground truth in crop pixels: x, y, COCO visibility

"int16-step" is a uniform quantiser sized to an error budget: joint k's step is
sqrt(12 / (h * w)) * eps * ||map_k||_2, so rounding (error uniform in +-step/2, variance step^2 / 12)
leaves each joint's map, and the view, at relative L2 error eps of the teacher's float32 output
(eps = manifest "heatmap_rel_error"; at most sqrt(3) * eps in the impossible worst case, and less
where the map is flat). A clean teacher's flat background rounds to zeros that deflate to nothing.

Schema 1 (kdcache 0.1) stored crops as a vlen uint8 dataset, "uint8-minmax-per-joint" heatmaps and no
confidence; it is still read. Writes are crash-safe: a shard is written as `NAME.tmp` and renamed
when complete, and the manifest is updated under a file lock and replaced atomically, so a killed
dump leaves only complete shards listed, and concurrent ranks never lose each other's entries. A write
that fails (a full disk) removes its temporary file and raises the OSError with the file's name; what
was complete before stays listed and intact.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import cv2
import h5py
import numpy as np

from kdcache.errors import UserError

if TYPE_CHECKING:
    from kdcache.cache_reader import Cache

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
MANIFEST = "manifest.json"
LOCK = "manifest.lock"
META_COLUMNS = ("confidence", "affine", "flip", "image_id", "ann_id", "view", "keypoints")
META_DTYPES = {"confidence": np.float32, "affine": np.float64, "flip": np.bool_, "image_id": np.int64,
               "ann_id": np.int64, "view": np.int32, "keypoints": np.float32}
# Crop encoding "none": what identifies each row's image, checked when the crop is replayed.
REPLAY_COLUMNS = ("image_hw", "image_sha256")
REPLAY_DTYPES = {"image_hw": np.int32, "image_sha256": np.uint8}
REPLAY_SHAPES = {"image_hw": (2,), "image_sha256": (32,)}
DEFAULT_CROP_ENCODING = "jpeg90"
DEFAULT_HEATMAP_ENCODING = "int16-step"
DEFAULT_REL_ERROR = 0.03  # docs/benchmark.md: students lose no AP beyond noise at 3 %
DEFAULT_GZIP_LEVEL = 2


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes (hashlib releases the GIL: several threads hash at once)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


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


# ---- crops ---------------------------------------------------------------------------------

def parse_crop_encoding(name: str) -> tuple[str, int]:
    """"jpeg90" -> ("jpeg", 90); "png" -> ("png", 0); "none" -> ("none", 0)."""
    if name in ("png", "none"):
        return name, 0
    if name.startswith("jpeg") and name[4:].isdigit() and 1 <= int(name[4:]) <= 100:
        return "jpeg", int(name[4:])
    raise UserError(f"unknown crop encoding {name!r}; use jpegQ (Q in 1..100, e.g. jpeg90), png or none")


def encode_crop(crop: np.ndarray, encoding: str = DEFAULT_CROP_ENCODING) -> np.ndarray:
    """crop: [H, W, 3] uint8 RGB -> encoded bytes as a uint8 vector ("jpegQ" or "png")."""
    codec, quality = parse_crop_encoding(encoding)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if codec == "jpeg" else [cv2.IMWRITE_PNG_COMPRESSION, 6]
    ok, buf = cv2.imencode(".jpg" if codec == "jpeg" else ".png", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise RuntimeError(f"{encoding} encoding of a crop failed")
    return buf.reshape(-1)


def decode_crop(data: np.ndarray) -> np.ndarray:
    """JPEG or PNG bytes -> [H, W, 3] uint8 RGB."""
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# ---- heatmaps ------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeatmapEncoding:
    """How teacher heatmaps are stored: the `heatmaps` dtype plus one side dataset per row."""

    name: str
    dtype: type                 # dtype of the `heatmaps` dataset
    side: str                   # name of the per-row side dataset
    side_shape: tuple[int, ...]  # its shape after [N, K]
    # encode(heat [n, K, h, w] float32, eps) -> (stored [n, K, h, w], side [n, K, ...])
    encode: Callable[[np.ndarray, float], tuple[np.ndarray, np.ndarray]]
    # decode(stored [..., K, h, w], side [..., K, ...]) -> float32 [..., K, h, w]
    decode: Callable[[np.ndarray, np.ndarray], np.ndarray]


def _encode_step(heat: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    h, w = heat.shape[-2:]
    norm = np.sqrt(np.square(heat, dtype=np.float64).sum(axis=(-2, -1)))
    # Rounding to a grid of `step` errs by U(-step/2, step/2), variance step^2 / 12, so this step gives
    # each joint's map a relative L2 error of eps (tightly: thousands of pixels average out).
    step = (np.sqrt(12.0 / (h * w)) * eps * norm).astype(np.float32)
    step = np.maximum(step, np.abs(heat).max(axis=(-2, -1)) / 32767.0, dtype=np.float32)  # int16 range
    safe = np.where(step > 0, step, 1.0).astype(np.float32)
    q = np.rint(heat / safe[..., None, None]).astype(np.int32)
    zigzag = (q << 1) ^ (q >> 31)  # 0, -1, 1, -2, ... -> 0, 1, 2, 3, ...: small magnitudes, small codes
    return zigzag.astype(np.uint16), step


def _decode_step(stored: np.ndarray, step: np.ndarray) -> np.ndarray:
    z = stored.astype(np.int32)
    q = (z >> 1) ^ -(z & 1)
    return q.astype(np.float32) * step[..., None, None]


def _encode_minmax(heat: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    lo = heat.min(axis=(-2, -1))
    hi = heat.max(axis=(-2, -1))
    span = np.maximum(hi - lo, 1e-12)[..., None, None]
    q = np.rint((heat - lo[..., None, None]) / span * 255.0)
    return q.astype(np.uint8), np.stack([lo, hi], axis=-1).astype(np.float32)


def _decode_minmax(stored: np.ndarray, value_range: np.ndarray) -> np.ndarray:
    lo = value_range[..., 0, None, None]
    hi = value_range[..., 1, None, None]
    return (lo + stored.astype(np.float32) * ((hi - lo) / 255.0)).astype(np.float32)


HEATMAP_ENCODINGS = {
    "int16-step": HeatmapEncoding("int16-step", np.uint16, "heatmap_step", (), _encode_step, _decode_step),
    "float16": HeatmapEncoding("float16", np.float16, "", (), lambda h, e: (h.astype(np.float16), None),
                               lambda s, _: s.astype(np.float32)),
    "uint8-minmax-per-joint": HeatmapEncoding("uint8-minmax-per-joint", np.uint8, "heatmap_range", (2,),
                                              _encode_minmax, _decode_minmax),
}


def heatmap_encoding(name: str) -> HeatmapEncoding:
    if name not in HEATMAP_ENCODINGS:
        raise UserError(f"unknown heatmap encoding {name!r}; known: {', '.join(HEATMAP_ENCODINGS)}")
    return HEATMAP_ENCODINGS[name]


def shuffle_bytes(raw: bytes, itemsize: int) -> bytes:
    """HDF5's shuffle filter: byte 0 of every element, then byte 1, ... (one strided copy per byte plane)."""
    if itemsize == 1:
        return raw
    elements = np.frombuffer(raw, np.uint8).reshape(-1, itemsize)
    planes = np.empty((itemsize, len(elements)), np.uint8)
    for j in range(itemsize):
        planes[j] = elements[:, j]
    return planes.tobytes()


def unshuffle_bytes(raw: bytes, itemsize: int) -> np.ndarray:
    """Inverse of `_shuffle`, as a uint8 array of the element bytes in order."""
    if itemsize == 1:
        return np.frombuffer(raw, np.uint8)
    planes = np.frombuffer(raw, np.uint8).reshape(itemsize, -1)
    elements = np.empty((planes.shape[1], itemsize), np.uint8)
    for j in range(itemsize):
        elements[:, j] = planes[j]
    return elements.reshape(-1)


# ---- manifest ------------------------------------------------------------------------------

def read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON; the cache is damaged, dump it again into a new --out") from None


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


# ---- writing -------------------------------------------------------------------------------

def encode_heatmap_rows(heat: np.ndarray, encoding: str = DEFAULT_HEATMAP_ENCODING,
                        rel_error: float = DEFAULT_REL_ERROR,
                        gzip_level: int = DEFAULT_GZIP_LEVEL) -> tuple[list[bytes], np.ndarray | None]:
    """Teacher heatmaps -> what a shard stores.

    Args:
        heat: [n, K, h, w] float32 teacher output.

    Returns:
        One HDF5 chunk per row (byte-shuffled for 16-bit dtypes, then deflated: exactly what the
        dataset's filters undo) and the encoding's side array [n, K, ...] (None for "float16").
    """
    enc = heatmap_encoding(encoding)
    stored, side = enc.encode(np.asarray(heat, dtype=np.float32), rel_error)
    itemsize = stored.dtype.itemsize
    # zlib releases the GIL: a writer thread compresses while the teacher runs.
    return [zlib.compress(shuffle_bytes(row.tobytes(), itemsize), gzip_level) for row in stored], side


def write_shard(cache_dir: Path, index: int, rows: dict[str, Any], attrs: dict[str, Any],
                heatmap_shape: tuple[int, int, int], encoding: str = DEFAULT_HEATMAP_ENCODING,
                gzip_level: int = DEFAULT_GZIP_LEVEL) -> dict[str, Any]:
    """Write one complete shard crash-safely and return its manifest entry.

    Args:
        rows: `heatmaps` (chunks from `encode_heatmap_rows`) and the encoding's side array, every
            META_COLUMNS array, `crop` (list of encoded byte vectors) or `image_file` (list of str)
            with the REPLAY_COLUMNS arrays, and optionally `skipped_images` (files whose views are
            missing from this shard).
        attrs: shard attributes; nested values are stored as JSON strings.
        heatmap_shape: (K, h, w).

    Raises:
        OSError: the write failed (e.g. ENOSPC); the temporary file is gone and `filename` names it.
    """
    final = Path(cache_dir) / shard_name(index)
    tmp = final.with_name(final.name + ".tmp")
    with _temporary(tmp):
        _write_h5(tmp, rows, attrs, heatmap_shape, heatmap_encoding(encoding), gzip_level)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    return {"name": final.name, "index": index, "rows": len(rows["heatmaps"]), "bytes": final.stat().st_size,
            "sha256": sha256_file(final), "skipped_images": sorted(set(rows.get("skipped_images", [])))}


def _write_h5(tmp: Path, rows: dict[str, Any], attrs: dict[str, Any], heatmap_shape: tuple[int, int, int],
              enc: HeatmapEncoding, gzip_level: int) -> None:
    """The shard's datasets (module docstring) and attributes, into the file `tmp`."""
    chunks = rows["heatmaps"]
    n = len(chunks)
    # No timestamps in object headers: the same rows give the same bytes (bit-for-bit reruns).
    opts = {"track_times": False}
    with h5py.File(tmp, "w") as f:
        if rows.get("crop") is not None:
            sizes = np.array([len(blob) for blob in rows["crop"]], dtype=np.int64)
            blob = np.concatenate(rows["crop"]).astype(np.uint8) if n else np.zeros(0, np.uint8)
            f.create_dataset("crop", data=blob, **opts)
            f.create_dataset("crop_offset", data=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), **opts)
        if rows.get("image_file") is not None:
            f.create_dataset("image_file", data=np.array(rows["image_file"], dtype=object),
                             dtype=h5py.string_dtype(), **opts)
            for name in REPLAY_COLUMNS:
                if rows.get(name) is not None:
                    data = np.asarray(rows[name], dtype=REPLAY_DTYPES[name]).reshape(n, *REPLAY_SHAPES[name])
                    f.create_dataset(name, data=data, **opts)
        shape = (n, *heatmap_shape)
        if n:
            ds = f.create_dataset("heatmaps", shape=shape, dtype=enc.dtype, chunks=(1, *heatmap_shape),
                                  compression="gzip", compression_opts=gzip_level,
                                  shuffle=np.dtype(enc.dtype).itemsize > 1, **opts)
            for i, chunk in enumerate(chunks):
                ds.id.write_direct_chunk((i, 0, 0, 0), chunk)
        else:  # HDF5 chunks cannot be larger than a fixed-size empty dataset
            f.create_dataset("heatmaps", shape=shape, dtype=enc.dtype, **opts)
        if enc.side:
            side = np.asarray(rows[enc.side], dtype=np.float32).reshape(n, heatmap_shape[0], *enc.side_shape)
            f.create_dataset(enc.side, data=side, **opts)
        for name in META_COLUMNS:
            f.create_dataset(name, data=np.asarray(rows[name], dtype=META_DTYPES[name]), **opts)
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value


# ---- reading -------------------------------------------------------------------------------

def open_cache(path: Path, allow_incomplete: bool = False, images: Path | None = None) -> Cache:
    """Read-only view of the cache at `path` (see module docstring; the reader is `kdcache.cache_reader`)."""
    from kdcache.cache_reader import Cache

    return Cache(path, allow_incomplete=allow_incomplete, images=images)


# ---- checking ------------------------------------------------------------------------------

def check_shard(path: Path, entry: dict[str, Any], checksums: bool) -> str | None:
    """What is wrong with one listed shard ("NAME: what"), or None.

    Size, HDF5 header and row count always; the SHA-256 (every byte read) only with `checksums`.
    """
    name = entry["name"]
    if not path.exists():
        return f"{name}: missing"
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        return f"{name}: {size} bytes, manifest says {entry['bytes']} (truncated or overwritten)"
    if checksums and sha256_file(path) != entry["sha256"]:
        return f"{name}: checksum mismatch (corrupt)"
    try:
        with h5py.File(path, "r") as f:
            rows = len(f["view"])
            if rows != entry["rows"]:
                return f"{name}: {rows} rows, manifest says {entry['rows']}"
    except (OSError, KeyError) as exc:
        return f"{name}: unreadable HDF5 ({exc})"
    return None


def verify_cache(path: Path, checksums: bool = True) -> list[str]:
    """Problems found in a cache: incomplete, missing, truncated or corrupt shards. Empty = sound.

    Args:
        checksums: also compare every shard's SHA-256 with the manifest (reads every byte, on a few
            threads); without it only sizes, row counts and HDF5 headers are checked.
    """
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except UserError as exc:
        return [str(exc)]
    if manifest is None:
        return [f"{path / MANIFEST} is missing"]
    problems = []
    if manifest.get("schema_version") not in READABLE_SCHEMAS:
        problems.append(f"schema version {manifest.get('schema_version')} is not readable by this kdcache")
    if not manifest.get("complete"):
        problems.append(f"incomplete: {len(manifest.get('shards', []))} of {manifest.get('num_shards')} shards")
    problems.extend(check_shards(path, manifest.get("shards", []), checksums).values())
    return problems


def check_shards(path: Path, entries: list[dict[str, Any]], checksums: bool) -> dict[int, str]:
    """`check_shard` over manifest entries on a few threads (hashlib releases the GIL): index -> problem."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        found = pool.map(lambda e: check_shard(Path(path) / e["name"], e, checksums), entries)
        return {entry["index"]: problem for entry, problem in zip(entries, found) if problem}


def check_compatible(manifest: dict[str, Any], input_hw: tuple[int, int], heatmap_hw: tuple[int, int],
                     sigma: float) -> list[str]:
    """What in a cache does not match a student's settings (empty = compatible)."""
    wanted = {"input_hw": list(input_hw), "heatmap_hw": list(heatmap_hw), "sigma": float(sigma)}
    return [f"{key} {manifest.get(key)} (student: {value})" for key, value in wanted.items()
            if manifest.get(key) != value]
