"""The keypoint codec: how a crop is cut, and keypoints <-> heatmaps (UDP, as ViTPose is trained and tested).

`UDPHeatmap` owns the crop size, the heatmap size and the target sigma; callers hold one object instead of
passing the three numbers around. Under unbiased data processing (UDP) heatmap pixel i and crop pixel
i * (W_in-1)/(w-1) are the same point: the stride is (size-1)/(size-1), not size/size. ViTPose trains with
these targets (mmpose `TopDownGenerateTarget` with encoding='UDP', sigma 2), cuts crops with the UDP warp
(`get_warp_matrix`) and decodes with `keypoints_from_heatmaps(use_udp=True, kernel=11)`.

A codec is recorded in every cache (`to_record`) and rebuilt from it (`codec_from_record`), so a student's
targets are checked to be the teacher's kind. A new codec (TokenPose's classic affine + DARK) is one more
class with the same methods, and its entry in `CODECS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import cv2
import numpy as np

from kdcache.errors import UserError
from kdcache.keypoints import KeypointSet

HEATMAP_STRIDE = 4              # nominal crop pixels per heatmap pixel: 256x192 crops -> 64x48 heatmaps
DEFAULT_SIGMA = 2.0             # ViTPose's target Gaussian, in heatmap pixels
DEFAULT_INPUT_HW = (256, 192)   # ViTPose's crop (H, W)


def heatmap_hw_for(input_hw: tuple[int, int]) -> tuple[int, int]:
    """Heatmaps are at stride 4 of the input: 256x192 -> 64x48."""
    return input_hw[0] // HEATMAP_STRIDE, input_hw[1] // HEATMAP_STRIDE


def heatmap_stride(input_hw: tuple[int, int], heatmap_hw: tuple[int, int]) -> tuple[float, float]:
    """UDP stride (x, y): crop pixels per heatmap pixel, (W_in-1)/(w-1) and (H_in-1)/(h-1)."""
    return ((input_hw[1] - 1.0) / (heatmap_hw[1] - 1.0), (input_hw[0] - 1.0) / (heatmap_hw[0] - 1.0))


def udp_gaussians(keypoints_crop: np.ndarray, input_hw: tuple[int, int], heatmap_hw: tuple[int, int],
                  sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """UDP Gaussian targets (mmpose `_udp_generate_target`, GaussianHeatmap).

    mu = xy / stride with the UDP stride; the map is exp(-d^2 / (2 sigma^2)) (peak 1, not normalised),
    non-zero only in the (6 sigma + 1)^2 window around round(mu), as mmpose cuts it. The weight is 1 for
    a labelled joint (v > 0) and 0 when v == 0 or the window lies outside the heatmap (mmpose's test,
    including its off-by-one at the right/bottom: a window ending exactly at -1 keeps weight 1).
    Bit-identical to mmpose for sigma 2; for a non-integer 3*sigma mmpose's off-centre window is not
    copied (the Gaussian here is always centred on mu).

    Args:
        keypoints_crop: [K, 3] x, y in crop pixels, v.

    Returns:
        heatmaps: float32 [K, h, w]; target_weight: float32 [K].
    """
    kpts = np.asarray(keypoints_crop, dtype=np.float64)
    h, w = heatmap_hw
    stride_x, stride_y = heatmap_stride(input_hw, heatmap_hw)
    mu_x = kpts[:, 0] / stride_x
    mu_y = kpts[:, 1] / stride_y
    radius = 3.0 * sigma
    # int(v + 0.5) in mmpose truncates toward zero; np.trunc keeps that for negative values.
    with np.errstate(invalid="ignore"):
        cx = np.trunc(mu_x + 0.5)
        cy = np.trunc(mu_y + 0.5)
    ul_x, ul_y = np.trunc(cx - radius), np.trunc(cy - radius)
    br_x, br_y = np.trunc(cx + radius + 1), np.trunc(cy + radius + 1)
    outside = (ul_x >= w) | (ul_y >= h) | (br_x < 0) | (br_y < 0) | ~np.isfinite(mu_x + mu_y)
    weight = ((kpts[:, 2] > 0) & ~outside).astype(np.float32)

    xs = np.arange(w, dtype=np.float64)
    ys = np.arange(h, dtype=np.float64)
    gx = np.exp(-((xs[None, :] - mu_x[:, None]) ** 2) / (2 * sigma ** 2))
    gy = np.exp(-((ys[None, :] - mu_y[:, None]) ** 2) / (2 * sigma ** 2))
    # The 2-D Gaussian is separable; the window mask is too.
    gx *= (xs[None, :] >= ul_x[:, None]) & (xs[None, :] < br_x[:, None])
    gy *= (ys[None, :] >= ul_y[:, None]) & (ys[None, :] < br_y[:, None])
    heatmaps = gy[:, :, None] * gx[:, None, :] * weight[:, None, None]
    return np.nan_to_num(heatmaps, nan=0.0).astype(np.float32), weight


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


def dark_udp(heatmaps: np.ndarray, kernel: int = 11) -> tuple[np.ndarray, np.ndarray]:
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
    if not isinstance(heatmaps, np.ndarray) and hasattr(heatmaps, "detach"):  # torch, not imported here
        heatmaps = heatmaps.detach().float().cpu().numpy()
    maps = np.asarray(heatmaps, dtype=np.float32)
    if maps.ndim != 4:
        raise ValueError(f"expected heatmaps [N, K, h, w], got {maps.shape}")
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


def udp_affine(center: np.ndarray, scale_wh: np.ndarray, rot_deg: float,
               input_hw: tuple[int, int]) -> np.ndarray:
    """UDP warp matrix, image pixels -> crop pixels (mmpose `get_warp_matrix`).

    The center maps to ((W-1)/2, (H-1)/2) and the region's half width `scale_wh[0] / 2` to
    (W-1)/2 pixels, i.e. the region spans [0, W-1] x [0, H-1]. A positive `rot_deg` turns image
    +x towards crop +y (mmpose's sign).

    Returns:
        float64 [2, 3].
    """
    h_in, w_in = input_hw
    theta = np.deg2rad(rot_deg)
    cos, sin = np.cos(theta), np.sin(theta)
    sx = (w_in - 1.0) / float(scale_wh[0])
    sy = (h_in - 1.0) / float(scale_wh[1])
    cx, cy = float(center[0]), float(center[1])
    # Rotate about the center, scale, then move the center to the crop's middle.
    return np.array([
        [cos * sx, -sin * sx, sx * (-cx * cos + cy * sin + 0.5 * float(scale_wh[0]))],
        [sin * sy, cos * sy, sy * (-cx * sin - cy * cos + 0.5 * float(scale_wh[1]))],
    ], dtype=np.float64)


def flip_heatmaps(heatmaps: Any, flip_index: tuple[int, ...]) -> Any:
    """Heatmaps of a mirrored crop -> heatmaps of the crop (and vice versa: it is an involution).

    Mirrors the width axis and swaps left/right channels. Under UDP pixel x mirrors to w-1-x exactly,
    so no one-pixel shift is needed (ViTPose's test_cfg has shift_heatmap=False).

    Args:
        heatmaps: [..., K, h, w] numpy array or torch tensor.

    Returns:
        The same type and shape (numpy: a new contiguous array).
    """
    index = list(flip_index)
    if isinstance(heatmaps, np.ndarray):
        return np.ascontiguousarray(heatmaps[..., index, :, ::-1])
    return heatmaps[..., index, :, :].flip(-1)  # torch (not imported here: the cache reader stays torch-free)


@dataclass(frozen=True)
class UDPHeatmap:
    """ViTPose's codec: UDP crops, UDP Gaussian targets, argmax + DARK-UDP decoding, shift-free flips."""

    input_hw: tuple[int, int] = DEFAULT_INPUT_HW  # crop (H, W) in pixels
    heatmap_hw: tuple[int, int] = heatmap_hw_for(DEFAULT_INPUT_HW)  # heatmap (h, w)
    sigma: float = DEFAULT_SIGMA  # target Gaussian, heatmap pixels

    name: ClassVar[str] = "udp-heatmap"
    blur_kernel: ClassVar[int] = 11  # DARK's Gaussian blur before the log (ViTPose's modulate_kernel)

    @classmethod
    def for_input(cls, input_hw: tuple[int, int], sigma: float = DEFAULT_SIGMA) -> UDPHeatmap:
        """The codec of crops of `input_hw`, with heatmaps at stride 4."""
        return cls(tuple(input_hw), heatmap_hw_for(input_hw), float(sigma))

    @property
    def stride(self) -> tuple[float, float]:
        """(x, y) crop pixels per heatmap pixel: (W_in-1)/(w-1) and (H_in-1)/(h-1)."""
        return heatmap_stride(self.input_hw, self.heatmap_hw)

    def crop_affine(self, center: np.ndarray, scale_wh: np.ndarray, rot_deg: float) -> np.ndarray:
        """Image pixels -> crop pixels, float64 [2, 3] (`udp_affine`)."""
        return udp_affine(center, scale_wh, rot_deg, self.input_hw)

    def encode(self, keypoints_crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """keypoints_crop [K, 3] (x, y crop pixels, v) -> targets float32 [K, h, w], weights float32 [K]."""
        return udp_gaussians(keypoints_crop, self.input_hw, self.heatmap_hw, self.sigma)

    def decode(self, heatmaps: Any) -> tuple[np.ndarray, np.ndarray]:
        """heatmaps [N, K, h, w] -> keypoints float64 [N, K, 2] in crop pixels (x, y), scores float32 [N, K]."""
        coords, scores = dark_udp(heatmaps, self.blur_kernel)
        return self.heatmap_to_crop(coords), scores

    def heatmap_to_crop(self, coords: np.ndarray) -> np.ndarray:
        """Heatmap pixels [..., 2] -> crop pixels [..., 2] (float64) with the UDP stride."""
        stride_x, stride_y = self.stride
        out = np.array(coords, dtype=np.float64, copy=True)
        out[..., 0] *= stride_x
        out[..., 1] *= stride_y
        return out

    def flip(self, heatmaps: Any, keypoint_set: KeypointSet) -> Any:
        """Heatmaps of the mirrored crop -> heatmaps of the crop, numpy or torch (`flip_heatmaps`)."""
        return flip_heatmaps(heatmaps, keypoint_set.flip_index)

    def to_record(self) -> dict[str, Any]:
        """What a cache records about the codec of its targets (JSON values)."""
        return {"name": self.name, "input_hw": list(self.input_hw), "heatmap_hw": list(self.heatmap_hw),
                "sigma": float(self.sigma)}


# Codecs by the name a cache records.
CODECS = {UDPHeatmap.name: UDPHeatmap}


def codec_from_record(record: dict[str, Any]) -> UDPHeatmap:
    """The codec a cache recorded (`to_record`)."""
    kind = CODECS.get(record.get("name"))
    if kind is None:
        raise UserError(f"the cache's targets were made by codec {record.get('name')!r}, which this kdcache does "
                        f"not know (it knows {', '.join(CODECS)}); update kdcache")
    return kind(tuple(record["input_hw"]), tuple(record["heatmap_hw"]), float(record["sigma"]))
