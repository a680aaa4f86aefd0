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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from kdcache import heatmaps as codec
from kdcache.checkpoint import load_model, model_input_hw
from kdcache.coco import (ImageMemo, as_coco, instances_from_coco, is_number, keypoint_count, load_coco,
                          load_keypoint_results, person_category_id)
from kdcache.config import EvalConfig
from kdcache.errors import UserError
from kdcache.keypoints import NUM_KEYPOINTS, OKS_SIGMAS
from kdcache.transforms import bbox_to_center_scale, crop_to_image, to_input_tensor, udp_affine, warp_crop
from kdcache.viz import write_pictures

log = logging.getLogger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
KEYPOINT_SCORE_THR = 0.2   # keypoints counted in the instance score (ViTPose's vis_thr)
OKS_NMS_THR = 0.9          # ViTPose's oks_thr


@dataclass(frozen=True)
class PersonBox:
    image_id: int
    file_name: str
    bbox_xywh: np.ndarray      # float32 [4] image pixels
    score: float               # detector score; 1 for ground-truth boxes
    image_wh: tuple[int, int] | None = None  # (width, height) the annotation file gives the image; checked on read


def gt_person_boxes(ann: Path | COCO) -> list[PersonBox]:
    """The training/dump instance set (non-crowd, >=1 keypoint, positive area) as boxes of score 1."""
    return [PersonBox(i.image_id, i.file_name, i.bbox_xywh, 1.0, i.image_wh)
            for i in instances_from_coco(*as_coco(ann))]


def detected_person_boxes(ann: Path, dets: Path, score_thr: float, coco: COCO | None = None) -> list[PersonBox]:
    """Person detections (COCO results format) on the images of `ann`, as ViTPose reads them.

    Kept, as mmpose 0.x `_load_coco_person_detection_results`: the person category of `ann` (1 in COCO; entries
    without one count as persons), score >= `score_thr` (its `det_bbox_thr`, default 0), boxes used as given
    (not clipped). Also dropped, where mmpose would crash or crop nothing: images not in `ann`, boxes without
    positive area. Sorted by image (stable), so each image is read once. `coco`: `ann` already loaded.

    Raises:
        UserError: the file is missing or not detection results, or no box is left after the filtering.
    """
    coco = load_coco(ann) if coco is None else coco
    person = person_category_id(coco)
    if not Path(dets).exists():
        raise UserError(f"detection file {dets} does not exist; pass COCO detection results JSON to --boxes")
    try:
        entries = json.loads(Path(dets).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{dets} is not valid JSON; --boxes takes COCO detection results") from None
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and "image_id" in e and isinstance(e.get("bbox"), list) and len(e["bbox"]) == 4
            and all(is_number(v) for v in e["bbox"]) and is_number(e.get("score", 1.0)) for e in entries):
        raise UserError(f"{dets} is not a COCO detection results list ([{{image_id, bbox: 4 numbers, score, ...}}])")
    boxes, dropped = [], {"category": 0, "score": 0, "image": 0, "empty": 0}
    for e in entries:
        bbox = np.asarray(e["bbox"], dtype=np.float32)
        image = coco.imgs.get(e["image_id"]) if type(e["image_id"]) is int else None  # "12" is not image 12
        reason = ("category" if e.get("category_id", person) != person else "score" if e.get("score", 1.0) < score_thr
                  else "image" if image is None else "empty" if bbox[2] <= 0 or bbox[3] <= 0 else None)
        if reason is not None:
            dropped[reason] += 1
            continue
        boxes.append(PersonBox(int(e["image_id"]), image["file_name"], bbox, float(e.get("score", 1.0)),
                               (int(image["width"]), int(image["height"]))))
    counts = (f"dropped {dropped['category']} not of category {person} (the person category of {ann}), "
              f"{dropped['score']} below score {score_thr:g}, {dropped['image']} on images not in {ann}, "
              f"{dropped['empty']} empty")
    log.info("%s: %d person boxes (%s)", dets, len(boxes), counts)
    if not boxes:
        raise UserError(f"nothing to score: no person box of the {len(entries)} in {dets} is left ({counts}); "
                        "pass the detections made for these images, or a lower --box-score-thr")
    return sorted(boxes, key=lambda b: b.image_id)


