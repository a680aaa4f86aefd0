"""Heatmaps -> sub-pixel keypoints: the decoding numerics of the codecs, pure numpy + cv2 (no torch).

Both decoders take the integer argmax of each map and move it by one Newton step on the log of the
blurred map (DARK, Zhang et al. 2020), each as its codec's teachers are tested:

- `dark_udp` (`codec.UDPHeatmap`, ViTPose): mmpose's `post_dark_udp`. Reflect-101 blur, clip to
  [0.001, 50], log, 3x3 central differences on the edge-padded log map, (Hessian + eps I)^-1.
- `dark_tokenpose` (`codec.TokenPoseHeatmap`): TokenPose's `get_final_preds` with POST_PROCESS (the
  DarkPose code). Zero-bordered blur rescaled to the raw maximum, floor 1e-10, log, differences two
  pixels wide for the second derivatives, and no step for peaks within two pixels of the border.

Coordinates here are heatmap pixels (x, y); the codecs map them to crop pixels.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np


def _as_maps(heatmaps: Any) -> np.ndarray:
    """float32 [N, K, h, w] numpy from numpy or a torch tensor (moved to the CPU; torch is not imported)."""
    if not isinstance(heatmaps, np.ndarray) and hasattr(heatmaps, "detach"):
        heatmaps = heatmaps.detach().float().cpu().numpy()
    maps = np.asarray(heatmaps, dtype=np.float32)
    if maps.ndim != 4:
        raise ValueError(f"expected heatmaps [N, K, h, w], got {maps.shape}")
    return maps


def blur_heatmaps(heatmaps: np.ndarray, kernel: int = 11) -> np.ndarray:
    """Gaussian blur of every map, as mmpose's `post_dark_udp` does before DARK.

    cv2.GaussianBlur with sigma derived from the kernel size (2.0 for 11) and reflect-101 border,
    map by map (about 10 us per 64x48 map; multi-channel calls are no faster once transposed).

    Args:
        heatmaps: [..., h, w] float32.

    Returns:
        float32 [..., h, w], a new array.
    """
    maps = np.asarray(heatmaps, dtype=np.float32)
    h, w = maps.shape[-2:]
    flat = np.ascontiguousarray(maps.reshape(-1, h, w))
    out = np.empty_like(flat)
    for i in range(len(flat)):
        cv2.GaussianBlur(flat[i], (kernel, kernel), 0, dst=out[i])
    return out.reshape(maps.shape)


def blur_zero_border(heatmaps: np.ndarray, kernel: int = 11) -> np.ndarray:
    """Gaussian blur with zeros outside the map, rescaled to the map's own maximum (TokenPose's `gaussian_blur`).

    Each map is zero-padded by (kernel-1)//2, blurred in float64 with cv2.GaussianBlur((kernel, kernel), 0)
    (the padding is wide enough that OpenCV's own border never reaches the map), cut back, stored as float32
    and multiplied by max(map) / max(blurred), in float32 as TokenPose does.

    Args:
        heatmaps: [..., h, w] float.

    Returns:
        float32 [..., h, w], a new array.
    """
    maps = np.asarray(heatmaps, dtype=np.float32)
    h, w = maps.shape[-2:]
    flat = maps.reshape(-1, h, w)
    pad = (kernel - 1) // 2
    padded = np.zeros((len(flat), h + 2 * pad, w + 2 * pad), dtype=np.float64)
    padded[:, pad:pad + h, pad:pad + w] = flat
    blurred = np.empty((len(flat), h, w), dtype=np.float32)
    for i in range(len(flat)):
        blurred[i] = cv2.GaussianBlur(padded[i], (kernel, kernel), 0)[pad:pad + h, pad:pad + w]
    with np.errstate(divide="ignore", invalid="ignore"):  # all-zero maps give nan, as TokenPose's do
        ratio = flat.max(axis=(1, 2)) / blurred.max(axis=(1, 2))
    blurred *= ratio[:, None, None]
    return blurred.reshape(maps.shape)


def get_max_preds(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer argmax of each map (mmpose `_get_max_preds`).

    Args:
        heatmaps: [N, K, h, w].

    Returns:
        coords: float32 [N, K, 2] heatmap pixels (x, y), -1 where the maximum is <= 0;
        scores: float32 [N, K], the maximum.
    """
    n, k, h, w = heatmaps.shape
    flat = heatmaps.reshape(n, k, h * w)
    idx = flat.argmax(axis=2)
    scores = np.take_along_axis(flat, idx[..., None], axis=2)[..., 0].astype(np.float32)
    coords = np.stack([idx % w, idx // w], axis=-1).astype(np.float32)
    coords[scores <= 0] = -1.0
    return coords, scores


def _reflect101(index: np.ndarray, size: int) -> np.ndarray:
    """Indices outside [0, size) folded back as OpenCV's BORDER_REFLECT_101 (gfedcb|abcdefgh|gfedcba)."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.abs(index) % period
    return np.where(index > size - 1, period - index, index)


def _blurred_log_3x3(maps: np.ndarray, px: np.ndarray, py: np.ndarray, kernel: int) -> np.ndarray:
    """log(clip(blur(map), 0.001, 50)) on the 3x3 neighbourhood of (px, py), edge-clamped.

    Equal to blurring whole maps with cv2.GaussianBlur (reflect-101 border) and reading the edge-padded
    log map around the peak, as mmpose does, but it only touches (kernel+2)^2 pixels per joint.

    Returns:
        float64 [N, K, 3, 3] indexed [dy + 1, dx + 1].
    """
    n, k, h, w = maps.shape
    r = kernel // 2
    taps = cv2.getGaussianKernel(kernel, 0).ravel()  # the kernel GaussianBlur uses for sigma=0
    offsets = np.arange(-r - 1, r + 2)
    rows = _reflect101(py[..., None] + offsets, h)  # [N, K, kernel+2]
    cols = _reflect101(px[..., None] + offsets, w)
    window = maps[np.arange(n)[:, None, None, None], np.arange(k)[None, :, None, None],
                  rows[..., :, None], cols[..., None, :]].astype(np.float64)
    # Separable blur, evaluated at the 3x3 centres (offsets -1, 0, 1).
    span = np.arange(3)[:, None] + np.arange(kernel)[None, :]  # [3, kernel]
    horiz = np.einsum("nkyct,t->nkyc", window[..., span], taps)  # [N, K, kernel+2, 3]
    blur = np.einsum("nkdtc,t->nkdc", horiz[..., span, :], taps)  # [N, K, 3, 3]
    log_blur = np.log(np.clip(blur, 0.001, 50))
    # mmpose pads the log map with its edge values: neighbours past the border repeat the border pixel.
    iy = np.clip(py[..., None] + np.arange(-1, 2), 0, h - 1) - py[..., None] + 1  # [N, K, 3]
    ix = np.clip(px[..., None] + np.arange(-1, 2), 0, w - 1) - px[..., None] + 1
    log_blur = np.take_along_axis(log_blur, iy[..., :, None], axis=2)
    return np.take_along_axis(log_blur, ix[..., None, :], axis=3)


def dark_udp(heatmaps: Any, kernel: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps -> sub-pixel keypoints: argmax + DARK-UDP (mmpose `post_dark_udp`), vectorised.

    The maps are blurred (kernel 11 for sigma 2), clipped to [0.001, 50] and logged; the argmax is then
    moved by one Newton step, -(Hessian + eps I)^-1 gradient, from central differences on the
    edge-padded log map. Only the neighbourhood of each peak is blurred, in float64 (mmpose blurs whole
    maps in float32; results agree to ~1e-5 px). Scores are the raw maxima. Joints whose maximum is <= 0
    stay at -1 (mmpose would "refine" that -1 against the padding).

    Args:
        heatmaps: float [N, K, h, w] (numpy; a torch tensor is moved to the CPU).

    Returns:
        coords: float32 [N, K, 2] heatmap pixels (x, y); scores: float32 [N, K].
    """
    maps = _as_maps(heatmaps)
    coords, scores = get_max_preds(maps)
    valid = scores > 0
    px = np.where(valid, coords[..., 0], 0).astype(np.int64)
    py = np.where(valid, coords[..., 1], 0).astype(np.int64)

    nb = _blurred_log_3x3(maps, px, py, kernel)  # nb[..., 1 + dy, 1 + dx]
    i0 = nb[..., 1, 1]
    dx = 0.5 * (nb[..., 1, 2] - nb[..., 1, 0])
    dy = 0.5 * (nb[..., 2, 1] - nb[..., 0, 1])
    dxx = nb[..., 1, 2] - 2 * i0 + nb[..., 1, 0]
    dyy = nb[..., 2, 1] - 2 * i0 + nb[..., 0, 1]
    # mmpose's mixed difference uses only the (+1, +1) and (-1, -1) diagonal neighbours.
    dxy = 0.5 * (nb[..., 2, 2] - nb[..., 1, 2] - nb[..., 2, 1] + 2 * i0
                 - nb[..., 1, 0] - nb[..., 0, 1] + nb[..., 0, 0])

    # Closed-form inverse of (Hessian + eps I), the matrix mmpose inverts.
    eps = float(np.finfo(np.float32).eps)
    a, b, d = dxx + eps, dxy, dyy + eps
    det = a * d - b * b
    ok = valid & (det != 0) & np.isfinite(det)
    safe_det = np.where(ok, det, 1.0)
    step_x = (d * dx - b * dy) / safe_det
    step_y = (-b * dx + a * dy) / safe_det
    refined = coords.astype(np.float64)
    refined[..., 0] -= np.where(ok, step_x, 0.0)
    refined[..., 1] -= np.where(ok, step_y, 0.0)
    return refined.astype(np.float32), scores


# The log-map samples TokenPose's Taylor step reads, as (dx, dy) offsets from the peak.
_TAYLOR_TAPS = ((0, 0), (1, 0), (-1, 0), (2, 0), (-2, 0), (0, 1), (0, -1), (0, 2), (0, -2),
                (1, 1), (1, -1), (-1, 1), (-1, -1))


def dark_tokenpose(heatmaps: Any, kernel: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps -> sub-pixel keypoints as TokenPose tests (`get_final_preds`, POST_PROCESS, BLUR_KERNEL 11).

    The argmax of each raw map (its maximum is the score; a map whose maximum is <= 0 decodes to (0, 0),
    TokenPose's mask, not mmpose's -1) is moved by -H^-1 g on log(max(`blur_zero_border`(map), 1e-10)),
    only when the peak is two pixels or more inside the map (1 < x < w-2, 1 < y < h-2) and det H != 0:
        g = 0.5 (l[x+1] - l[x-1]),  H_xx = 0.25 (l[x+2] - 2 l[x] + l[x-2]),
        H_xy = 0.25 (l[x+1, y+1] - l[x+1, y-1] - l[x-1, y+1] + l[x-1, y-1]), and likewise in y.
    The arithmetic follows TokenPose's under numpy 1.x: log maps in float32, the first and mixed
    differences rounded to float32, the second differences and the step in float64, the result in float32.
    Only maps whose peak is stepped are blurred.

    Args:
        heatmaps: float [N, K, h, w] (numpy; a torch tensor is moved to the CPU).

    Returns:
        coords: float32 [N, K, 2] heatmap pixels (x, y); scores: float32 [N, K].
    """
    maps = _as_maps(heatmaps)
    n, k, h, w = maps.shape
    coords, scores = get_max_preds(maps)
    coords[~(scores > 0)] = 0.0  # TokenPose multiplies by (max > 0)
    px, py = coords[..., 0].astype(np.int64), coords[..., 1].astype(np.int64)
    stepped = (px > 1) & (px < w - 2) & (py > 1) & (py < h - 2)
    sel = np.nonzero(stepped)
    if not sel[0].size:
        return coords, scores

    blurred = blur_zero_border(maps[sel], kernel)  # [M, h, w]
    taps = np.array(_TAYLOR_TAPS)
    rows = py[sel][:, None] + taps[:, 1]  # [M, 13]
    cols = px[sel][:, None] + taps[:, 0]
    samples = blurred[np.arange(len(blurred))[:, None], rows, cols]
    log_s = np.log(np.maximum(samples, np.float32(1e-10)))  # float32
    (c, xp, xm, xpp, xmm, yp, ym, ypp, ymm, pp, pm, mp, mm) = log_s.T
    f64 = np.float64
    dx = 0.5 * (xp - xm).astype(f64)
    dy = 0.5 * (yp - ym).astype(f64)
    dxx = 0.25 * (xpp.astype(f64) - 2 * c.astype(f64) + xmm.astype(f64))
    dyy = 0.25 * (ypp.astype(f64) - 2 * c.astype(f64) + ymm.astype(f64))
    dxy = 0.25 * (pp - pm - mp + mm).astype(f64)
    det = dxx * dyy - dxy ** 2
    ok = det != 0  # a nan det passes, as in TokenPose, and makes the keypoint nan
    safe_det = np.where(ok, det, 1.0)
    step_x = np.where(ok, (dyy * dx - dxy * dy) / safe_det, 0.0)
    step_y = np.where(ok, (dxx * dy - dxy * dx) / safe_det, 0.0)
    coords[sel] = (coords[sel].astype(f64) - np.stack([step_x, step_y], axis=-1)).astype(np.float32)
    return coords, scores
