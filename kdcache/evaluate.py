"""Stage 3: any model on a COCO annotation file, scored with pycocotools' keypoint COCOeval.

Pipeline as ViTPose evaluates: person boxes (ground truth, or detections with scores) -> UDP crop
-> model (optionally flip-averaged) -> argmax + DARK-UDP decode -> image coordinates -> instance
score = box score x mean keypoint score over keypoints above 0.2 -> OKS-NMS at 0.9 per image -> COCOeval
(mmpose 0.x `TopDownCocoDataset.evaluate` with use_nms, vis_thr 0.2, oks_thr 0.9). `--vis` draws the
scored predictions over the ground truth.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdcache import heatmaps as codec
from kdcache.checkpoint import load_model, model_input_hw
from kdcache.coco import instances_from_coco, load_coco, load_instances, read_image
from kdcache.config import EvalConfig
from kdcache.errors import UserError
from kdcache.keypoints import NUM_KEYPOINTS, OKS_SIGMAS
from kdcache.transforms import bbox_to_center_scale, crop_to_image, to_input_tensor, udp_affine, warp_crop
from kdcache.viz import draw_predictions, write_png

log = logging.getLogger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
KEYPOINT_SCORE_THR = 0.2   # keypoints counted in the instance score (ViTPose's vis_thr)
OKS_NMS_THR = 0.9          # ViTPose's oks_thr
VIS_KEYPOINT_THR = 0.3     # predicted joints drawn by --vis (mmpose's kpt_score_thr for pictures)


@dataclass(frozen=True)
class PersonBox:
    image_id: int
    file_name: str
    bbox_xywh: np.ndarray      # float32 [4] image pixels
    score: float               # detector score; 1 for ground-truth boxes


def gt_person_boxes(ann: Path) -> list[PersonBox]:
    """The training/dump instance set (non-crowd, >=1 keypoint, positive area) as boxes of score 1."""
    return [PersonBox(i.image_id, i.file_name, i.bbox_xywh, 1.0) for i in load_instances(ann)]


def detected_person_boxes(ann: Path, dets: Path, score_thr: float) -> list[PersonBox]:
    """Person detections (COCO results format) on the images of `ann`, as ViTPose reads them.

    Kept, as mmpose 0.x `_load_coco_person_detection_results`: category_id 1 (entries without one count as
    persons), score >= `score_thr` (its `det_bbox_thr`, default 0), boxes used as given (not clipped).
    Also dropped, where mmpose would crash or crop nothing: images not in `ann`, boxes without positive area.
    Sorted by image (stable), so each image is read once.
    """
    coco = load_coco(ann)
    if not Path(dets).exists():
        raise UserError(f"detection file {dets} does not exist; pass COCO detection results JSON to --boxes")
    try:
        entries = json.loads(Path(dets).read_text())
    except json.JSONDecodeError:
        raise UserError(f"{dets} is not valid JSON; --boxes takes COCO detection results") from None
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and "image_id" in e and isinstance(e.get("bbox"), list) and len(e["bbox"]) == 4
            for e in entries):
        raise UserError(f"{dets} is not a COCO detection results list ([{{image_id, bbox, score, ...}}])")
    boxes, dropped = [], {"category": 0, "score": 0, "image": 0, "empty": 0}
    for e in entries:
        bbox = np.asarray(e["bbox"], dtype=np.float32)
        reason = ("category" if e.get("category_id", 1) != 1 else "score" if e.get("score", 1.0) < score_thr
                  else "image" if e["image_id"] not in coco.imgs else "empty" if bbox[2] <= 0 or bbox[3] <= 0
                  else None)
        if reason is not None:
            dropped[reason] += 1
            continue
        boxes.append(PersonBox(int(e["image_id"]), coco.imgs[e["image_id"]]["file_name"], bbox,
                               float(e.get("score", 1.0))))
    log.info("%s: %d person boxes (dropped %d other categories, %d below score %g, %d on images not in %s, "
             "%d empty)", dets, len(boxes), dropped["category"], dropped["score"], score_thr, dropped["image"],
             ann, dropped["empty"])
    return sorted(boxes, key=lambda b: b.image_id)


class _BoxCrops(Dataset):
    """Un-augmented UDP crops of person boxes, with the affine that made each."""

    def __init__(self, boxes: list[PersonBox], images_dir: Path, input_hw: tuple[int, int]):
        self.boxes, self.images_dir, self.input_hw = boxes, Path(images_dir), input_hw
        self._name, self._image = None, None

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        box = self.boxes[index]
        if box.file_name != self._name:
            self._image, self._name = read_image(self.images_dir / box.file_name), box.file_name
        center, scale_wh = bbox_to_center_scale(box.bbox_xywh)
        affine = udp_affine(center, scale_wh, 0.0, self.input_hw)
        return {"crop": warp_crop(self._image, affine, self.input_hw), "affine": affine,
                "area": np.float64(scale_wh[0] * scale_wh[1])}


@torch.inference_mode()
def predict_heatmaps(model: nn.Module, crops: torch.Tensor, flip_test: bool) -> torch.Tensor:
    """crops: [N, H, W, 3] uint8 -> heatmaps [N, K, h, w] float32 (flip-averaged when flip_test)."""
    device = next(model.parameters()).device
    x = to_input_tensor(crops).to(device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model(x).float()
        if flip_test:
            mirrored = model(torch.flip(x, dims=[3])).float()
            out = (out + codec.flip_heatmaps(mirrored)) * 0.5
    return out


def heatmaps_to_image(heatmaps: np.ndarray, affines: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
    """Decode heatmaps [N, K, h, w] of crops made by `affines` [N, 2, 3] -> [N, K, 3] (x, y image px, score)."""
    coords, scores = codec.decode(heatmaps)
    crop_xy = codec.heatmap_to_crop(coords, input_hw, heatmaps.shape[-2:])
    image_xy = np.stack([crop_to_image(xy, a) for xy, a in zip(crop_xy, affines)])
    return np.concatenate([image_xy, scores[..., None]], axis=-1).astype(np.float32)


def predict_keypoints(model: nn.Module, boxes: list[PersonBox], images_dir: Path, flip_test: bool = False,
                      batch_size: int = 64, workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints of each box in image pixels.

    Returns:
        keypoints: [N, K, 3] float32 (x, y, score); areas: [N] float64, the crop region's area in image
        pixels (the box made 0.75 w/h and padded 1.25: mmpose's `np.prod(scale * 200)`), for OKS-NMS.
    """
    input_hw = model_input_hw(model)
    loader = DataLoader(_BoxCrops(boxes, images_dir, input_hw), batch_size=batch_size, num_workers=workers)
    keypoints, areas = [], []
    for batch in loader:
        heat = predict_heatmaps(model, batch["crop"], flip_test).cpu().numpy()
        keypoints.append(heatmaps_to_image(heat, batch["affine"].numpy(), input_hw))
        areas.append(batch["area"].numpy())
    if not keypoints:
        return np.zeros((0, NUM_KEYPOINTS, 3), np.float32), np.zeros((0,), np.float64)
    return np.concatenate(keypoints), np.concatenate(areas)


