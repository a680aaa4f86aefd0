"""Stage 3: any model on a COCO annotation file, scored with pycocotools' keypoint COCOeval.

Pipeline as ViTPose evaluates: person boxes (ground truth, or detections with scores: `kdcache.boxes`) ->
un-augmented crop -> model, optionally flip-averaged -> decoding -> image coordinates (`kdcache.predict`)
-> instance score = box score x mean keypoint score over keypoints above 0.2 -> OKS-NMS at 0.9 per image
(`kdcache.results`) -> COCOeval (`kdcache.metrics`). `--vis` draws the scored predictions over the ground
truth (`kdcache.viz`). Crops are cut and heatmaps decoded with the model's codec; the keypoint set is the
annotation file's.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO
from torch import nn

from kdcache.boxes import PersonBox, detected_person_boxes, gt_person_boxes
from kdcache.codec import Codec
from kdcache.coco import is_wholebody, keypoint_set_of, load_coco
from kdcache.config import EvalConfig
from kdcache.errors import UserError
from kdcache.metrics import coco_keypoint_metrics, require_scorable
from kdcache.models import load_model
from kdcache.predict import PredictConfig, predict_keypoints
from kdcache.results import coco_results, load_keypoint_results
from kdcache.viz import write_pictures
from kdcache.wholebody import split_wholebody_result

log = logging.getLogger(__name__)


def _model_keypoints(model: nn.Module) -> int:
    return int(getattr(model, "module", model).config.num_keypoints)


def _model_codec(model: nn.Module) -> Codec:
    return getattr(model, "module", model).codec


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
                 predict: PredictConfig) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    keypoint_set = keypoint_set_of(coco, ann)
    named = getattr(getattr(model, "module", model).config, "keypoint_set", None)  # students record theirs
    if named and named != keypoint_set.name:
        raise UserError(f"the model was trained for the keypoint set {named} but {ann} has {keypoint_set.name}'s; "
                        "evaluate it on annotations of its own keypoint set")
    if _model_keypoints(model) != keypoint_set.num_keypoints:
        raise UserError(f"the model predicts {_model_keypoints(model)} keypoints but {ann} has "
                        f"{keypoint_set.num_keypoints} per person; evaluate a model trained for this keypoint set")
    was_training = model.training
    model.eval()
    keypoints, areas = predict_keypoints(model, person_boxes, images, _model_codec(model), keypoint_set, predict)
    model.train(was_training)
    results = coco_results(person_boxes, keypoints, areas, keypoint_set)
    return coco_keypoint_metrics(coco, results), results


def evaluate_model(model: nn.Module, ann: Path, images: Path, boxes: Path | None = None,
                   box_score_thr: float = EvalConfig.box_score_thr, predict: PredictConfig = PredictConfig(),
                   keypoint_set: str | None = None) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """Metrics and COCO results of an in-memory model (also used for validation during training).

    Everything that can be checked without the model's outputs is checked before inference (nothing to
    score, keypoint counts). `keypoint_set`: `--keypoint-set`, for a file that does not say which set it is.
    """
    coco = load_coco(ann, keypoint_set)
    person_boxes = _person_boxes(coco, ann, boxes, box_score_thr)
    return _score_model(model, coco, ann, images, person_boxes, predict)


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
    coco = load_coco(cfg.ann, cfg.keypoint_set)
    person_boxes = _person_boxes(coco, cfg.ann, cfg.boxes, cfg.box_score_thr)
    model = load_model(cfg.model, cfg.device, expert=cfg.expert)
    metrics, results = _score_model(model, coco, cfg.ann, cfg.images, person_boxes, cfg.predict)
    if cfg.metrics_out is not None:
        _write_json(Path(cfg.metrics_out), metrics)
    if cfg.results_out is not None:  # a whole-body file's results in its layout, for its tools
        _write_json(Path(cfg.results_out), [split_wholebody_result(r) for r in results] if is_wholebody(coco)
                    else results)
    if cfg.vis_dir is not None:
        write_pictures(coco, cfg.images, results, cfg.vis_dir, cfg.vis_count)
    return metrics


def score_results(ann: Path, results: Path, metrics_out: Path | None = None,
                  keypoint_set: str | None = None) -> dict[str, float | None]:
    """The metrics of `evaluate` for an existing COCO keypoint results file (kdcache's or any other tool's).

    The file is scored as given: no rescoring and no OKS-NMS (those belong to the tool that made it);
    COCOeval keeps each image's 20 best-scored results, as always. Checked first: a JSON list of
    {image_id, category_id, keypoints: K x 3 numbers, score}, image ids of `ann`, its person category.

    Args:
        metrics_out: also write the metrics there as JSON (checked before scoring; null for empty ranges).
        keypoint_set: `--keypoint-set`, for a file that does not say which set it is.

    Raises:
        UserError: a file missing or malformed, naming the first bad entry; nothing to score.
    """
    check_output_path(metrics_out, "--metrics-out")
    coco = load_coco(ann, keypoint_set)
    require_scorable(coco, ann)
    entries = load_keypoint_results(results, coco, ann)
    metrics = coco_keypoint_metrics(coco, entries)
    if metrics_out is not None:
        _write_json(Path(metrics_out), metrics)
    return metrics
