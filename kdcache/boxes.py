"""Person boxes to score or to dump: the annotated people, or a detector's boxes (COCO detection results)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from kdcache.coco import (Instance, as_coco, clip_bbox_xywh, instances_from_coco, is_number, load_coco,
                          subject_category_ids)
from kdcache.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PersonBox:
    image_id: int
    file_name: str
    bbox_xywh: np.ndarray      # float32 [4] image pixels
    score: float               # detector score; 1 for ground-truth boxes
    image_wh: tuple[int, int] | None = None  # (width, height) the annotation file gives the image; checked on read
    det_id: int = 0            # 1-based position of the box in its detection file (0: an annotated box)
    category_id: int = 1       # the file's person category (AP-10K: the species), written into its results


def gt_person_boxes(ann: Path | COCO) -> list[PersonBox]:
    """The training/dump instance set (non-crowd, >=1 keypoint, positive area) as boxes of score 1."""
    return [PersonBox(i.image_id, i.file_name, i.bbox_xywh, 1.0, i.image_wh, category_id=i.category_id)
            for i in instances_from_coco(*as_coco(ann))]


def detected_person_boxes(ann: Path, dets: Path, score_thr: float, coco: COCO | None = None,
                          purpose: str = "score") -> list[PersonBox]:
    """Person detections (COCO results format) on the images of `ann`, as ViTPose reads them.

    Kept, as mmpose 0.x `_load_coco_person_detection_results`: the person category of `ann` (1 in COCO; entries
    without one count as persons), score >= `score_thr` (its `det_bbox_thr`, default 0), boxes used as given
    (not clipped). Also dropped, where mmpose would crash or crop nothing: images not in `ann`, boxes without
    positive area. Sorted by image (stable), so each image is read once. `coco`: `ann` already loaded;
    `purpose`: what the boxes are for, in the message when none is left ("score", "dump").

    Raises:
        UserError: the file is missing or not detection results, or no box is left after the filtering.
    """
    coco = load_coco(ann) if coco is None else coco
    subjects = subject_category_ids(coco)
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
    for position, e in enumerate(entries, start=1):
        bbox = np.asarray(e["bbox"], dtype=np.float32)
        image = coco.imgs.get(e["image_id"]) if type(e["image_id"]) is int else None  # "12" is not image 12
        category = e.get("category_id", subjects[0])
        reason = ("category" if category not in subjects else "score" if e.get("score", 1.0) < score_thr
                  else "image" if image is None else "empty" if bbox[2] <= 0 or bbox[3] <= 0 else None)
        if reason is not None:
            dropped[reason] += 1
            continue
        boxes.append(PersonBox(int(e["image_id"]), image["file_name"], bbox, float(e.get("score", 1.0)),
                               (int(image["width"]), int(image["height"])), position, int(category)))
    shown = subjects[0] if len(subjects) == 1 else f"{list(subjects)[:6]}"
    counts = (f"dropped {dropped['category']} not of category {shown} (the person category of {ann}), "
              f"{dropped['score']} below score {score_thr:g}, {dropped['image']} on images not in {ann}, "
              f"{dropped['empty']} empty")
    log.info("%s: %d person boxes (%s)", dets, len(boxes), counts)
    if not boxes:
        raise UserError(f"nothing to {purpose}: no person box of the {len(entries)} in {dets} is left ({counts}); "
                        "pass the detections made for these images, or a lower --box-score-thr")
    return sorted(boxes, key=lambda b: b.image_id)


def detection_instances(boxes: list[PersonBox], num_keypoints: int) -> list[Instance]:
    """People given only by a detector's boxes (`detected_person_boxes(..., purpose="dump")`), as dump
    instances without ground truth.

    Each box is clipped to its image as annotated boxes are (`clip_bbox_xywh`; nothing left: dropped). Each
    instance's `ann_id` is its box's 1-based position in the detection file, so its views stay the same
    whatever score threshold kept it; keypoints are K zeros (visibility 0), `area` is the clipped box's,
    `score` the detector's. Sorted by (image_id, ann_id).

    Raises:
        UserError: no box is left.
    """
    out = []
    for box in boxes:
        bbox = clip_bbox_xywh(box.bbox_xywh, box.image_wh)
        if bbox is None:
            continue
        out.append(Instance(image_id=box.image_id, ann_id=box.det_id, file_name=box.file_name,
                            image_wh=box.image_wh, bbox_xywh=bbox, keypoints=np.zeros((num_keypoints, 3), np.float32),
                            area=float(bbox[2] * bbox[3]), score=box.score, category_id=box.category_id))
    if not out:
        raise UserError("nothing to dump: every person box of the detection file lies outside its image; pass the "
                        "detections made for these images")
    return sorted(out, key=lambda inst: (inst.image_id, inst.ann_id))
