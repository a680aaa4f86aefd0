"""The COCO keypoint metric: pycocotools' COCOeval on a file's person category, and its table."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from kdcache.coco import as_coco, is_wholebody, keypoint_set_of, subject_category_ids
from kdcache.errors import UserError
from kdcache.keypoints import COCO_WHOLEBODY_133, KeypointSet
from kdcache.wholebody import joined_wholebody_result, person_keypoints

METRIC_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def require_scorable(coco: COCO, ann: Path) -> None:
    """Refuse, before any inference, a file COCOeval would score as -1 or crash on.

    Raises:
        UserError: not a keypoint set kdcache knows (its OKS sigmas), or no person COCOeval counts (non-crowd,
            num_keypoints > 0): there would be nothing to score.
    """
    keypoint_set_of(coco, ann)
    subjects = subject_category_ids(coco)
    if not any(a.get("category_id") in subjects and not a.get("iscrowd") and a.get("num_keypoints", 0) > 0
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
    gt, source = as_coco(ann)
    require_scorable(gt, source)
    if not results:
        raise UserError(f"nothing to score: no predictions for the images of {source}")
    keypoint_set = keypoint_set_of(gt, source)
    if is_wholebody(gt):
        return wholebody_metrics(gt, results, keypoint_set)
    return _cocoeval(gt, results, keypoint_set.oks_sigmas)


def _cocoeval(gt: COCO, results: list[dict[str, Any]], sigmas: tuple[float, ...] | np.ndarray,
              result_areas: list[float] | None = None) -> dict[str, float | None]:
    """pycocotools' keypoint COCOeval of `results` on `gt`'s person category with these OKS sigmas.

    Args:
        result_areas: each result's area (which area range an unmatched result counts in) instead of the
            extent of its keypoints, which loadRes takes.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            dt = gt.loadRes([dict(r) for r in results])  # loadRes adds id/area/bbox to each: not to the caller's
            for ann, area in zip(dt.dataset["annotations"], result_areas or ()):
                ann["area"] = area
        else:  # (loadRes cannot take none): nothing found, scored as such
            dt = COCO()
            dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
            dt.createIndex()
        ev = COCOeval(gt, dt, "keypoints")
        ev.params.useSegm = None
        sigmas = np.asarray(sigmas)
        default = np.asarray(ev.params.kpt_oks_sigmas)  # pycocotools' own are COCO-17's
        if sigmas.shape != default.shape or not np.allclose(sigmas, default):
            ev.params.kpt_oks_sigmas = sigmas
        ev.params.catIds = list(subject_category_ids(gt))  # default: every category, person or not
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) * 100.0 if v >= 0 else None for name, v in zip(METRIC_NAMES, ev.stats)}


# What COCO-WholeBody's protocol reports besides whole-body AP: its parts (xtcocotools' iouTypes, one each).
WHOLEBODY_PARTS = tuple(part for part, _, _ in COCO_WHOLEBODY_133.parts)


