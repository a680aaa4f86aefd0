"""Pictures for people: crops with their heatmaps and decoded skeleton, tiled into one PNG contact sheet;
predictions drawn over the ground truth on whole images (`kdcache eval --vis`).

Drawing is pure numpy + OpenCV, RGB throughout (converted to BGR only when the file is written).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools.coco import COCO

from kdcache.codec import Codec
from kdcache.coco import as_coco, instances_from_coco, keypoint_set_of
from kdcache.images import read_image
from kdcache.errors import UserError
from kdcache.keypoints import KeypointSet

# RGB. Left and right must differ at a glance (a left/right swap is the classic pose bug); magenta and white
# do not occur in the JET heatmap overlay, so the skeleton stays readable on top of it.
LEFT_RGB = (255, 0, 255)
RIGHT_RGB = (0, 255, 0)
CENTER_RGB = (255, 255, 255)
# Evaluation pictures (`draw_predictions`): one colour for the ground truth, one for the predictions.
GT_RGB = (0, 255, 0)
PRED_RGB = (255, 64, 0)
VIS_KEYPOINT_THR = 0.3  # predicted joints drawn by `eval --vis` (mmpose's kpt_score_thr for pictures)
HEAT_ALPHA = 0.6  # overlay opacity where the heatmap is 1; it fades to 0 with the heat, keeping the crop visible
_SHIFT = 4  # OpenCV fixed-point bits: sub-pixel keypoints drawn where they are, not rounded


def _side_rgb(keypoint_set: KeypointSet, k: int) -> tuple[int, int, int]:
    name = keypoint_set.names[k] if k < keypoint_set.num_keypoints else ""
    return LEFT_RGB if name.startswith("left_") else RIGHT_RGB if name.startswith("right_") else CENTER_RGB


def draw_pose(image_rgb: np.ndarray, keypoints_xy: np.ndarray, scores: np.ndarray, keypoint_set: KeypointSet,
              threshold: float = 0.2, color: tuple[int, int, int] | None = None,
              radius: int | None = None) -> np.ndarray:
    """Skeleton on a copy of `image_rgb`: left limbs magenta, right green, the rest (head, torso bars) white.

    Args:
        image_rgb: uint8 [H, W, 3].
        keypoints_xy: float [K, 2] pixel coordinates (x, y) in `image_rgb`.
        keypoint_set: the skeleton, and the names that say which joints are left and right.
        scores: float [K]; keypoints below `threshold` (or not finite) are not drawn, nor their limbs.
        color: RGB for every limb and joint instead of the left/right/centre colours.
        radius: joint dot radius in pixels (default: line thickness + 1).

    Returns:
        uint8 [H, W, 3] RGB.
    """
    out = np.ascontiguousarray(image_rgb, dtype=np.uint8).copy()
    xy = np.asarray(keypoints_xy, dtype=np.float64)
    ok = (np.asarray(scores) >= threshold) & np.isfinite(xy).all(axis=1)
    thickness = max(1, round(min(out.shape[:2]) / 128))
    points = [tuple(int(round(v * (1 << _SHIFT))) for v in p) if good else None for p, good in zip(xy, ok)]
    side = lambda k: _side_rgb(keypoint_set, k)  # noqa: E731
    for a, b in keypoint_set.skeleton:  # 1-based, as in the COCO json
        a, b = a - 1, b - 1
        if max(a, b) >= len(points) or points[a] is None or points[b] is None:
            continue
        limb = color or (side(a) if side(a) == side(b) else CENTER_RGB)
        cv2.line(out, points[a], points[b], limb, thickness, cv2.LINE_AA, _SHIFT)
    dot = (thickness + 1 if radius is None else radius) << _SHIFT
    # Points in neither body half (COCO-WholeBody's face and hands) are dense: small dots, so they stay apart.
    halves = set(keypoint_set.upper_body) | set(keypoint_set.lower_body or ())
    fine = max(1, thickness // 2) << _SHIFT
    for k, p in enumerate(points):
        if p is not None:
            cv2.circle(out, p, dot if k in halves else fine, color or side(k), -1, cv2.LINE_AA, _SHIFT)
    return out


def draw_predictions(image_rgb: np.ndarray, gt_keypoints: np.ndarray, pred_keypoints: np.ndarray,
                     pred_scores: np.ndarray, keypoint_set: KeypointSet, threshold: float = 0.3) -> np.ndarray:
    """Ground-truth skeletons (green, larger dots) under predicted ones (orange) with each instance's score.

    Args:
        image_rgb: uint8 [H, W, 3].
        gt_keypoints: float [G, K, 3] image pixels (x, y, COCO visibility); labelled (v > 0) joints are drawn.
        pred_keypoints: float [P, K, 3] image pixels (x, y, score); joints scoring at least `threshold` are drawn.
        pred_scores: float [P] instance scores, written at the top left of each drawn prediction.

    Returns:
        uint8 [H, W, 3] RGB, a new array.
    """
    out = np.ascontiguousarray(image_rgb, dtype=np.uint8).copy()
    H, W = out.shape[:2]
    thickness = max(1, round(min(H, W) / 128))
    font_scale = max(0.4, min(H, W) / 600)
    (_, th), base = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    _text(out, "ground truth", (2, 2), GT_RGB, font_scale)  # legend, under everything else
    _text(out, "prediction", (2, 6 + th + base), PRED_RGB, font_scale)
    for kp in np.asarray(gt_keypoints, dtype=np.float64):
        out = draw_pose(out, kp[:, :2], kp[:, 2], keypoint_set, threshold=1, color=GT_RGB, radius=thickness + 3)
    preds = np.asarray(pred_keypoints, dtype=np.float64)
    # Scores first, skeletons over them: a label never hides a predicted joint.
    for kp, score in zip(preds, np.asarray(pred_scores, dtype=np.float64)):
        shown = (kp[:, 2] >= threshold) & np.isfinite(kp[:, :2]).all(axis=1)
        if shown.any():
            x, y = kp[shown, :2].min(axis=0)
            _text(out, f"{score:.2f}", (int(x), int(y) - 2 * thickness), PRED_RGB, font_scale, anchor="bottom")
    for kp in preds:
        out = draw_pose(out, kp[:, :2], kp[:, 2], keypoint_set, threshold=threshold, color=PRED_RGB)
    return out


def _text(image: np.ndarray, text: str, xy: tuple[int, int], rgb: tuple[int, int, int], font_scale: float,
          anchor: str = "top") -> None:
    """`text` in place on a black box, the box's top-left (or bottom-left) corner at `xy`, kept inside `image`."""
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    H, W = image.shape[:2]
    bw, bh = tw + 4, th + base + 4
    x = min(max(xy[0], 0), max(0, W - bw))
    y = min(max(xy[1] - bh if anchor == "bottom" else xy[1], 0), max(0, H - bh))
    cv2.rectangle(image, (x, y), (x + bw - 1, y + bh - 1), (0, 0, 0), -1)
    cv2.putText(image, text, (x + 2, y + 2 + th), cv2.FONT_HERSHEY_SIMPLEX, font_scale, rgb, 1, cv2.LINE_AA)