class _BoxCrops(Dataset):
    """Un-augmented UDP crops of person boxes, with the affine that made each."""

    def __init__(self, boxes: list[PersonBox], images_dir: Path, input_hw: tuple[int, int]):
        self.boxes, self.input_hw = boxes, input_hw
        self._images = ImageMemo(images_dir)

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        box = self.boxes[index]
        center, scale_wh = bbox_to_center_scale(box.bbox_xywh)
        affine = udp_affine(center, scale_wh, 0.0, self.input_hw)
        return {"crop": warp_crop(self._images(box.file_name, box.image_wh), affine, self.input_hw), "affine": affine,
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
                      batch_size: int = 64, workers: int = 0, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints of each box in image pixels (`progress`: a bar over the batches).

    Returns:
        keypoints: [N, K, 3] float32 (x, y, score); areas: [N] float64, the crop region's area in image
        pixels (the box made 0.75 w/h and padded 1.25: mmpose's `np.prod(scale * 200)`), for OKS-NMS.
    """
    input_hw = model_input_hw(model)
    loader = DataLoader(_BoxCrops(boxes, images_dir, input_hw), batch_size=batch_size, num_workers=workers)
    keypoints, areas = [], []
    for batch in tqdm(loader, desc="eval", unit="batch", leave=False, disable=not progress):
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


def coco_results(boxes: list[PersonBox], keypoints: np.ndarray, areas: np.ndarray,
                 category_id: int = 1) -> list[dict[str, Any]]:
    """Rescore, OKS-NMS per image, and format as COCO keypoint results of `category_id` (the file's person)."""
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
            results.append({"image_id": image_id, "category_id": int(category_id),
                            "keypoints": [round(float(v), 3) for v in keypoints[i].reshape(-1)],
                            "score": float(scores[i])})
    return results


def require_scorable(coco: COCO, ann: Path) -> None:
    """Refuse, before any inference, a file COCOeval would score as -1 or crash on.

    Raises:
        UserError: not COCO-17 keypoints (COCOeval's OKS sigmas), or no person COCOeval counts (non-crowd,
            num_keypoints > 0): there would be nothing to score.
    """
    if keypoint_count(coco) != NUM_KEYPOINTS:
        raise UserError(f"{ann} has {keypoint_count(coco)} keypoints per person; the COCO keypoint metric (its OKS "
                        f"sigmas) is defined for COCO's {NUM_KEYPOINTS}: pass a COCO-17 person keypoint file")
    person = person_category_id(coco)
    if not any(a.get("category_id") == person and not a.get("iscrowd") and a.get("num_keypoints", 0) > 0
               for a in coco.dataset.get("annotations", [])):
        raise UserError(f"nothing to score: {ann} has no person annotation with labelled keypoints (non-crowd, "
                        "num_keypoints > 0); pass a person keypoint annotation file with ground truth")


def coco_keypoint_metrics(ann: Path | COCO, results: list[dict[str, Any]]) -> dict[str, float | None]:
    """COCOeval 'keypoints' of `results` against `ann` (a file or `load_coco`'s object), on its person category.

    Returns:
        The ten summary numbers on a 0-100 scale; None where COCOeval has nothing to average (it reports -1:
        e.g. APm when no person is medium-sized).

    Raises:
        UserError: nothing to score (no results, or no ground truth COCOeval counts).
    """
    from pycocotools.cocoeval import COCOeval

    gt, source = as_coco(ann)
    require_scorable(gt, source)
    if not results:
        raise UserError(f"nothing to score: no predictions for the images of {source}")
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([dict(r) for r in results])  # loadRes adds id/area/bbox to each: not to the caller's
        ev = COCOeval(gt, dt, "keypoints")
        ev.params.useSegm = None
        ev.params.catIds = [person_category_id(gt)]  # default: every category, person or not
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) * 100.0 if v >= 0 else None for name, v in zip(METRIC_NAMES, ev.stats)}


def _model_keypoints(model: nn.Module) -> int:
    return int(getattr(model, "module", model).config.num_keypoints)


def _person_boxes(coco: COCO, ann: Path, boxes: Path | None, box_score_thr: float) -> list[PersonBox]:
    """What `evaluate_model` scores, checked before any inference."""
    require_scorable(coco, ann)
    if boxes is not None:
        return detected_person_boxes(ann, boxes, box_score_thr, coco=coco)
    person_boxes = gt_person_boxes(coco)
    if not person_boxes:
        raise UserError(f"nothing to score: {ann} has no person with a labelled keypoint and a box of positive "
                        "area inside its image to crop; pass a person keypoint annotation file with ground truth")
    return person_boxes


def _score_model(model: nn.Module, coco: COCO, ann: Path, images: Path, person_boxes: list[PersonBox],
                 flip_test: bool, batch_size: int, workers: int,
                 progress: bool) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    if _model_keypoints(model) != keypoint_count(coco):
        raise UserError(f"the model predicts {_model_keypoints(model)} keypoints but {ann} has "
                        f"{keypoint_count(coco)} per person; evaluate a model trained for this keypoint set")
    was_training = model.training
    model.eval()
    keypoints, areas = predict_keypoints(model, person_boxes, images, flip_test, batch_size, workers, progress)
    model.train(was_training)
    results = coco_results(person_boxes, keypoints, areas, person_category_id(coco))
    return coco_keypoint_metrics(coco, results), results


def evaluate_model(model: nn.Module, ann: Path, images: Path, boxes: Path | None = None,
                   flip_test: bool = False, box_score_thr: float = 0.0, batch_size: int = 64,
                   workers: int = 0, progress: bool = False) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """Metrics and COCO results of an in-memory model (also used for validation during training).

    Everything that can be checked without the model's outputs is checked before inference (nothing to
    score, keypoint counts). `progress`: a bar over the inference batches.
    """
    coco = load_coco(ann)
    person_boxes = _person_boxes(coco, ann, boxes, box_score_thr)
    return _score_model(model, coco, ann, images, person_boxes, flip_test, batch_size, workers, progress)


def check_output_path(path: Path | None, flag: str, is_dir: bool = False) -> None:
    """Refuse, before any work, an output that could not be written: `flag` names it in the message.

    `path` (a file, or a folder when `is_dir`) must be creatable: no file where a folder is needed (or a
    folder where the file goes), and its nearest existing folder writable. Nothing is created here.

    Raises:
        UserError: naming `path` and what is in the way.
    """
    if path is None:
        return
    path = Path(path)
    if path.exists() and path.is_dir() != is_dir:
        kind = "a file" if is_dir else "a folder"
        raise UserError(f"{flag} {path} is {kind}; pass a {'folder' if is_dir else 'file'} path")
    target = path if is_dir else path.parent  # the folder that must exist or be made
    while not target.exists():
        target = target.parent
    if not target.is_dir():
        raise UserError(f"{flag} {path} cannot be created: {target} is a file, not a folder; pass another path")
    if not os.access(target, os.W_OK | os.X_OK) or (path.is_file() and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path} cannot be written: no write permission in "
                        f"{path if path.is_file() else target}; pass a path in a writable folder")


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1 if isinstance(obj, dict) else None))  # None -> null


