"""How teacher heatmaps are stored in a cache: quantisation, byte shuffle, deflate.

A storage is the `heatmaps` dataset's dtype, a per-row side dataset it needs to decode, and the encode /
decode pair; caches name theirs in the manifest (`heatmap_encoding`). Each row's heatmaps are one HDF5
chunk, byte-shuffled for 16-bit dtypes and deflated, written directly (`encode_rows` makes exactly the
chunk bytes the dataset's filters undo) and read back with `os.pread` + `inflate_row`.

    "int16-step":   uint16 zigzag z, q = (z >> 1) ^ -(z & 1), value = q * heatmap_step[n, k]
    "float16":      float16 values
    "uint8-minmax-per-joint": uint8 q, value = lo + q / 255 * (hi - lo), (lo, hi) = heatmap_range[n, k]
    "int16-step-window": "int16-step" of each map with everything outside a window around its peak set to 0
        (`peak_window`: 3 sigma, 13 x 13 for sigma 2): for many keypoints (COCO-WholeBody's 133), where a teacher's
        background noise is most of the bytes; the budget eps then applies to what is kept.

"int16-step" is a uniform quantiser sized to an error budget: joint k's step is
sqrt(12 / (h * w)) * eps * ||map_k||_2, so rounding (error uniform in +-step/2, variance step^2 / 12)
leaves each joint's map, and the view, at relative L2 error eps of the teacher's float32 output
(eps = manifest "heatmap_rel_error"; at most sqrt(3) * eps in the impossible worst case, and less
where the map is flat). A clean teacher's flat background rounds to zeros that deflate to nothing.

A new storage is one more `HeatmapStorage` in `HEATMAP_STORAGES` (the dump's --heatmap-encoding choices).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from kdcache.codec import DEFAULT_SIGMA
from kdcache.errors import UserError


@dataclass(frozen=True)
class HeatmapStorage:
    """How teacher heatmaps are stored: the `heatmaps` dtype plus one side dataset per row."""

    name: str
    dtype: type                 # dtype of the `heatmaps` dataset
    side: str                   # name of the per-row side dataset ("" = none)
    side_shape: tuple[int, ...]  # its shape after [N, K]
    # encode(heat [n, K, h, w] float32, eps, sigma) -> (stored [n, K, h, w], side [n, K, ...] or None)
    encode: Callable[[np.ndarray, float, float], tuple[np.ndarray, np.ndarray | None]]
    # decode(stored [..., K, h, w], side [..., K, ...] or None) -> float32 [..., K, h, w]
    decode: Callable[[np.ndarray, np.ndarray | None], np.ndarray]


def _encode_step(heat: np.ndarray, eps: float, pixels: np.ndarray | int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`pixels`: how many of each map's pixels are rounded (default all: h * w; zeros round exactly)."""
    h, w = heat.shape[-2:]
    norm = np.sqrt(np.square(heat, dtype=np.float64).sum(axis=(-2, -1)))
    # Rounding to a grid of `step` errs by U(-step/2, step/2), variance step^2 / 12, so this step gives
    # each joint's map a relative L2 error of eps (tightly: hundreds of pixels average out).
    step = (np.sqrt(12.0 / (h * w if pixels is None else pixels)) * eps * norm).astype(np.float32)
    step = np.maximum(step, np.abs(heat).max(axis=(-2, -1)) / 32767.0, dtype=np.float32)  # int16 range
    safe = np.where(step > 0, step, 1.0).astype(np.float32)
    q = np.rint(heat / safe[..., None, None]).astype(np.int32)
    zigzag = (q << 1) ^ (q >> 31)  # 0, -1, 1, -2, ... -> 0, 1, 2, 3, ...: small magnitudes, small codes
    return zigzag.astype(np.uint16), step


