"""COCO person-keypoint annotations: the instances every stage works on.

The instance set is the one ViTPose trains on (mmpose `TopDownCocoDataset`): non-crowd person
annotations with a box and at least one labelled keypoint, the box clipped to the image and kept
only when it still has positive area.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from kdcache.errors import UserError
from kdcache.wholebody import WHOLEBODY_FIELDS, person_keypoints
from kdcache.keypoints import (COCO_17, COCO_WHOLEBODY_133, KeypointSet, keypoint_set_named,
                               keypoint_set_of_category, keypoint_set_with)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Instance:
    """One annotated person.

    Attributes:
        image_id: COCO image id.
        ann_id: COCO annotation id (unique; keys the augmentation stream of the instance).
        file_name: image file name relative to the image folder.
        image_wh: (width, height) of the image in pixels, from the json.
        bbox_xywh: float32 [4], box clipped to the image as mmpose does (x, y, w, h in pixels).
        keypoints: float32 [K, 3], x, y in image pixels and COCO visibility v (0/1/2).
        area: segmentation area from the json (used by COCOeval's OKS); box w * h if absent (as `load_coco`).
        score: the box's score: a detector's for people given by detections, 1 for annotated boxes.
        category_id: the annotation's category (the person's; AP-10K: the animal's species).
    """

    image_id: int
    ann_id: int
    file_name: str
    image_wh: tuple[int, int]
    bbox_xywh: np.ndarray
    keypoints: np.ndarray
    area: float
    score: float = 1.0
    category_id: int = 1

    @property
    def labelled(self) -> bool:
        """The person has ground truth: at least one labelled keypoint (people from boxes alone have none)."""
        return bool(self.keypoints[:, 2].max(initial=0) > 0)


class CocoFile(COCO):
    """A file loaded by `load_coco`: pycocotools' index, and the keypoint set chosen for it (`--keypoint-set`),
    which `keypoint_set_of` returns where the file does not say which set it is."""

    chosen_set: KeypointSet | None = None


def load_coco(ann_file: Path, keypoint_set: KeypointSet | str | None = None) -> COCO:
    """Load a COCO annotation (or image-info) file, checked and completed for every stage, COCOeval included.

    Refused up front, each with one line naming the file and the entry: no `images` or `categories`, no
    person category, non-integer or repeated image ids, image entries without file_name / positive
    width and height, annotation ids missing, repeated, zero (pycocotools never matches id 0) or negative,
    person annotations on unknown images, without a box of 4 numbers, or with keypoints that are not K x 3
    finite numbers. Filled the way the COCO tools define them, where converted datasets (CrowdPose, AIC)
    leave them out: `area` = box w * h, `num_keypoints` = count of visibilities > 0, `iscrowd` = 0, and a
    person without `keypoints` gets K unlabelled ones (COCOeval then ignores it, as COCO's own such persons).

    Args:
        keypoint_set: the set for a file whose category does not name a built-in one (a set, or what
            `--keypoint-set` takes: a built-in name or a description file); checked against the file.

    Raises:
        UserError: the file is missing, is not a COCO json, or has one of the problems above.
    """
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise UserError(f"annotation file not found: {ann_file}; pass --ann a COCO person_keypoints_*.json")
    try:
        with open(ann_file, "rb") as handle:
            dataset = json.load(handle)
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        raise UserError(f"{ann_file} is not valid JSON ({type(exc).__name__}: {exc}); "
                        "pass a COCO person_keypoints_*.json") from exc
    if not isinstance(dataset, dict):
        raise UserError(f"{ann_file} is not a COCO annotation file (its top level is a {type(dataset).__name__}, "
                        "not an object with images/annotations/categories); pass a COCO person_keypoints_*.json")
    _check_and_fill(dataset, ann_file)
    coco = CocoFile()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    if keypoint_set is not None:
        coco.chosen_set = keypoint_set_named(keypoint_set) if isinstance(keypoint_set, str) else keypoint_set
        keypoint_set_of(coco, ann_file)  # the choice fits the file, or one line now
    return coco


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite JSON number (not a bool, which json also reads as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _subject_categories(categories: list[Any], ann_file: Path) -> list[dict[str, Any]]:
    """The categories whose members are the file's subjects: the one named 'person' (any case), else every
    category with keypoint names, which must all name the same keypoints (AP-10K: one per species)."""
    named = [c for c in categories if isinstance(c, dict) and str(c.get("name", "")).lower() == "person"]
    with_keypoints = [c for c in categories if isinstance(c, dict) and c.get("keypoints")]
    found = named if named else with_keypoints
    listed = ", ".join(f"{c.get('id')}:{c.get('name')!r}" for c in categories[:8] if isinstance(c, dict))
    if len(named) > 1 or not found:
        what = "several" if found else "no"
        raise UserError(f"{ann_file} has {what} person categories (categories {listed or 'none'}): kdcache needs "
                        "exactly one named 'person', or categories with keypoint names; fix its categories")
    if len({tuple(c.get("keypoints") or ()) for c in found}) > 1:
        raise UserError(f"{ann_file}: its categories with keypoints ({listed}, ...) name different keypoints; "
                        "kdcache reads one keypoint set per file: split it by keypoint set")
    for c in found:
        if not _is_int(c.get("id")):
            raise UserError(f"{ann_file}: the category id {c.get('id')!r} is not an integer; COCO category ids "
                            "are numbers")
    return found


def _check_and_fill(dataset: dict[str, Any], ann_file: Path) -> None:
    """The checks and fills of `load_coco`, in place on the parsed json."""
    for key in ("images", "categories"):
        if not isinstance(dataset.get(key), list):
            raise UserError(f"{ann_file} has no '{key}' list; a COCO annotation file needs 'images' and "
                            "'categories' (with the person category and its keypoint names)")
    subjects = _subject_categories(dataset["categories"], ann_file)
    subject_ids = {c["id"] for c in subjects}
    image_ids = set()
    for img in dataset["images"]:
        img_id = img.get("id") if isinstance(img, dict) else None
        if not _is_int(img_id):
            raise UserError(f"{ann_file}: image {img_id!r} has no integer id (COCO image ids are numbers; "
                            "convert string ids, and every annotation's image_id, to integers)")
        if img_id in image_ids:
            raise UserError(f"{ann_file}: image id {img_id} appears twice; give every image its own id")
        if not isinstance(img.get("file_name"), str) or not all(
                _is_int(img.get(k)) and img[k] > 0 for k in ("width", "height")):
            raise UserError(f"{ann_file}: image {img_id} needs a file_name and positive integer width and height "
                            f"(got {img.get('file_name')!r}, {img.get('width')!r} x {img.get('height')!r})")
        image_ids.add(img_id)
    annotations = dataset.get("annotations", [])  # image-info files (unlabelled images) have none
    if not isinstance(annotations, list):
        raise UserError(f"{ann_file}: 'annotations' is not a list; pass a COCO annotation file")
    names = subjects[0].get("keypoints") or []
    num_keypoints = len(names) or None  # else from the first person annotation with keypoints
    ann_ids = set()
    for index, ann in enumerate(annotations):
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        if not _is_int(ann_id) or ann_id <= 0:
            raise UserError(f"{ann_file}: annotation #{index} has id {ann_id!r}, not a positive integer "
                            "(pycocotools never matches id 0); number the annotations 1, 2, 3, ...")
        if ann_id in ann_ids:
            raise UserError(f"{ann_file}: annotation id {ann_id} appears twice; give every annotation its own id")
        ann_ids.add(ann_id)
        if "image_id" not in ann or "category_id" not in ann:  # pycocotools' index needs both
            raise UserError(f"{ann_file}: annotation {ann_id} has no image_id or category_id; add them")
        if ann["category_id"] not in subject_ids:
            continue  # COCOeval is run on the person category (the subjects' categories) only
        where = f"{ann_file}: person annotation {ann_id}"
        if not _is_int(ann.get("image_id")) or ann["image_id"] not in image_ids:
            raise UserError(f"{where} refers to image {ann.get('image_id')!r}, which is not in 'images' "
                            "(image ids are integers); the annotation file is inconsistent")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
            raise UserError(f"{where} has bbox {bbox!r}, not [x, y, w, h] numbers; add the person's box")
        for key in ("area", "num_keypoints"):
            if key in ann and not is_number(ann[key]):
                raise UserError(f"{where} has {key} {ann[key]!r}, not a number; fix it or leave it out")
        kpts = ann.get("keypoints")
        if kpts is not None and not (isinstance(kpts, list) and all(is_number(v) for v in kpts)):
            raise UserError(f"{where} has keypoints that are not all finite numbers; write them as "
                            "[x1, y1, v1, x2, y2, v2, ...] numbers")
        if kpts:  # missing or [] = no labelled joint, filled below
            if num_keypoints is None and len(kpts) % 3 == 0:
                num_keypoints = len(kpts) // 3  # the first person sets K for the others
            if num_keypoints is None or len(kpts) != 3 * num_keypoints:
                expected = f"{num_keypoints} x 3" if num_keypoints else "a multiple of 3"
                raise UserError(f"{where} has {len(kpts)} keypoint values, expected {expected} (x, y, v per joint"
                                f"{', as the category names' if names else ''}); fix it")
    num_keypoints = num_keypoints or _NO_KEYPOINTS.num_keypoints  # no keypoint in the file at all (image info)
    people = [ann for ann in annotations if ann.get("category_id") in subject_ids]
    if any(kpts in ann for ann in people for _, kpts, _ in WHOLEBODY_FIELDS):
        _check_and_fill_wholebody(people, num_keypoints, ann_file)
    for ann in people:
        # What COCOeval reads from every person, as COCO defines it where converted files leave it out.
        if not ann.get("keypoints"):
            ann["keypoints"], ann["num_keypoints"] = [0] * (3 * num_keypoints), 0
        ann.setdefault("num_keypoints", sum(1 for v in ann["keypoints"][2::3] if v > 0))
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)


def _check_and_fill_wholebody(people: list[dict[str, Any]], num_keypoints: int, ann_file: Path) -> None:
    """A COCO-WholeBody file's part fields: each [x, y, v] * the part's size in numbers, flags true or false; a
    person without a part's field gets it unlabelled (zeros, not valid)."""
    body = COCO_WHOLEBODY_133.part("body")
    if num_keypoints != len(body):
        raise UserError(f"{ann_file} has COCO-WholeBody part fields ({WHOLEBODY_FIELDS[0][1]}, ...) but "
                        f"{num_keypoints} body keypoints per person; COCO-WholeBody's body is COCO's {len(body)}")
    for ann in people:
        for part, kpts, valid in WHOLEBODY_FIELDS:
            size = 3 * len(COCO_WHOLEBODY_133.part(part))
            if kpts not in ann:
                ann[kpts], ann[valid] = [0] * size, False
            values = ann[kpts]
            if not (isinstance(values, list) and len(values) == size and all(is_number(v) for v in values)):
                raise UserError(f"{ann_file}: person annotation {ann['id']} has {kpts} that are not {size // 3} x 3 "
                                "finite numbers (x, y, v per point, as COCO-WholeBody writes them); fix it")
            if not isinstance(ann.get(valid, True), bool):
                raise UserError(f"{ann_file}: person annotation {ann['id']} has {valid} {ann[valid]!r}, not true or "
                                "false; fix it or leave it out")


def as_coco(ann: Path | COCO) -> tuple[COCO, Path | str]:
    """An annotation file, or one already loaded by `load_coco`, as (COCO object, name for messages)."""
    return (ann, "<coco>") if isinstance(ann, COCO) else (load_coco(ann), ann)


def subject_category_ids(coco: COCO) -> tuple[int, ...]:
    """Ids of the categories a file loaded by `load_coco` is about: its person category (often 1; converted
    datasets use others), or every category with its keypoint names (AP-10K's 54 species)."""
    return tuple(int(c["id"]) for c in _subject_categories(coco.dataset["categories"], Path("<coco>")))


def _first_subject(coco: COCO, ann_file: Path | str = "<coco>") -> dict[str, Any]:
    return _subject_categories(coco.dataset["categories"], Path(ann_file))[0]


# A file that names no keypoints and holds none (an image-info file) is read as this set's.
_NO_KEYPOINTS = COCO_17

def is_wholebody(coco: COCO) -> bool:
    """The file is in COCO-WholeBody's layout (`load_coco` gave every person all the part fields, or none)."""
    subjects = subject_category_ids(coco)
    return any(ann.get("category_id") in subjects and WHOLEBODY_FIELDS[0][1] in ann
               for ann in coco.dataset.get("annotations", []))


def keypoint_count(coco: COCO) -> int:
    """K, the joints per person of a file loaded by `load_coco`: its keypoint names, else its annotations."""
    if is_wholebody(coco):
        return COCO_WHOLEBODY_133.num_keypoints
    names = _first_subject(coco).get("keypoints")
    if names:
        return len(names)
    subjects = subject_category_ids(coco)
    for ann in coco.dataset.get("annotations", []):
        if ann.get("category_id") in subjects:
            return len(ann["keypoints"]) // 3
    return _NO_KEYPOINTS.num_keypoints


def keypoint_set_of(coco: COCO, ann_file: Path | str = "<coco>") -> KeypointSet:
    """The keypoint set of a file loaded by `load_coco`: the built-in set its category's keypoint names are
    (however the file spells them: `keypoints.keypoint_set_of_category`), else the set chosen at load
    (`--keypoint-set`), else the one with its keypoint count; COCO-WholeBody's for a file in its layout.

    Raises:
        UserError: no built-in set, or several, have the file's keypoint count.
    """
    own = COCO_WHOLEBODY_133 if is_wholebody(coco) else keypoint_set_of_category(_first_subject(coco, ann_file))
    chosen = getattr(coco, "chosen_set", None)
    if chosen is None:
        return own or keypoint_set_with(keypoint_count(coco), str(ann_file))
    if own is not None and own.name != chosen.name:
        raise UserError(f"{ann_file} names {own.title}'s keypoints but --keypoint-set is {chosen.name}; the file's "
                        "own set is used where it names one: leave --keypoint-set out")
    if declares_keypoints(coco) and keypoint_count(coco) != chosen.num_keypoints:
        raise UserError(f"{ann_file} has {keypoint_count(coco)} keypoints per person but --keypoint-set "
                        f"{chosen.name} has {chosen.num_keypoints}; pass the set the file was annotated with")
    return chosen


def clip_bbox_xywh(bbox_xywh: tuple[float, float, float, float] | np.ndarray,
                   image_wh: tuple[int, int]) -> np.ndarray | None:
    """Clip a COCO box to the image exactly as ViTPose's `TopDownCocoDataset` does.

    x1 = max(0, x), x2 = min(width - 1, x1 + max(0, w - 1)) (same for y); the box is dropped when
    x2 <= x1 or y2 <= y1. (mmpose 0.29 later changed `w - 1` to `w`; ViTPose was trained with `w - 1`.)

    Returns:
        float32 [4] clipped (x, y, w, h), or None when nothing of positive area remains.
    """
    x, y, w, h = (float(v) for v in bbox_xywh)
    width, height = image_wh
    x1 = max(0.0, x)
    y1 = max(0.0, y)
    x2 = min(width - 1.0, x1 + max(0.0, w - 1.0))
    y2 = min(height - 1.0, y1 + max(0.0, h - 1.0))
    if x2 <= x1 or y2 <= y1:
        return None
    return np.array([x1, y1, x2 - x1, y2 - y1], dtype=np.float32)


# Which annotated people `instances_from_coco` returns (dump-teacher --persons).
PERSONS = {
    "labelled": "with at least one labelled keypoint (ViTPose's training set)",
    "unlabelled": "with a box and no labelled keypoint (dumped without ground truth)",
    "all": "both",
}


def declares_keypoints(coco: COCO) -> bool:
    """The file says which keypoints its people have: the person category names them, or a person has some
    (an image-info file, or COCO's instances_*.json, does neither)."""
    if _first_subject(coco).get("keypoints"):
        return True
    subjects = subject_category_ids(coco)
    return any(ann.get("category_id") in subjects and ann.get("num_keypoints", 0) > 0
               for ann in coco.dataset.get("annotations", []))


def instances_from_coco(coco: COCO, ann_file: Path | str = "<coco>", persons: str = "labelled") -> list[Instance]:
    """The training/evaluation instances of an already loaded COCO object (see `load_instances`).

    Args:
        persons: one of PERSONS: "labelled" (the default, as ViTPose trains), "unlabelled" (non-crowd people
            with a box of positive area and no labelled keypoint: their keypoints are all 0), or "all".
    """
    if persons not in PERSONS:
        raise UserError(f"unknown --persons {persons!r}; choose one of {', '.join(PERSONS)}")
    subjects = subject_category_ids(coco)
    num_keypoints = keypoint_set_of(coco, ann_file).num_keypoints  # a set kdcache knows, or refused
    wholebody = is_wholebody(coco)
    instances = []
    dropped = {"crowd": 0, "labelled": 0, "unlabelled": 0, "box": 0}
    for ann in coco.dataset.get("annotations", []):
        if ann.get("category_id") not in subjects:
            continue
        if ann.get("iscrowd", 0):
            dropped["crowd"] += 1
            continue
        # load_coco gave every person a box, K keypoints (checked above) and num_keypoints.
        kpts = np.asarray(person_keypoints(ann, wholebody), dtype=np.float32).reshape(num_keypoints, 3)
        # (whole-body files: a person counts as labelled by its body, as mmpose's COCO-WholeBody loading does)
        labelled = kpts[:, 2].max() > 0 and ann["num_keypoints"] > 0
        if persons != "all" and labelled != (persons == "labelled"):
            dropped["labelled" if labelled else "unlabelled"] += 1
            continue
        if not labelled:
            kpts = np.zeros_like(kpts)  # num_keypoints 0 with a labelled joint: no ground truth either way
        img = coco.imgs[ann["image_id"]]
        image_wh = (int(img["width"]), int(img["height"]))
        bbox = clip_bbox_xywh(ann["bbox"], image_wh)
        # mmpose also drops annotations whose recorded area is 0.
        if bbox is None or ann["area"] <= 0:
            dropped["box"] += 1
            continue
        instances.append(Instance(
            image_id=int(ann["image_id"]),
            ann_id=int(ann["id"]),
            file_name=str(img["file_name"]),
            image_wh=image_wh,
            bbox_xywh=bbox,
            keypoints=kpts,
            area=float(ann["area"]),
            category_id=int(ann["category_id"]),
        ))
    instances.sort(key=lambda inst: (inst.image_id, inst.ann_id))
    log.info("%s: %d person instances (dropped %d crowd, %d without keypoints, %d with keypoints, %d empty boxes)",
             ann_file, len(instances), dropped["crowd"], dropped["unlabelled"], dropped["labelled"], dropped["box"])
    return instances


def load_instances(ann_file: Path) -> list[Instance]:
    """Person instances of a COCO keypoint file, as ViTPose trains on them.

    Kept: category 'person', not crowd, >= 1 labelled keypoint (max v > 0 and num_keypoints > 0),
    box clipped to the image with positive area (and recorded area > 0). Sorted by (image_id, ann_id).

    Raises:
        UserError: the file is missing or invalid.
    """
    return instances_from_coco(load_coco(ann_file), ann_file)