def oks_nms(keypoints: np.ndarray, scores: np.ndarray, areas: np.ndarray, thr: float = OKS_NMS_THR) -> list[int]:
    """Greedy non-maximum suppression by object keypoint similarity; returns kept indices, best first.

    As mmpose 0.x `oks_nms` called by `TopDownCocoDataset.evaluate`: COCO sigmas, every joint counted
    (no vis_thr), a candidate is dropped when its OKS to a kept one is above `thr`.

    keypoints: [N, K, 3] of one image; scores, areas: [N].
    """
    variances = (2 * np.asarray(OKS_SIGMAS)) ** 2
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    while order:
        best, rest = order[0], np.asarray(order[1:], dtype=np.int64)
        keep.append(int(best))
        if rest.size == 0:
            break
        d2 = ((keypoints[rest, :, :2] - keypoints[best, None, :, :2]) ** 2).sum(-1)  # [R, K]
        scale = (areas[best] + areas[rest])[:, None] / 2 + np.spacing(1)
        oks = np.exp(-d2 / variances / scale / 2).mean(-1)
        order = list(rest[oks <= thr])
    return keep


def coco_results(boxes: list[PersonBox], keypoints: np.ndarray, areas: np.ndarray) -> list[dict[str, Any]]:
    """Rescore, OKS-NMS per image, and format as COCO keypoint results."""
    kp_scores = keypoints[..., 2]
    mask = kp_scores > KEYPOINT_SCORE_THR
    mean_kp = np.where(mask.any(-1), (kp_scores * mask).sum(-1) / np.maximum(mask.sum(-1), 1), 0.0)
    scores = np.array([b.score for b in boxes]) * mean_kp
    by_image: dict[int, list[int]] = {}
    for i, box in enumerate(boxes):
        by_image.setdefault(box.image_id, []).append(i)
    results = []
    for image_id, idx in sorted(by_image.items()):
        idx = np.asarray(idx)
        for j in oks_nms(keypoints[idx], scores[idx], areas[idx]):
            i = int(idx[j])
            results.append({"image_id": image_id, "category_id": 1,
                            "keypoints": [round(float(v), 3) for v in keypoints[i].reshape(-1)],
                            "score": float(scores[i])})
    return results


