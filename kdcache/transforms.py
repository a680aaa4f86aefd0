"""Crop geometry: box -> (center, scale) -> augmented view -> the codec's affine -> crop and keypoints.

Conventions (ViTPose / mmpose 0.x with `use_udp=True`), in pixel units rather than mmpose's /200:

- `center`: (x, y) in image pixels; `scale_wh`: (w, h) of the crop region in image pixels.
- The affine is float64 [2, 3], image pixels -> crop pixels, made by the codec (`crop_affine`; UDP's maps the
  region's extent onto [0, W-1] x [0, H-1], so pixel centres line up; TokenPose's is its own similarity).
- A horizontal flip never touches the image: the mirror x -> (W-1) - x is composed in crop space
  after the affine, and keypoint rows are permuted by the keypoint set's flip index.
  `cv2.warpAffine(image, affine, (W, H))` therefore gives the (possibly mirrored) crop directly.

Everything here is numpy and OpenCV: the cache reader replays crops with it and imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from kdcache.codec import Codec
from kdcache.keypoints import KeypointSet

# Box padding of `_xywh2cs` / `TopDownGetBboxCenterScale`: context around the person.
BBOX_PADDING = 1.25
# Half-body crops use their own padding (TopDownHalfBodyTransform), on the joints' extent.
HALF_BODY_PADDING = 1.5


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation of ViTPose's COCO pipeline (mmpose 0.x top-down transforms)."""

    flip_prob: float = 0.5  # probability of a horizontal mirror (TopDownRandomFlip)
    half_body_prob: float = 0.3  # probability of a half-body crop (TopDownHalfBodyTransform)
    half_body_min_joints: int = 8  # half-body only with MORE than this many labelled joints
    scale_factor: float = 0.5  # scale x clip(N(1, sf), 1-sf, 1+sf)
    rot_factor: float = 40.0  # rotation clip(N(0, rf), -2rf, 2rf) degrees ...
    rot_prob: float = 0.6  # ... applied with this probability, else 0
    shift_factor: float = 0.16  # center += U(-1, 1) * shift_factor * scale_wh (TopDownRandomShiftBboxCenter)
    shift_prob: float = 0.3  # probability of the center shift


@dataclass(frozen=True)
class ViewGeometry:
    """The geometry of one view of one instance.

    Attributes:
        center: float64 [2], crop center in image pixels (after shift / half-body).
        scale_wh: float64 [2], crop region (w, h) in image pixels (after half-body / scaling).
        rot_deg: rotation in degrees, as passed to the codec's `crop_affine`.
        flip: whether the crop is mirrored (mirror composed after the affine).
        affine: float64 [2, 3], image pixels -> crop pixels, mirror included.
    """

    center: np.ndarray
    scale_wh: np.ndarray
    rot_deg: float
    flip: bool
    affine: np.ndarray


def bbox_to_center_scale(bbox_xywh: np.ndarray | tuple[float, ...], aspect_wh: float = 0.75,
                         padding: float = BBOX_PADDING) -> tuple[np.ndarray, np.ndarray]:
    """Box -> (center, scale_wh) as mmpose's `_xywh2cs` (without its random shift).

    The center is the box center; the short side is enlarged so that w / h == aspect_wh; both sides
    are then multiplied by `padding`.

    Returns:
        center: float64 [2] image pixels; scale_wh: float64 [2] image pixels.
    """
    x, y, w, h = (float(v) for v in bbox_xywh[:4])
    center = np.array([x + 0.5 * w, y + 0.5 * h], dtype=np.float64)
    if w > aspect_wh * h:
        h = w / aspect_wh
    elif w < aspect_wh * h:
        w = h * aspect_wh
    return center, np.array([w, h], dtype=np.float64) * padding


