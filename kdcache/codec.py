"""Keypoint codecs: how a crop is cut, and keypoints <-> heatmaps, as each teacher family trains and tests.

A codec owns the crop size, the heatmap size and the target sigma; callers hold one object instead of passing
the three numbers around. Two codecs, the same methods:

- `UDPHeatmap` (ViTPose, from mmpose 0.x): unbiased data processing (UDP). Heatmap pixel i and crop pixel
  i * (W_in-1)/(w-1) are the same point, in x and y separately. Targets: `TopDownGenerateTarget` with
  encoding='UDP' (Gaussian cut to a 6 sigma + 1 window); crops: `get_warp_matrix`; decoding:
  `keypoints_from_heatmaps(use_udp=True, kernel=11)`, i.e. `heatmap_decode.dark_udp`.
- `TokenPoseHeatmap` (TokenPose, github leeyegy/TokenPose, lib/utils/transforms.py,
  lib/dataset/JointsDataset.py, lib/core/inference.py): crop and heatmap are cut by one similarity
  (`get_affine_transform`, with (size-1) and centres at (size-1)/2) at the two output sizes, so both axes
  share the width's stride (W_in-1)/(w-1) and y has an offset; Gaussian targets over the whole map; decoding
  by the original DARK (`heatmap_decode.dark_tokenpose`).

Both flip heatmaps without a one-pixel shift (pixel x mirrors to w-1-x exactly on either grid).

A codec is recorded in every cache (`to_record`) and rebuilt from it (`codec_from_record`), so a student's
targets are checked to be the teacher's kind. A new codec is one more class with the same methods, and its
entry in `CODECS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from kdcache.errors import UserError
from kdcache.heatmap_decode import dark_tokenpose, dark_udp
from kdcache.keypoints import KeypointSet

HEATMAP_STRIDE = 4              # nominal crop pixels per heatmap pixel: 256x192 crops -> 64x48 heatmaps
DEFAULT_SIGMA = 2.0             # ViTPose's target Gaussian, in heatmap pixels
DEFAULT_INPUT_HW = (256, 192)   # ViTPose's crop (H, W)


def heatmap_hw_for(input_hw: tuple[int, int]) -> tuple[int, int]:
    """Heatmaps are at stride 4 of the input: 256x192 -> 64x48."""
    return input_hw[0] // HEATMAP_STRIDE, input_hw[1] // HEATMAP_STRIDE


def closest_to_4_3(shapes: list[tuple[int, int]]) -> tuple[int, int]:
    """The (h, w) of `shapes` whose h / w is closest to 4:3, the aspect of every ViTPose and TokenPose crop: how
    a grid, a heatmap or a patch is told from a weight file's count of cells alone."""
    return min(shapes, key=lambda hw: abs(math.log(hw[0] / hw[1] / (4 / 3))))