def evaluate(cfg: EvalConfig) -> dict[str, float | None]:
    """Stage 3 as a command: load the model, score it, write --metrics-out / --results-out / --vis pictures.

    The outputs' locations, the annotation file and the boxes are checked before the model is loaded.
    """
    check_output_path(cfg.metrics_out, "--metrics-out")
    check_output_path(cfg.results_out, "--results-out")
    check_output_path(cfg.vis_dir, "--vis", is_dir=True)
    coco = load_coco(cfg.ann)
    person_boxes = _person_boxes(coco, cfg.ann, cfg.boxes, cfg.box_score_thr)
    model = load_model(cfg.model, cfg.device, expert=cfg.expert)
    metrics, results = _score_model(model, coco, cfg.ann, cfg.images, person_boxes, cfg.flip_test, cfg.batch_size,
                                    cfg.workers, cfg.progress)
    if cfg.metrics_out is not None:
        _write_json(Path(cfg.metrics_out), metrics)
    if cfg.results_out is not None:
        _write_json(Path(cfg.results_out), results)
    if cfg.vis_dir is not None:
        write_pictures(coco, cfg.images, results, cfg.vis_dir, cfg.vis_count)
    return metrics


def score_results(ann: Path, results: Path, metrics_out: Path | None = None) -> dict[str, float | None]:
    """The metrics of `evaluate` for an existing COCO keypoint results file (kdcache's or any other tool's).

    The file is scored as given: no rescoring and no OKS-NMS (those belong to the tool that made it);
    COCOeval keeps each image's 20 best-scored results, as always. Checked first: a JSON list of
    {image_id, category_id, keypoints: K x 3 numbers, score}, image ids of `ann`, its person category.

    Args:
        metrics_out: also write the metrics there as JSON (checked before scoring; null for empty ranges).

    Raises:
        UserError: a file missing or malformed, naming the first bad entry; nothing to score.
    """
    check_output_path(metrics_out, "--metrics-out")
    coco = load_coco(ann)
    require_scorable(coco, ann)
    entries = load_keypoint_results(results, coco, ann)
    metrics = coco_keypoint_metrics(coco, entries)
    if metrics_out is not None:
        _write_json(Path(metrics_out), metrics)
    return metrics


def format_metrics(metrics: dict[str, float | None]) -> str:
    """The AP/AR table as pycocotools names it, one line per number; "–" where there was nothing to score."""
    labels = {
        "AP": "AP @[IoU=0.50:0.95 | area=all]", "AP50": "AP @[IoU=0.50 | area=all]",
        "AP75": "AP @[IoU=0.75 | area=all]", "APm": "AP @[IoU=0.50:0.95 | area=medium]",
        "APl": "AP @[IoU=0.50:0.95 | area=large]", "AR": "AR @[IoU=0.50:0.95 | area=all]",
        "AR50": "AR @[IoU=0.50 | area=all]", "AR75": "AR @[IoU=0.75 | area=all]",
        "ARm": "AR @[IoU=0.50:0.95 | area=medium]", "ARl": "AR @[IoU=0.50:0.95 | area=large]",
    }
    shown = {name: "–" if metrics[name] is None else f"{metrics[name]:.2f}" for name in METRIC_NAMES}
    return "\n".join(f"{name:5s} {labels[name]:38s} = {shown[name]:>6s}" for name in METRIC_NAMES)
