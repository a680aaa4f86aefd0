"""Train-time augmentation of student crops that keeps their targets true.

Photometric changes (colour, blur, noise, grayscale) and occlusion patches change pixels, not where the
joints are: the teacher's heatmaps and the ground truth stay the target. `jitter` is the one geometric
change: a small extra affine applied to the crop, the teacher heatmaps and the keypoints together, for
replaying cached views with more variety than the K stored ones.

All functions take crops as uint8 [H, W, 3] RGB and a numpy Generator; none changes its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from kdcache.codec import Codec

LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # RGB -> grey (ITU-R BT.601)


@dataclass(frozen=True)
class StudentAugConfig:
    """Probabilities (0 = off) and strengths; all off by default, as in ViTPose's own recipe."""

    color_prob: float = 0.0      # brightness, contrast and saturation, each x U(1 - color, 1 + color)
    color: float = 0.3
    blur_prob: float = 0.0       # Gaussian blur, sigma ~ U(0.3, blur_sigma) crop pixels
    blur_sigma: float = 1.5
    noise_prob: float = 0.0      # additive Gaussian noise, std ~ U(0, noise_std) grey levels
    noise_std: float = 8.0
    gray_prob: float = 0.0       # grayscale
    occlusion_prob: float = 0.0  # 1-3 rectangles of noise, each side 10-40 % of the crop's
    jitter_prob: float = 0.0     # cached views only: extra rotation / scale / shift of crop and targets
    jitter_rot: float = 10.0     # degrees, uniform in +-
    jitter_scale: float = 0.1    # scale factor uniform in 1 +- this
    jitter_shift: float = 0.05   # shift uniform in +- this fraction of the crop size

    @property
    def changes_pixels(self) -> bool:
        return max(self.color_prob, self.blur_prob, self.noise_prob, self.gray_prob, self.occlusion_prob) > 0


def photometric(crop: np.ndarray, rng: np.random.Generator, cfg: StudentAugConfig) -> np.ndarray:
    """Colour, blur, noise, grayscale and occlusion, each with its probability; the crop's geometry is kept."""
    if not cfg.changes_pixels:
        return crop
    out = crop.astype(np.float32)
    if rng.random() < cfg.color_prob:
        brightness, contrast, saturation = rng.uniform(1 - cfg.color, 1 + cfg.color, size=3)
        out = out * brightness
        out = (out - out.mean()) * contrast + out.mean()
        gray = out @ LUMA
        out = (out - gray[..., None]) * saturation + gray[..., None]
    if rng.random() < cfg.gray_prob:
        out = np.repeat((out @ LUMA)[..., None], 3, axis=2)
    if rng.random() < cfg.blur_prob:
        out = cv2.GaussianBlur(out, (0, 0), sigmaX=rng.uniform(0.3, cfg.blur_sigma))
    if rng.random() < cfg.noise_prob:
        out = out + rng.normal(0.0, rng.uniform(0.0, cfg.noise_std), size=out.shape).astype(np.float32)
    if rng.random() < cfg.occlusion_prob:
        out = occlude(out, rng)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def occlude(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """1-3 rectangles (sides 10-40 % of the crop's) filled with uniform noise; [H, W, 3] float32 in and out."""
    out = crop.copy()
    h, w = out.shape[:2]
    for _ in range(rng.integers(1, 4)):
        rh, rw = int(h * rng.uniform(0.1, 0.4)), int(w * rng.uniform(0.1, 0.4))
        y, x = rng.integers(0, h - rh + 1), rng.integers(0, w - rw + 1)
        out[y:y + rh, x:x + rw] = rng.uniform(0, 255, size=(rh, rw, 3))
    return out


def jitter_affine(input_hw: tuple[int, int], rng: np.random.Generator, cfg: StudentAugConfig) -> np.ndarray:
    """A random [2, 3] affine of crop pixels about the crop centre: rotation, scale, shift."""
    h, w = input_hw
    angle = rng.uniform(-cfg.jitter_rot, cfg.jitter_rot)
    scale = rng.uniform(1 - cfg.jitter_scale, 1 + cfg.jitter_scale)
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, scale)
    m[:, 2] += rng.uniform(-cfg.jitter_shift, cfg.jitter_shift, size=2) * (w, h)
    return m


def jitter(crop: np.ndarray, heatmaps: np.ndarray, keypoints: np.ndarray, rng: np.random.Generator,
           cfg: StudentAugConfig, codec: Codec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Warp crop, teacher heatmaps and keypoints by one small random affine (probability `jitter_prob`).

    Args:
        crop: uint8 [H, W, 3]; heatmaps: float32 [K, h, w] made by `codec` (its `heatmap_affine` maps heatmap
        pixels to crop pixels); keypoints: float32 [K, 3] crop pixels and visibility.
    Returns:
        The three warped; joints pushed outside the crop get visibility 0.
    """
    if rng.random() >= cfg.jitter_prob:
        return crop, heatmaps, keypoints
    (h_in, w_in), (h_hm, w_hm) = crop.shape[:2], heatmaps.shape[-2:]
    m = jitter_affine((h_in, w_in), rng, cfg)
    crop = cv2.warpAffine(crop, m, (w_in, h_in), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    # The same motion in heatmap pixels: A^-1 m A, A = the codec's heatmap -> crop affine (UDP: diag(stride);
    # TokenPose: its stride on both axes plus a y offset).
    to_crop = np.vstack([codec.heatmap_affine, [0.0, 0.0, 1.0]])
    m_hm = (np.linalg.inv(to_crop) @ np.vstack([m, [0.0, 0.0, 1.0]]) @ to_crop)[:2]
    warped = np.stack([cv2.warpAffine(hm, m_hm, (w_hm, h_hm), flags=cv2.INTER_LINEAR,
                                      borderMode=cv2.BORDER_CONSTANT) for hm in heatmaps])
    kp = keypoints.copy()
    kp[:, :2] = keypoints[:, :2] @ m[:, :2].T + m[:, 2]
    outside = (kp[:, 0] < 0) | (kp[:, 0] > w_in - 1) | (kp[:, 1] < 0) | (kp[:, 1] > h_in - 1)
    kp[outside, 2] = 0
    return crop, warped.astype(np.float32), kp