def wholebody_metrics(gt: COCO, results: list[dict[str, Any]], keypoint_set: KeypointSet
                      ) -> dict[str, float | None]:
    """COCO-WholeBody's protocol (xtcocotools' `keypoints_body`, `_foot`, `_face`, `_lefthand`, `_righthand`
    and `_wholebody` COCOevals, as mmpose's CocoWholeBodyMetric runs them), on pycocotools.

    Each part is scored as its own keypoint set: the gt and the results keep that part's points (whole-body:
    all 133) and its OKS sigmas; a person is ignored when none of the part's points is labelled (xtcocotools
    counts v > 0 per part), and a result is dropped when none of its part's scores is positive; the OKS area
    is the person's `area`, the score the result's; a result's own area (which area range it falls in when it
    matches nobody) is its body keypoints' extent, as xtcocotools' loadRes reads it from results in
    COCO-WholeBody's layout, whose `keypoints` are the body's. So scoring a part equals xtcocotools' for it
    (`scripts/check_wholebody_metric.py` compares the two where xtcocotools is installed).

    Args:
        results: kdcache's (`keypoints`: all 133 points) or COCO-WholeBody's layout (`keypoints`: the body's 17,
            and `foot_kpts`, `face_kpts`, `lefthand_kpts`, `righthand_kpts`).

    Returns:
        The whole-body numbers under METRIC_NAMES, and each part's under "<part> AP", "<part> AR" etc.
    """
    results = [joined_wholebody_result(r) for r in results]
    subjects = subject_category_ids(gt)
    body = slice(3 * keypoint_set.part("body").start, 3 * keypoint_set.part("body").stop)
    out: dict[str, float | None] = {}
    for part in (*WHOLEBODY_PARTS, "wholebody"):
        span = range(keypoint_set.num_keypoints) if part == "wholebody" else keypoint_set.part(part)
        cut = slice(3 * span.start, 3 * span.stop)
        anns = []
        for ann in gt.dataset["annotations"]:
            if ann["category_id"] in subjects:
                kpts = person_keypoints(ann, wholebody=True, honour_valid=False)[cut]
                ann = {**ann, "keypoints": kpts, "num_keypoints": sum(1 for v in kpts[2::3] if v > 0)}
            anns.append(ann)
        part_gt = COCO()
        part_gt.dataset = {**gt.dataset, "annotations": anns}
        with contextlib.redirect_stdout(io.StringIO()):
            part_gt.createIndex()
        kept = [r for r in results if any(v > 0 for v in r["keypoints"][cut][2::3])]
        sigmas = keypoint_set.oks_sigmas[span.start:span.stop]
        scored = _cocoeval(part_gt, [{**r, "keypoints": r["keypoints"][cut]} for r in kept], sigmas,
                           [_extent_area(r["keypoints"][body]) for r in kept])
        if part == "wholebody":
            out = {**scored, **out}
        else:
            out.update({f"{part} {name}": value for name, value in scored.items()})
    return out


def _extent_area(flat: list[float]) -> float:
    """The area of the box around [x, y, v] * K keypoints, scores ignored (what loadRes gives a result)."""
    xs, ys = flat[0::3], flat[1::3]
    return float((max(xs) - min(xs)) * (max(ys) - min(ys)))


def format_metrics(metrics: dict[str, float | None]) -> str:
    """The AP/AR table as pycocotools names it, one line per number; "–" where there was nothing to score."""
    labels = {
        "AP": "AP @[IoU=0.50:0.95 | area=all]", "AP50": "AP @[IoU=0.50 | area=all]",
        "AP75": "AP @[IoU=0.75 | area=all]", "APm": "AP @[IoU=0.50:0.95 | area=medium]",
        "APl": "AP @[IoU=0.50:0.95 | area=large]", "AR": "AR @[IoU=0.50:0.95 | area=all]",
        "AR50": "AR @[IoU=0.50 | area=all]", "AR75": "AR @[IoU=0.75 | area=all]",
        "ARm": "AR @[IoU=0.50:0.95 | area=medium]", "ARl": "AR @[IoU=0.50:0.95 | area=large]",
    }
    def show(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}"

    lines = [f"{name:5s} {labels[name]:38s} = {show(metrics[name]):>6s}" for name in METRIC_NAMES]
    parts = [part for part in WHOLEBODY_PARTS if f"{part} AP" in metrics]
    if parts:  # COCO-WholeBody: the table above is whole-body; then each part, as its papers tabulate them
        lines.insert(0, "whole-body (all 133 keypoints):")
        lines.append(f"{'part':10s} " + " ".join(f"{name:>6s}" for name in METRIC_NAMES))
        lines += [f"{part:10s} " + " ".join(f"{show(metrics[f'{part} {name}']):>6s}" for name in METRIC_NAMES)
                  for part in parts]
    return "\n".join(lines)
