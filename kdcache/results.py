"""Predicted keypoints -> COCO keypoint results, as ViTPose scores them: instance rescoring and OKS-NMS per image
(mmpose 0.x `TopDownCocoDataset.evaluate` with use_nms, vis_thr 0.2, oks_thr 0.9); results files read back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from kdcache.boxes import PersonBox
from kdcache.coco import is_number, is_wholebody, keypoint_count, subject_category_ids
from kdcache.errors import UserError
from kdcache.keypoints import KeypointSet
from kdcache.wholebody import WHOLEBODY_FIELDS, joined_wholebody_result

KEYPOINT_SCORE_THR = 0.2   # keypoints counted in the instance score (ViTPose's vis_thr)
OKS_NMS_THR = 0.9          # ViTPose's oks_thr


def oks_nms(keypoints: np.ndarray, scores: np.ndarray, areas: np.ndarray, keypoint_set: KeypointSet,
            thr: float = OKS_NMS_THR) -> list[int]:
    """Greedy non-maximum suppression by object keypoint similarity; returns kept indices, best first.

    As mmpose 0.x `oks_nms` called by `TopDownCocoDataset.evaluate`: the keypoint set's OKS sigmas, every
    joint counted (no vis_thr), a candidate is dropped when its OKS to a kept one is above `thr`.

    keypoints: [N, K, 3] of one image; scores, areas: [N].
    """
    variances = (2 * np.asarray(keypoint_set.oks_sigmas)) ** 2
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
                 keypoint_set: KeypointSet) -> list[dict[str, Any]]:
    """Rescore, OKS-NMS per image, and format as COCO keypoint results, each of its box's category (the file's
    person category; AP-10K: the animal's species, which mmpose's AP-10K evaluation takes from the box)."""
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
        for j in oks_nms(keypoints[idx], scores[idx], areas[idx], keypoint_set):
            i = int(idx[j])
            results.append({"image_id": image_id, "category_id": int(boxes[i].category_id),
                            "keypoints": [round(float(v), 3) for v in keypoints[i].reshape(-1)],
                            "score": float(scores[i])})
    return results


def load_keypoint_results(results: Path, coco: COCO, ann: Path) -> list[dict[str, Any]]:
    """A COCO keypoint results file, each entry checked against `coco` (loaded from `ann`).

    Raises:
        UserError: naming `results` and the first entry that is not {image_id of `ann`, category_id of its
            person, keypoints: K x 3 finite numbers, score: a finite number}, or an empty list.
    """
    results = Path(results)
    if not results.is_file():
        raise UserError(f"results file {results} does not exist; pass a COCO keypoint results JSON")
    try:
        entries = json.loads(results.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{results} is not valid JSON; pass a COCO keypoint results JSON") from None
    if not isinstance(entries, list):
        raise UserError(f"{results} is not a COCO keypoint results list ([{{image_id, category_id, keypoints, "
                        "score}, ...]); pass one")
    if not entries:
        raise UserError(f"nothing to score: {results} holds no results")
    subjects, k, wholebody = subject_category_ids(coco), keypoint_count(coco), is_wholebody(coco)
    for index, e in enumerate(entries):
        where = f"{results}: result #{index}"
        if not isinstance(e, dict) or not all(key in e for key in ("image_id", "category_id", "keypoints", "score")):
            raise UserError(f"{where} is not {{image_id, category_id, keypoints, score}}; pass COCO keypoint results")
        if wholebody and WHOLEBODY_FIELDS[0][1] in e:  # COCO-WholeBody's layout: checked as one 133-point list
            if not all(kpts in e for _, kpts, _ in WHOLEBODY_FIELDS):
                raise UserError(f"{where} has some of COCO-WholeBody's part fields but not all of "
                                f"{[kpts for _, kpts, _ in WHOLEBODY_FIELDS]}; write every part")
            e = entries[index] = joined_wholebody_result(e)
        if type(e["image_id"]) is not int or e["image_id"] not in coco.imgs:
            raise UserError(f"{where} is on image {e['image_id']!r}, which is not in {ann}; score it against the "
                            "annotation file it was predicted for")
        if e["category_id"] not in subjects:
            shown = subjects[0] if len(subjects) == 1 else f"one of {list(subjects)[:6]}"
            raise UserError(f"{where} has category_id {e['category_id']!r} but the person category of {ann} is "
                            f"{shown}; write the results with category_id {shown}")
        kpts = e["keypoints"]
        if not (isinstance(kpts, list) and len(kpts) == 3 * k and all(is_number(v) for v in kpts)):
            raise UserError(f"{where} has keypoints that are not {k} x 3 finite numbers (x, y, score per joint); "
                            f"{ann} has {k} keypoints per person"
                            + (" (in COCO-WholeBody's layout: 17 body ones and each part's in its field)"
                               if wholebody else ""))
        if not is_number(e["score"]):
            raise UserError(f"{where} has score {e['score']!r}, not a finite number")
    return entries
