"""The COCO keypoint metric: pycocotools' COCOeval on a file's person category, and its table."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from kdcache.coco import as_coco, keypoint_set_of, person_category_id
from kdcache.errors import UserError

METRIC_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def require_scorable(coco: COCO, ann: Path) -> None:
    """Refuse, before any inference, a file COCOeval would score as -1 or crash on.

    Raises:
        UserError: not a keypoint set kdcache knows (its OKS sigmas), or no person COCOeval counts (non-crowd,
            num_keypoints > 0): there would be nothing to score.
    """
    keypoint_set_of(coco, ann)
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
    gt, source = as_coco(ann)
    require_scorable(gt, source)
    if not results:
        raise UserError(f"nothing to score: no predictions for the images of {source}")
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([dict(r) for r in results])  # loadRes adds id/area/bbox to each: not to the caller's
        ev = COCOeval(gt, dt, "keypoints")
        ev.params.useSegm = None
        sigmas = np.asarray(keypoint_set_of(gt, source).oks_sigmas)
        default = np.asarray(ev.params.kpt_oks_sigmas)  # pycocotools' own are COCO-17's
        if sigmas.shape != default.shape or not np.allclose(sigmas, default):
            ev.params.kpt_oks_sigmas = sigmas
        ev.params.catIds = [person_category_id(gt)]  # default: every category, person or not
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) * 100.0 if v >= 0 else None for name, v in zip(METRIC_NAMES, ev.stats)}


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