def peak_window(heat: np.ndarray, sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """bool [..., h, w]: the (2r + 1)^2 pixels around each map's largest value, r = ceil(3 sigma) (the support
    mmpose gives its target Gaussians; 13 x 13 for ViTPose's sigma 2), clipped at the border."""
    h, w = heat.shape[-2:]
    r = math.ceil(3 * sigma)
    peak = heat.reshape(*heat.shape[:-2], h * w).argmax(axis=-1)
    y, x = (peak // w)[..., None, None], (peak % w)[..., None, None]
    return (np.abs(np.arange(h)[:, None] - y) <= r) & (np.abs(np.arange(w)[None, :] - x) <= r)


def _encode_int16(heat: np.ndarray, eps: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    return _encode_step(heat, eps)


def _encode_window(heat: np.ndarray, eps: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    # The background outside each peak's window is stored as zeros, which deflate to almost nothing; only the
    # window's pixels are rounded, so its step is sized for their count.
    window = peak_window(heat, sigma)
    return _encode_step(np.where(window, heat, np.float32(0)), eps, window.sum(axis=(-2, -1)))


def _decode_step(stored: np.ndarray, step: np.ndarray) -> np.ndarray:
    z = stored.astype(np.int32)
    q = (z >> 1) ^ -(z & 1)
    return q.astype(np.float32) * step[..., None, None]


def _encode_minmax(heat: np.ndarray, eps: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    lo = heat.min(axis=(-2, -1))
    hi = heat.max(axis=(-2, -1))
    span = np.maximum(hi - lo, 1e-12)[..., None, None]
    q = np.rint((heat - lo[..., None, None]) / span * 255.0)
    return q.astype(np.uint8), np.stack([lo, hi], axis=-1).astype(np.float32)


def _decode_minmax(stored: np.ndarray, value_range: np.ndarray) -> np.ndarray:
    lo = value_range[..., 0, None, None]
    hi = value_range[..., 1, None, None]
    return (lo + stored.astype(np.float32) * ((hi - lo) / 255.0)).astype(np.float32)


HEATMAP_STORAGES = {
    "int16-step": HeatmapStorage("int16-step", np.uint16, "heatmap_step", (), _encode_int16, _decode_step),
    "int16-step-window": HeatmapStorage("int16-step-window", np.uint16, "heatmap_step", (), _encode_window,
                                        _decode_step),
    "float16": HeatmapStorage("float16", np.float16, "", (), lambda h, e, _: (h.astype(np.float16), None),
                              lambda s, _: s.astype(np.float32)),
    "uint8-minmax-per-joint": HeatmapStorage("uint8-minmax-per-joint", np.uint8, "heatmap_range", (2,),
                                             _encode_minmax, _decode_minmax),
}


def heatmap_storage(name: str) -> HeatmapStorage:
    if name not in HEATMAP_STORAGES:
        raise UserError(f"unknown heatmap encoding {name!r}; known: {', '.join(HEATMAP_STORAGES)}")
    return HEATMAP_STORAGES[name]


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
    """Inverse of `shuffle_bytes`, as a uint8 array of the element bytes in order."""
    if itemsize == 1:
        return np.frombuffer(raw, np.uint8)
    planes = np.frombuffer(raw, np.uint8).reshape(itemsize, -1)
    elements = np.empty((planes.shape[1], itemsize), np.uint8)
    for j in range(itemsize):
        elements[:, j] = planes[j]
    return elements.reshape(-1)


def encode_rows(heat: np.ndarray, storage: HeatmapStorage, rel_error: float, gzip_level: int,
                sigma: float = DEFAULT_SIGMA) -> tuple[list[bytes], np.ndarray | None]:
    """Teacher heatmaps -> what a shard stores.

    Args:
        heat: [n, K, h, w] float32 teacher output.
        rel_error: "int16-step"'s relative L2 error budget (the others ignore it).
        sigma: the codec's target sigma in heatmap pixels ("int16-step-window"'s window is 3 sigma around the peak).

    Returns:
        One HDF5 chunk per row (byte-shuffled for 16-bit dtypes, then deflated: exactly what the
        dataset's filters undo) and the storage's side array [n, K, ...] (None when it has none).
    """
    stored, side = storage.encode(np.asarray(heat, dtype=np.float32), rel_error, sigma)
    itemsize = stored.dtype.itemsize
    # zlib releases the GIL: a writer thread compresses while the teacher runs.
    return [zlib.compress(shuffle_bytes(row.tobytes(), itemsize), gzip_level) for row in stored], side


def inflate_row(raw: bytes, dtype: np.dtype, shape: tuple[int, ...], shuffle: bool, deflate: bool) -> np.ndarray:
    """One stored chunk (as `encode_rows` wrote it, or HDF5 without those filters) -> stored values [K, h, w]."""
    if deflate:
        raw = zlib.decompress(raw)
    data = unshuffle_bytes(raw, dtype.itemsize) if shuffle else np.frombuffer(raw, np.uint8)
    return data.view(dtype).reshape(shape)
