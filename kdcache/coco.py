"""COCO person-keypoint annotations and images: the instances every stage works on.

The instance set is the one ViTPose trains on (mmpose `TopDownCocoDataset`): non-crowd person
annotations with a box and at least one labelled keypoint, the box clipped to the image and kept
only when it still has positive area.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools.coco import COCO

from kdcache.errors import UserError
from kdcache.keypoints import NUM_KEYPOINTS

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
        keypoints: float32 [17, 3], x, y in image pixels and COCO visibility v (0/1/2).
        area: segmentation area from the json (used by COCOeval's OKS); box area if absent.
    """

    image_id: int
    ann_id: int
    file_name: str
    image_wh: tuple[int, int]
    bbox_xywh: np.ndarray
    keypoints: np.ndarray
    area: float


def load_coco(ann_file: Path) -> COCO:
    """Load a COCO annotation file with pycocotools, without its progress prints.

    Raises:
        UserError: the file is missing or is not a COCO json.
    """
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise UserError(f"annotation file not found: {ann_file}; pass --ann a COCO person_keypoints_*.json")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(ann_file))
    except (ValueError, AssertionError, KeyError, TypeError, UnicodeDecodeError) as exc:
        # json.JSONDecodeError is a ValueError; pycocotools asserts the top level is a dict.
        raise UserError(
            f"{ann_file} is not a valid COCO annotation file ({type(exc).__name__}: {exc}); "
            "pass a COCO person_keypoints_*.json"
        ) from exc


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


def _person_category_ids(coco: COCO, ann_file: Path) -> set[int]:
    cat_ids = coco.getCatIds(catNms=["person"])
    if not cat_ids:
        raise UserError(f"{ann_file} has no 'person' category; pass a COCO person_keypoints_*.json")
    return set(cat_ids)


def instances_from_coco(coco: COCO, ann_file: Path | str = "<coco>") -> list[Instance]:
    """The training/evaluation instances of an already loaded COCO object (see `load_instances`)."""
    person_ids = _person_category_ids(coco, Path(ann_file))
    instances = []
    dropped = {"crowd": 0, "no_keypoints": 0, "box": 0}
    for ann in coco.dataset.get("annotations", []):
        if ann.get("category_id") not in person_ids:
            continue
        if ann.get("iscrowd", 0):
            dropped["crowd"] += 1
            continue
        if "bbox" not in ann or "keypoints" not in ann:
            dropped["box" if "bbox" not in ann else "no_keypoints"] += 1
            continue
        kpts = np.asarray(ann["keypoints"], dtype=np.float32)
        if kpts.size != NUM_KEYPOINTS * 3:
            raise UserError(
                f"annotation {ann['id']} in {ann_file} has {kpts.size // 3} keypoints, expected "
                f"{NUM_KEYPOINTS}; kdcache needs COCO-17 person keypoints"
            )
        kpts = kpts.reshape(NUM_KEYPOINTS, 3)
        if kpts[:, 2].max() <= 0 or ann.get("num_keypoints", 1) == 0:
            dropped["no_keypoints"] += 1
            continue
        img = coco.imgs.get(ann["image_id"])
        if img is None:
            raise UserError(f"annotation {ann['id']} in {ann_file} refers to missing image "
                            f"{ann['image_id']}; the annotation file is inconsistent")
        image_wh = (int(img["width"]), int(img["height"]))
        bbox = clip_bbox_xywh(ann["bbox"], image_wh)
        # mmpose also drops annotations whose recorded area is 0.
        if bbox is None or ("area" in ann and ann["area"] <= 0):
            dropped["box"] += 1
            continue
        instances.append(Instance(
            image_id=int(ann["image_id"]),
            ann_id=int(ann["id"]),
            file_name=str(img["file_name"]),
            image_wh=image_wh,
            bbox_xywh=bbox,
            keypoints=kpts,
            area=float(ann.get("area", bbox[2] * bbox[3])),
        ))
    instances.sort(key=lambda inst: (inst.image_id, inst.ann_id))
    log.info("%s: %d person instances (dropped %d crowd, %d without keypoints, %d empty boxes)",
             ann_file, len(instances), dropped["crowd"], dropped["no_keypoints"], dropped["box"])
    return instances


def load_instances(ann_file: Path) -> list[Instance]:
    """Person instances of a COCO keypoint file, as ViTPose trains on them.

    Kept: category 'person', not crowd, >= 1 labelled keypoint (max v > 0 and num_keypoints > 0),
    box clipped to the image with positive area (and recorded area > 0). Sorted by (image_id, ann_id).

    Raises:
        UserError: the file is missing or invalid.
    """
    return instances_from_coco(load_coco(ann_file), ann_file)


def read_image(path: Path) -> np.ndarray:
    """Read an image as uint8 [H, W, 3] RGB.

    Decoded with OpenCV from the file's bytes (same pixels as `cv2.imread`, but also works with
    non-ASCII paths), then BGR -> RGB, as mmpose's LoadImageFromFile with channel_order='rgb'.

    Raises:
        UserError: naming the file, when it is missing or not a readable image.
    """
    path = Path(path)
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise UserError(f"cannot read image {path} ({exc.strerror or exc}); check --images") from exc
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise UserError(f"cannot decode image {path}: not a readable image file; check --images")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class ImageMemo:
    """`read_image` of files under one folder, keeping the last decoded image: views and cache rows are
    ordered by image, so neighbours share it."""

    def __init__(self, images_dir: Path):
        self.images_dir = Path(images_dir)
        self._name: str | None = None
        self._image: np.ndarray | None = None

    def __call__(self, file_name: str) -> np.ndarray:
        if file_name != self._name:
            self._image = read_image(self.images_dir / file_name)
            self._name = file_name
        return self._image