def coco_keypoint_metrics(ann: Path, results: list[dict[str, Any]]) -> dict[str, float]:
    """COCOeval 'keypoints' of `results` against `ann`; the ten summary numbers on a 0-100 scale."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {name: 0.0 for name in METRIC_NAMES}
    gt = load_coco(ann)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "keypoints")
        ev.params.useSegm = None
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) * 100.0 for name, v in zip(METRIC_NAMES, ev.stats)}


def evaluate_model(model: nn.Module, ann: Path, images: Path, boxes: Path | None = None,
                   flip_test: bool = False, box_score_thr: float = 0.0, batch_size: int = 64,
                   workers: int = 0) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Metrics and COCO results of an in-memory model (also used for validation during training)."""
    person_boxes = gt_person_boxes(ann) if boxes is None else detected_person_boxes(ann, boxes, box_score_thr)
    was_training = model.training
    model.eval()
    keypoints, areas = predict_keypoints(model, person_boxes, images, flip_test, batch_size, workers)
    model.train(was_training)
    results = coco_results(person_boxes, keypoints, areas)
    return coco_keypoint_metrics(ann, results), results


def write_pictures(ann: Path, images: Path, results: list[dict[str, Any]], out_dir: Path, count: int,
                   threshold: float = VIS_KEYPOINT_THR) -> list[Path]:
    """One PNG per image for the first `count` images of `ann` (by image id): ground truth and predictions.

    Ground truth is the evaluated instance set (labelled joints); predictions are `results` (what COCOeval
    scores, after OKS-NMS), joints scoring >= `threshold`, each with its instance score. Files are
    `out_dir/<image id, 12 digits>.png`, drawn on the full image.
    """
    coco = load_coco(ann)
    gt: dict[int, list[np.ndarray]] = {}
    for inst in instances_from_coco(coco, ann):
        gt.setdefault(inst.image_id, []).append(inst.keypoints)
    pred: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        pred.setdefault(r["image_id"], []).append(r)
    paths = []
    for image_id in sorted(coco.imgs)[:count]:
        image = read_image(Path(images) / coco.imgs[image_id]["file_name"])
        gt_kp = np.asarray(gt.get(image_id, []), np.float32).reshape(-1, NUM_KEYPOINTS, 3)
        mine = pred.get(image_id, [])
        pred_kp = np.asarray([r["keypoints"] for r in mine], np.float32).reshape(-1, NUM_KEYPOINTS, 3)
        picture = draw_predictions(image, gt_kp, pred_kp, np.asarray([r["score"] for r in mine]), threshold)
        paths.append(write_png(Path(out_dir) / f"{image_id:012d}.png", picture))
    return paths


def evaluate(cfg: EvalConfig) -> dict[str, float]:
    """Stage 3 as a command: load the model, score it, write --metrics-out / --results-out / --vis pictures."""
    model = load_model(cfg.model, cfg.device, expert=cfg.expert)
    metrics, results = evaluate_model(model, cfg.ann, cfg.images, cfg.boxes, cfg.flip_test,
                                      cfg.box_score_thr, cfg.batch_size, cfg.workers)
    if cfg.metrics_out is not None:
        Path(cfg.metrics_out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.metrics_out).write_text(json.dumps(metrics, indent=1))
    if cfg.results_out is not None:
        Path(cfg.results_out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.results_out).write_text(json.dumps(results))
    if cfg.vis_dir is not None:
        write_pictures(cfg.ann, cfg.images, results, cfg.vis_dir, cfg.vis_count)
    return metrics


def format_metrics(metrics: dict[str, float]) -> str:
    """The AP/AR table as pycocotools names it, one line per number."""
    labels = {
        "AP": "AP @[IoU=0.50:0.95 | area=all]", "AP50": "AP @[IoU=0.50 | area=all]",
        "AP75": "AP @[IoU=0.75 | area=all]", "APm": "AP @[IoU=0.50:0.95 | area=medium]",
        "APl": "AP @[IoU=0.50:0.95 | area=large]", "AR": "AR @[IoU=0.50:0.95 | area=all]",
        "AR50": "AR @[IoU=0.50 | area=all]", "AR75": "AR @[IoU=0.75 | area=all]",
        "ARm": "AR @[IoU=0.50:0.95 | area=medium]", "ARl": "AR @[IoU=0.50:0.95 | area=large]",
    }
    return "\n".join(f"{name:5s} {labels[name]:38s} = {metrics[name]:6.2f}" for name in METRIC_NAMES)