def factor_pairs(cells: int) -> list[tuple[int, int]]:
    """Every (h, w) with h * w == `cells`."""
    return [(h, cells // h) for h in range(1, cells + 1) if cells % h == 0]


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
class _HeatmapCodec:
    """What every codec shares: its sizes and sigma, heatmap -> crop pixels by its `heatmap_affine`, flips
    without a shift, and its record. A codec adds `name`, `stride`, `heatmap_affine`, `crop_affine`, `encode`
    and `decode`."""

    input_hw: tuple[int, int] = DEFAULT_INPUT_HW  # crop (H, W) in pixels
    heatmap_hw: tuple[int, int] = heatmap_hw_for(DEFAULT_INPUT_HW)  # heatmap (h, w)
    sigma: float = DEFAULT_SIGMA  # target Gaussian, heatmap pixels

    name: ClassVar[str]
    # DARK's Gaussian blur before the log: ViTPose's modulate_kernel and TokenPose's TEST.BLUR_KERNEL.
    blur_kernel: ClassVar[int] = 11

    @classmethod
    def for_input(cls, input_hw: tuple[int, int], sigma: float = DEFAULT_SIGMA) -> _HeatmapCodec:
        """The codec (of this class) of crops of `input_hw`, with heatmaps at stride 4."""
        return cls(tuple(input_hw), heatmap_hw_for(input_hw), float(sigma))

    def heatmap_to_crop(self, coords: np.ndarray) -> np.ndarray:
        """Heatmap pixels [..., 2] -> crop pixels [..., 2] (float64), by `heatmap_affine` (a scale per axis and
        an offset)."""
        affine = self.heatmap_affine
        return np.asarray(coords, dtype=np.float64) * affine[[0, 1], [0, 1]] + affine[:, 2]

    def flip(self, heatmaps: Any, keypoint_set: KeypointSet) -> Any:
        """Heatmaps of the mirrored crop -> heatmaps of the crop, numpy or torch (`flip_heatmaps`)."""
        return flip_heatmaps(heatmaps, keypoint_set.flip_index)

    def to_record(self) -> dict[str, Any]:
        """What a cache records about the codec of its targets (JSON values)."""
        return {"name": self.name, "input_hw": list(self.input_hw), "heatmap_hw": list(self.heatmap_hw),
                "sigma": float(self.sigma)}


@dataclass(frozen=True)
class UDPHeatmap(_HeatmapCodec):
    """ViTPose's codec: UDP crops, UDP Gaussian targets, argmax + DARK-UDP decoding, shift-free flips."""

    name: ClassVar[str] = "udp-heatmap"

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

    @property
    def heatmap_affine(self) -> np.ndarray:
        """Heatmap pixels -> crop pixels, float64 [2, 3]: diag(stride), no offset."""
        stride_x, stride_y = self.stride
        return np.array([[stride_x, 0.0, 0.0], [0.0, stride_y, 0.0]])


def tokenpose_affine(center: np.ndarray, scale_wh: np.ndarray, rot_deg: float,
                     out_hw: tuple[int, int]) -> np.ndarray:
    """TokenPose's warp, image pixels -> output pixels (its `get_affine_transform`), in closed form.

    TokenPose builds a similarity from three points: the center goes to ((W-1)/2, (H-1)/2), a vector of
    length (src_w-1)/2 turned by `rot_deg` to one of length (W-1)/2 straight up, and the third points
    perpendicular to both. So the scale is (W-1)/(src_w-1) on both axes, with src_w = `scale_wh[0]` (TokenPose's
    scale * 200); `scale_wh[1]` is not used. A positive `rot_deg` turns image +x towards output -y: the
    opposite of `udp_affine`'s sign.

    Args:
        center: [2] image pixels (x, y); scale_wh: [2] region (w, h) in image pixels; out_hw: output (H, W).

    Returns:
        float64 [2, 3].
    """
    h_out, w_out = out_hw
    theta = np.deg2rad(rot_deg)
    cos, sin = np.cos(theta), np.sin(theta)
    s = (w_out - 1.0) / (float(scale_wh[0]) - 1.0)
    linear = s * np.array([[cos, sin], [-sin, cos]])
    shift = np.array([(w_out - 1.0) / 2, (h_out - 1.0) / 2]) - linear @ np.asarray(center, dtype=np.float64)
    return np.concatenate([linear, shift[:, None]], axis=1)


def tokenpose_grid(input_hw: tuple[int, int], heatmap_hw: tuple[int, int]) -> tuple[float, np.ndarray]:
    """Where TokenPose's heatmap pixels lie in the crop: crop = stride * heatmap + offset.

    Crop and heatmap are `tokenpose_affine` of one region at two sizes, so their centres ((W-1)/2, (H-1)/2)
    and ((w-1)/2, (h-1)/2) coincide and the scale ratio is the width's, stride = (W_in-1)/(w-1) on both axes.
    x has no offset; y has one unless (H_in-1)/(h-1) is that stride too (256x192 -> 64x48: heatmap row 0 is
    crop y = -0.51).

    Returns:
        stride; offset float64 [2] (x, y), crop pixels.
    """
    (h_in, w_in), (h, w) = input_hw, heatmap_hw
    stride = (w_in - 1.0) / (w - 1.0)
    return stride, np.array([0.0, (h_in - 1.0) / 2 - stride * (h - 1.0) / 2])


def tokenpose_gaussians(keypoints_crop: np.ndarray, input_hw: tuple[int, int], heatmap_hw: tuple[int, int],
                        sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """TokenPose's Gaussian targets (`JointsDataset.generate_target` and `adjust_target_weight`).

    mu is the keypoint on the heatmap grid (`tokenpose_grid`); the map is exp(-d^2 / (2 sigma^2)) over the
    whole heatmap (peak 1, no window). The weight is 1 for a labelled joint (v > 0; COCO's v is 1 or 2, which
    TokenPose clips to 1) and 0 when v == 0 or the 3-sigma box misses the heatmap by TokenPose's test:
    int(mu - 3 sigma) >= size or int(mu + 3 sigma + 1) < 0, int() truncating toward zero. A joint of weight 0
    has an all-zero map. The Gaussian is computed in float32 from mu rounded to float32, as numpy 1.x
    evaluates TokenPose's float32 grid minus a float64 mu.

    Args:
        keypoints_crop: [K, 3] x, y in crop pixels, v.

    Returns:
        heatmaps: float32 [K, h, w]; target_weight: float32 [K].
    """
    kpts = np.asarray(keypoints_crop, dtype=np.float64)
    h, w = heatmap_hw
    stride, offset = tokenpose_grid(input_hw, heatmap_hw)
    mu = (kpts[:, :2] - offset) / stride  # [K, 2] heatmap pixels
    radius = 3.0 * sigma
    finite = np.isfinite(mu).all(axis=1)
    mu = np.where(finite[:, None], mu, 0.0)
    ul, br = np.trunc(mu - radius), np.trunc(mu + radius + 1)
    outside = (ul[:, 0] >= w) | (ul[:, 1] >= h) | (br[:, 0] < 0) | (br[:, 1] < 0) | ~finite
    weight = ((kpts[:, 2] > 0) & ~outside).astype(np.float32)

    mu32 = np.where(weight[:, None] > 0, mu, 0.0).astype(np.float32)
    dx2 = (np.arange(w, dtype=np.float32)[None, None, :] - mu32[:, 0, None, None]) ** 2
    dy2 = (np.arange(h, dtype=np.float32)[None, :, None] - mu32[:, 1, None, None]) ** 2
    heatmaps = np.exp(-(dx2 + dy2) / np.float32(2 * sigma ** 2))
    heatmaps[weight == 0] = 0.0
    return heatmaps, weight


@dataclass(frozen=True)
class TokenPoseHeatmap(_HeatmapCodec):
    """TokenPose's codec: similarity crops, whole-map Gaussian targets, argmax + DARK, shift-free flips (its
    `flip_back`; its validate has no shift). Its configs use sigma 2 at 256x192, 3 at 384x288."""

    name: ClassVar[str] = "tokenpose-heatmap"

    @property
    def stride(self) -> tuple[float, float]:
        """(x, y) crop pixels per heatmap pixel: (W_in-1)/(w-1) on both axes (y also has an offset:
        `heatmap_affine`)."""
        stride, _ = tokenpose_grid(self.input_hw, self.heatmap_hw)
        return stride, stride

    def crop_affine(self, center: np.ndarray, scale_wh: np.ndarray, rot_deg: float) -> np.ndarray:
        """Image pixels -> crop pixels, float64 [2, 3] (`tokenpose_affine`)."""
        return tokenpose_affine(center, scale_wh, rot_deg, self.input_hw)

    def encode(self, keypoints_crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """keypoints_crop [K, 3] (x, y crop pixels, v) -> targets float32 [K, h, w], weights float32 [K]."""
        return tokenpose_gaussians(keypoints_crop, self.input_hw, self.heatmap_hw, self.sigma)

    def decode(self, heatmaps: Any) -> tuple[np.ndarray, np.ndarray]:
        """heatmaps [N, K, h, w] -> keypoints float64 [N, K, 2] in crop pixels (x, y), scores float32 [N, K]."""
        coords, scores = dark_tokenpose(heatmaps, self.blur_kernel)
        return self.heatmap_to_crop(coords), scores

    @property
    def heatmap_affine(self) -> np.ndarray:
        """Heatmap pixels -> crop pixels, float64 [2, 3]: stride on both axes plus the y offset (TokenPose's
        `transform_preds` composed with the crop's affine)."""
        stride, offset = tokenpose_grid(self.input_hw, self.heatmap_hw)
        return np.array([[stride, 0.0, offset[0]], [0.0, stride, offset[1]]])


Codec = UDPHeatmap | TokenPoseHeatmap

# Codecs by the name a cache records.
CODECS: dict[str, type[Codec]] = {UDPHeatmap.name: UDPHeatmap, TokenPoseHeatmap.name: TokenPoseHeatmap}


def codec_from_record(record: dict[str, Any]) -> Codec:
    """The codec a cache recorded (`to_record`)."""
    kind = CODECS.get(record.get("name"))
    if kind is None:
        raise UserError(f"the cache's targets were made by codec {record.get('name')!r}, which this kdcache does "
                        f"not know (it knows {', '.join(CODECS)}); update kdcache")
    return kind(tuple(record["input_hw"]), tuple(record["heatmap_hw"]), float(record["sigma"]))