def write_png(path: Path, image_rgb: np.ndarray) -> Path:
    """Write uint8 [H, W, 3] RGB to `path` (PNG, or any extension cv2.imwrite knows); parents are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        written = cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2BGR))
    except cv2.error:  # unknown extension
        written = False
    if not written:
        raise UserError(f"could not write the image {path}; use a .png path in a writable folder")
    return path


def heat_overlay(crop_rgb: np.ndarray, heatmaps: np.ndarray, codec: Codec) -> np.ndarray:
    """`crop_rgb` (uint8 [H, W, 3]) with the max over K of `heatmaps` (float [K, h, w], 1 = peak) as JET colours.

    The heatmap is warped with the codec's grid (`heatmap_affine`; UDP: heatmap pixel i at crop pixel
    i*(W-1)/(w-1)), the one its decoding uses, so blobs sit exactly under the decoded keypoints.
    """
    H, W = crop_rgb.shape[:2]
    heat = np.clip(np.asarray(heatmaps, dtype=np.float32).max(axis=0), 0.0, 1.0)
    heat = cv2.warpAffine(heat, codec.heatmap_affine, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    colors = cv2.cvtColor(cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    alpha = (HEAT_ALPHA * heat)[..., None]
    return (crop_rgb * (1 - alpha) + colors * alpha).round().astype(np.uint8)


def render_tile(crop_rgb: np.ndarray, heatmaps: np.ndarray, codec: Codec, keypoint_set: KeypointSet,
                title: str | None = None) -> np.ndarray:
    """One contact-sheet tile: heat overlay + decoded skeleton (+ title), uint8 [H, W, 3] RGB."""
    W = crop_rgb.shape[1]
    xy, scores = codec.decode(heatmaps[None].astype(np.float32))
    tile = draw_pose(heat_overlay(crop_rgb, heatmaps, codec), xy[0], scores[0], keypoint_set)
    if title:
        scale = max(0.3, W / 480)
        (tw, th), base = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        cv2.rectangle(tile, (0, 0), (min(W, tw + 4), th + base + 4), (0, 0, 0), -1)
        cv2.putText(tile, title, (2, th + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, CENTER_RGB, 1, cv2.LINE_AA)
    return tile


def contact_sheet(crops: np.ndarray, heatmaps: np.ndarray, path: Path, codec: Codec,
                  keypoint_set: KeypointSet, cols: int = 8, titles: list[str] | None = None) -> Path:
    """Tile crops with their heatmaps and decoded skeletons into one image file.

    Args:
        crops: uint8 [N, H, W, 3] RGB.
        heatmaps: float32 [N, K, h, w], e.g. [N, 17, 64, 48] teacher heatmaps made by `codec`.
        path: output image (PNG; any extension cv2.imwrite knows); parent folders are created.
        cols: tiles per row; the sheet is ceil(N / cols) × min(cols, N) tiles, unused tiles black.
        titles: optional text per tile, printed at its top left.

    Returns:
        `path`.
    """
    crops, heatmaps = np.asarray(crops), np.asarray(heatmaps)
    if crops.ndim != 4 or crops.shape[-1] != 3 or heatmaps.ndim != 4 or len(crops) != len(heatmaps):
        raise ValueError(f"expected crops [N, H, W, 3] and heatmaps [N, K, h, w], got {crops.shape}, {heatmaps.shape}")
    if len(crops) == 0:
        raise UserError(f"nothing to draw into {path}: no crops")
    if titles is not None and len(titles) != len(crops):
        raise ValueError(f"{len(titles)} titles for {len(crops)} crops")
    n, H, W = crops.shape[:3]
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    sheet = np.zeros((rows * H, cols * W, 3), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        sheet[r * H:(r + 1) * H, c * W:(c + 1) * W] = render_tile(
            crops[i].astype(np.uint8), heatmaps[i], codec, keypoint_set, titles[i] if titles else None
        )
    return write_png(path, sheet)


def write_pictures(ann: Path | COCO, images: Path, results: list[dict[str, Any]], out_dir: Path, count: int,
                   threshold: float = VIS_KEYPOINT_THR) -> list[Path]:
    """One PNG per image for the first `count` images of `ann` (by image id): ground truth and predictions.

    Ground truth is the evaluated instance set (labelled joints); predictions are `results` (what COCOeval
    scores, after OKS-NMS), joints scoring >= `threshold`, each with its instance score. Files are
    `out_dir/<image id, 12 digits>.png`, drawn on the full image.
    """
    coco, name = as_coco(ann)
    keypoint_set = keypoint_set_of(coco, name)
    k = keypoint_set.num_keypoints
    gt: dict[int, list[np.ndarray]] = {}
    for inst in instances_from_coco(coco, name):
        gt.setdefault(inst.image_id, []).append(inst.keypoints)
    pred: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        pred.setdefault(r["image_id"], []).append(r)
    paths = []
    for image_id in sorted(coco.imgs)[:count]:
        img = coco.imgs[image_id]
        image = read_image(Path(images) / img["file_name"], (img["width"], img["height"]))
        gt_kp = np.asarray(gt.get(image_id, []), np.float32).reshape(-1, k, 3)
        mine = pred.get(image_id, [])
        pred_kp = np.asarray([r["keypoints"] for r in mine], np.float32).reshape(-1, k, 3)
        picture = draw_predictions(image, gt_kp, pred_kp, np.asarray([r["score"] for r in mine]), keypoint_set,
                                   threshold)
        paths.append(write_png(Path(out_dir) / f"{image_id:012d}.png", picture))
    return paths
