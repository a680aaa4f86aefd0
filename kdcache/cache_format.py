"""The cache contract: folder layout, the row schema, crop formats, the manifest, and what must match.

A cache is a folder:

    manifest.json        schema version, codec, keypoint set, sizes, storage, teacher identity, dump
                         configuration, and the complete shards with their row counts, byte sizes and SHA-256
    shard-00000.h5       the views of dump-order rows [0, shard_size), shard-00001.h5 the next, ...

Datasets of a shard of N rows (schema 3; K keypoints, heatmaps h x w; README "Cache format" reads them with
h5py alone):

    crop            uint8 [B]             the crops as the teacher saw them, in the crop format (JPEG or PNG),
    crop_offset     int64 [N + 1]         concatenated: row i is crop[crop_offset[i]:crop_offset[i + 1]]
                                          (both absent with crop format "none": replay from the images)
    image_file      str [N]               the image a row was cut from (crop format "none" only)
    heatmaps        [N, K, h, w]          teacher heatmaps in the manifest's heatmap storage, one chunk per row,
                                          deflate (after byte-shuffle for 16-bit dtypes): `kdcache.heatmap_storage`
                                          and its side dataset (`heatmap_step` or `heatmap_range`)
    ROW_COLUMNS, REPLAY_COLUMNS below: one fixed-size array per row each

Schema 4 adds two row columns, `labelled` and `box_score`, and the manifest's `persons` (where the dumped
people came from, how many have ground truth): a cache may hold people given only by a detector's boxes,
whose rows carry no ground truth (all visibilities 0, `labelled` False). Older caches read as all labelled,
box score 1. Schema 3 added the manifest's `codec` (what made the targets: `kdcache.codec`, e.g. UDP heatmaps with their
sizes and sigma) and `keypoint_set` (`kdcache.keypoints`; a set described in a file is also held whole, as
`keypoint_set_description`); the datasets are schema 2's. Schema 2 caches read
as UDP heatmaps of their `input_hw`, `heatmap_hw`, `sigma`, and COCO-17. Schema 1 (kdcache 0.1) stored crops
as a vlen uint8 dataset, "uint8-minmax-per-joint" heatmaps and no confidence; it is still read.

Everything here is numpy and OpenCV: the contract, and the reader built on it, import no torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from kdcache.codec import Codec, UDPHeatmap, codec_from_record
from kdcache.errors import UserError
from kdcache.keypoints import COCO_17, KeypointSet, keypoint_set, keypoint_set_from_description

SCHEMA_VERSION = 4
READABLE_SCHEMAS = (1, 2, 3, 4)
MANIFEST = "manifest.json"
LOCK = "manifest.lock"


@dataclass(frozen=True)
class Column:
    """One fixed-size per-row dataset of a shard: `dtype [N, *shape]`, "K" in `shape` standing for the keypoints."""

    name: str
    dtype: type
    shape: tuple[int | str, ...]
    meaning: str

    def row_shape(self, num_keypoints: int) -> tuple[int, ...]:
        return tuple(num_keypoints if d == "K" else d for d in self.shape)

    def stack(self, values: list[np.ndarray], num_keypoints: int) -> np.ndarray:
        """Per-batch arrays [n_i, *shape] -> one [N, *shape] array of this dtype (N = 0 for an empty list)."""
        if not values:
            return np.zeros((0, *self.row_shape(num_keypoints)), self.dtype)
        return np.concatenate([np.asarray(v, dtype=self.dtype) for v in values]).reshape(
            -1, *self.row_shape(num_keypoints))


# Every row of every shard.
ROW_COLUMNS = (
    Column("confidence", np.float32, ("K",), "the teacher's per-joint maximum, from its float32 output"),
    Column("affine", np.float64, (2, 3), "original image -> crop pixels, mirror included"),
    Column("flip", np.bool_, (), "the view is mirrored (keypoint pairs swapped)"),
    Column("image_id", np.int64, (), "COCO image id"),
    Column("ann_id", np.int64, (), "COCO annotation id"),
    Column("view", np.int32, (), "view index; 0 = un-augmented"),
    Column("keypoints", np.float32, ("K", 3), "ground truth in crop pixels: x, y, COCO visibility"),
    Column("labelled", np.bool_, (), "the person has ground truth (False: from a box alone, keypoints all 0)"),
    Column("box_score", np.float32, (), "the person box's score: a detector's, 1 for annotated boxes"),
)
# What a row of a cache older than schema 4 (no such column) holds: every person was annotated.
COLUMN_DEFAULTS = {"labelled": np.bool_(True), "box_score": np.float32(1.0)}
# Crop format "none": what identifies each row's image, checked when its crop is replayed (older "none"
# caches lack both: they replay unchecked).
REPLAY_COLUMNS = (
    Column("image_hw", np.int32, (2,), "the image's (H, W) in pixels when it was dumped"),
    Column("image_sha256", np.uint8, (32,), "SHA-256 of the image file's bytes (full digest)"),
)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes (hashlib releases the GIL: several threads hash at once)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


# ---- crop formats ----------------------------------------------------------------------------

CROP_FORMATS = ("jpeg", "png", "none")  # "jpegQ" names JPEG at quality Q; "none" stores no crop


def parse_crop_format(name: str) -> tuple[str, int]:
    """"jpeg90" -> ("jpeg", 90); "png" -> ("png", 0); "none" -> ("none", 0)."""
    if name in ("png", "none"):
        return name, 0
    if name.startswith("jpeg") and name[4:].isdigit() and 1 <= int(name[4:]) <= 100:
        return "jpeg", int(name[4:])
    raise UserError(f"unknown crop format {name!r}; use jpegQ (Q in 1..100, e.g. jpeg90), png or none")


def encode_crop(crop: np.ndarray, crop_format: str) -> np.ndarray:
    """crop: [H, W, 3] uint8 RGB -> encoded bytes as a uint8 vector ("jpegQ" or "png")."""
    kind, quality = parse_crop_format(crop_format)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if kind == "jpeg" else [cv2.IMWRITE_PNG_COMPRESSION, 6]
    ok, buf = cv2.imencode(".jpg" if kind == "jpeg" else ".png", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise RuntimeError(f"{crop_format} encoding of a crop failed")
    return buf.reshape(-1)


def decode_crop(data: np.ndarray | bytes) -> np.ndarray:
    """JPEG or PNG bytes -> [H, W, 3] uint8 RGB."""
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# ---- manifest --------------------------------------------------------------------------------

def read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON; the cache is damaged, dump it again into a new --out") from None


def manifest_codec(manifest: dict[str, Any]) -> Codec:
    """The codec that made a cache's targets; schema 1 and 2 caches were all UDP heatmaps."""
    if "codec" in manifest:
        return codec_from_record(manifest["codec"])
    return UDPHeatmap(tuple(manifest["input_hw"]), tuple(manifest["heatmap_hw"]), float(manifest["sigma"]))


def manifest_keypoint_set(manifest: dict[str, Any]) -> KeypointSet:
    """A cache's keypoint set: a built-in one by name, or a set described in a file (`--keypoint-set FILE`), which
    the manifest holds whole (`keypoint_set_description`); schema 1 and 2 caches were all COCO-17."""
    if "keypoint_set_description" in manifest:
        return keypoint_set_from_description(manifest["keypoint_set_description"], "the cache manifest's keypoint set")
    return keypoint_set(manifest["keypoint_set"]) if "keypoint_set" in manifest else COCO_17


def check_compatible(manifest: dict[str, Any], codec: Codec) -> list[str]:
    """What in a cache's targets does not match the codec a student trains with (empty = compatible)."""
    theirs, mine = manifest_codec(manifest).to_record(), codec.to_record()
    return [f"{key} {theirs[key]} (student: {mine[key]})" for key in mine if theirs.get(key) != mine[key]]
