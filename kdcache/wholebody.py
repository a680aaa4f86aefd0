"""COCO-WholeBody's file layout: a person's 133 keypoints as its annotation and result files split them.

Its annotation files keep COCO's 17 body keypoints in `keypoints` and each other part in a field of its own,
with a validity flag (`foot_kpts` / `foot_valid`, `face_kpts`, `lefthand_kpts`, `righthand_kpts`); kdcache reads
a person as one 133-point instance in COCO_WHOLEBODY_133's order (body, foot, face, left hand, right hand), as
mmpose's CocoWholeBodyDataset does. `num_keypoints` counts the body's alone, as in COCO's files. Its result
files split the same way (xtcocotools and mmpose read them so).
"""

from __future__ import annotations

from typing import Any

from kdcache.keypoints import COCO_WHOLEBODY_133

# (part, its points' field, its validity flag), after the body's `keypoints`
WHOLEBODY_FIELDS = (("foot", "foot_kpts", "foot_valid"), ("face", "face_kpts", "face_valid"),
                    ("left_hand", "lefthand_kpts", "lefthand_valid"),
                    ("right_hand", "righthand_kpts", "righthand_valid"))


def person_keypoints(ann: dict[str, Any], wholebody: bool, honour_valid: bool = True) -> list[float]:
    """All keypoints of a person annotation of `load_coco` as one flat [x, y, v] * K list: in a whole-body file,
    body then each part, a part flagged not valid (`*_valid` false) counted as unlabelled unless not
    `honour_valid` (COCO-WholeBody's evaluation reads the points alone)."""
    if not wholebody:
        return ann["keypoints"]
    out = list(ann["keypoints"])
    for _, kpts, valid in WHOLEBODY_FIELDS:
        values = list(ann[kpts])
        if honour_valid and not ann.get(valid, True):
            values[2::3] = [0] * (len(values) // 3)
        out += values
    return out


def joined_wholebody_result(entry: dict[str, Any]) -> dict[str, Any]:
    """A keypoint result in COCO-WholeBody's layout (body in `keypoints`, the parts in their fields) as one
    133-point `keypoints` list; one already joined is returned as it is."""
    if WHOLEBODY_FIELDS[0][1] not in entry:
        return entry
    joined = {k: v for k, v in entry.items() if k not in {kpts for _, kpts, _ in WHOLEBODY_FIELDS}}
    joined["keypoints"] = person_keypoints(entry, wholebody=True, honour_valid=False)
    return joined


def split_wholebody_result(entry: dict[str, Any]) -> dict[str, Any]:
    """A 133-point keypoint result in COCO-WholeBody's layout, as its tools (xtcocotools, mmpose) read results."""
    flat, out = entry["keypoints"], dict(entry)
    body = COCO_WHOLEBODY_133.part("body")
    out["keypoints"] = flat[3 * body.start:3 * body.stop]
    for part, kpts, _ in WHOLEBODY_FIELDS:
        span = COCO_WHOLEBODY_133.part(part)
        out[kpts] = flat[3 * span.start:3 * span.stop]
    return out
