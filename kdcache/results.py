"""Predicted keypoints -> COCO keypoint results, as ViTPose scores them: instance rescoring and OKS-NMS per image
(mmpose 0.x `TopDownCocoDataset.evaluate` with use_nms, vis_thr 0.2, oks_thr 0.9)."""

from __future__ import annotations

from typing import Any

import numpy as np

from kdcache.boxes import PersonBox
from kdcache.keypoints import KeypointSet

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