def mirror_affine(affine: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
    """Compose the crop-space mirror x -> (W-1) - x after `affine`.

    Returns:
        float64 [2, 3].
    """
    w_in = input_hw[1]
    out = np.array(affine, dtype=np.float64, copy=True)
    out[0] = -out[0]
    out[0, 2] += w_in - 1.0
    return out


def half_body_center_scale(keypoints: np.ndarray, halves: tuple[tuple[int, ...], tuple[int, ...]], upper_first: bool,
                           aspect_wh: float, padding: float = HALF_BODY_PADDING
                           ) -> tuple[np.ndarray, np.ndarray] | None:
    """Crop around the upper or the lower body (mmpose `TopDownHalfBodyTransform.half_body_transform`).

    The upper body is chosen when `upper_first` and it has more than 2 labelled joints, else the lower
    body when it has more than 2, else the upper body. Center = mean of the chosen joints; extent = their
    bounding box, fixed to `aspect_wh` by enlarging the short side, times `padding`.

    Args:
        keypoints: [K, 3] image pixels and visibility; joints with v > 0 count.
        halves: (upper, lower) joint indices, the keypoint set's (`upper_body`, `lower_body`); joints in neither
            (a whole-body set's face and hands) count for neither half, as mmpose's "upper"/"lower" types say.
        upper_first: mmpose draws `randn() < 0.5` (true with probability ~0.69) for this.

    Returns:
        (center, scale_wh) float64 [2] each, or None when no usable half-body crop exists.
    """
    labelled = keypoints[:, 2] > 0
    upper = keypoints[[i for i in halves[0] if labelled[i]], :2]
    lower = keypoints[[i for i in halves[1] if labelled[i]], :2]
    if upper_first and len(upper) > 2:
        chosen = upper
    elif len(lower) > 2:
        chosen = lower
    else:
        chosen = upper
    if len(chosen) < 2:
        return None
    chosen = chosen.astype(np.float64)
    center = chosen.mean(axis=0)
    w, h = chosen.max(axis=0) - chosen.min(axis=0)
    if w > aspect_wh * h:
        h = w / aspect_wh
    elif w < aspect_wh * h:
        w = h * aspect_wh
    if w <= 0 or h <= 0:
        # Coincident joints would give a zero-size crop (a singular warp in mmpose); skip instead.
        return None
    return center, np.array([w, h], dtype=np.float64) * padding


@dataclass(frozen=True)
class ViewSampler:
    """The views of instances, each reproducible from (seed, ann_id, view) alone."""

    aug: AugmentConfig            # ViTPose's view augmentation
    codec: Codec                  # crop size and the affine that cuts a crop
    keypoint_set: KeypointSet     # which joints are upper body (half-body crops)
    seed: int                     # with ann_id and view, decides every random number of a view

    def geometry(self, bbox_xywh: np.ndarray, keypoints: np.ndarray, ann_id: int, view: int) -> ViewGeometry:
        """The geometry of view `view` of an instance.

        View 0 is the plain crop (box center/scale, no rotation, no flip). Other views follow ViTPose's
        training pipeline in its order: center shift, flip, half-body, random scale and rotation, UDP
        affine. Every random number is drawn up front from `np.random.default_rng([seed, ann_id, view])`,
        so each parameter depends only on its own draw.

        The mirror is composed in crop space after the rotation; that equals mmpose's flip-then-rotate
        with the angle negated, and the angle distribution is symmetric, so the distribution of views is
        ViTPose's. Half-body on the unmirrored joints is the mirror of half-body on mirrored joints (the
        upper/lower sets are closed under the left/right swap).

        Args:
            bbox_xywh: [4] image pixels (clipped box).
            keypoints: [K, 3] image pixels and visibility (for the half-body crop).
            ann_id, view: non-negative integers.
        """
        seed, aug, input_hw = self.seed, self.aug, self.codec.input_hw
        if view < 0 or seed < 0 or ann_id < 0:
            raise ValueError(f"seed, ann_id and view must be non-negative, got {seed}, {ann_id}, {view}")
        aspect_wh = input_hw[1] / input_hw[0]
        center, scale_wh = bbox_to_center_scale(bbox_xywh, aspect_wh, BBOX_PADDING)
        rot_deg, flip = 0.0, False
        if view > 0:
            rng = np.random.default_rng([int(seed), int(ann_id), int(view)])
            u_shift, u_flip, u_half, u_rot = rng.random(4)
            shift = rng.uniform(-1.0, 1.0, 2)
            n_half, n_scale, n_rot = rng.standard_normal(3)

            if u_shift < aug.shift_prob:
                center = center + shift * aug.shift_factor * scale_wh
            flip = bool(u_flip <= aug.flip_prob)
            num_labelled = int(np.count_nonzero(keypoints[:, 2] > 0))
            if num_labelled > aug.half_body_min_joints and u_half < aug.half_body_prob:
                half = half_body_center_scale(keypoints, (self.keypoint_set.upper_body, self.keypoint_set.lower_body),
                                              bool(n_half < 0.5), aspect_wh)
                if half is not None:
                    center, scale_wh = half
            sf, rf = aug.scale_factor, aug.rot_factor
            scale_wh = scale_wh * float(np.clip(n_scale * sf + 1.0, 1.0 - sf, 1.0 + sf))
            if u_rot <= aug.rot_prob:
                rot_deg = float(np.clip(n_rot * rf, -2.0 * rf, 2.0 * rf))

        affine = self.codec.crop_affine(center, scale_wh, rot_deg)
        if flip:
            affine = mirror_affine(affine, input_hw)
        return ViewGeometry(center=np.asarray(center, dtype=np.float64),
                            scale_wh=np.asarray(scale_wh, dtype=np.float64),
                            rot_deg=rot_deg, flip=flip, affine=affine)


def warp_crop(image_rgb: np.ndarray, affine: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
    """Cut the crop: `cv2.warpAffine` with linear interpolation and black border (as mmpose).

    Args:
        image_rgb: uint8 [H_img, W_img, 3].
        affine: [2, 3] image -> crop pixels.

    Returns:
        uint8 [H, W, 3] with (H, W) = input_hw.
    """
    h_in, w_in = input_hw
    return cv2.warpAffine(image_rgb, np.asarray(affine, dtype=np.float64), (int(w_in), int(h_in)),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def apply_affine(points_xy: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Points [..., 2] through a [2, 3] affine (float64 result)."""
    pts = np.asarray(points_xy, dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64)
    return pts @ affine[:, :2].T + affine[:, 2]


def keypoints_to_crop(keypoints: np.ndarray, affine: np.ndarray, flip: bool,
                      flip_index: tuple[int, ...]) -> np.ndarray:
    """Keypoints in image pixels -> crop pixels of a view.

    x, y go through `affine` (which already contains the mirror of a flipped view); on a flipped view
    the rows are then permuted by `flip_index` so that row "left wrist" holds the joint that looks like
    a left wrist in the mirrored crop. Visibility is carried with its row.

    Args:
        keypoints: [K, 3] x, y image pixels, v.

    Returns:
        float32 [K, 3].
    """
    kpts = np.asarray(keypoints)
    out = np.empty((len(kpts), 3), dtype=np.float32)
    out[:, :2] = apply_affine(kpts[:, :2], affine)
    out[:, 2] = kpts[:, 2]
    if flip:
        out = out[list(flip_index)]
    return out


def crop_to_image(points_xy: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Crop pixels [..., 2] -> image pixels [..., 2] (float64), the inverse of `affine`."""
    affine = np.asarray(affine, dtype=np.float64)
    inverse = cv2.invertAffineTransform(affine)
    return apply_affine(points_xy, inverse)


def flip_crop(crop: np.ndarray) -> np.ndarray:
    """Horizontal mirror of a crop [..., H, W, 3] (a copy; pixel x -> W-1-x)."""
    return np.ascontiguousarray(crop[..., ::-1, :])
