"""COCO loading: which annotations become instances, box clipping, images and user errors."""

import json

import cv2
import numpy as np
import pytest

from kdcache.coco import load_coco, load_instances, read_image
from kdcache.errors import UserError


def _keypoints(n_labelled, x=20, y=30):
    """17 COCO keypoints, the first `n_labelled` at (x + i, y + i) with v=2."""
    kpts = []
    for i in range(17):
        kpts += [x + i, y + i, 2] if i < n_labelled else [0, 0, 0]
    return kpts


def _ann(ann_id, image_id, bbox, n_labelled=3, **extra):
    ann = {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": bbox, "iscrowd": 0,
           "area": float(bbox[2] * bbox[3]), "keypoints": _keypoints(n_labelled), "num_keypoints": n_labelled}
    ann.update(extra)
    return ann


@pytest.fixture()
def ann_file(tmp_path):
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
                   {"id": 2, "file_name": "b.jpg", "width": 50, "height": 50}],
        "categories": [{"id": 1, "name": "person", "keypoints": [], "skeleton": []},
                       {"id": 2, "name": "dog"}],
        "annotations": [
            _ann(14, 1, [-5, 60, 200, 100]),  # exceeds the image: clipped to (0, 60, 99, 19)
            _ann(10, 1, [10.5, 10, 30, 40], area=612.5),  # plain: kept, w-1 / h-1 as ViTPose
            _ann(11, 1, [10, 10, 30, 40], iscrowd=1),  # crowd
            _ann(12, 1, [10, 10, 30, 40], n_labelled=0),  # no labelled keypoint
            _ann(13, 1, [10, 10, 30, 40], area=0.0),  # zero area
            _ann(17, 1, [10, 10, 1, 5]),  # 1 px wide: x2 = x1 + (w - 1) = x1, empty
            _ann(15, 2, [60, 10, 20, 20]),  # right of the image: empty after clipping
            _ann(16, 2, [5, 5, 20, 20], category_id=2),  # not a person
            _ann(9, 2, [5, 5, 20, 20], n_labelled=17),  # kept; sorts after image 1
        ],
    }
    path = tmp_path / "person_keypoints_val.json"
    path.write_text(json.dumps(coco))
    return path


def test_load_instances_keeps_exactly_the_vitpose_set(ann_file):
    instances = load_instances(ann_file)
    assert [(i.image_id, i.ann_id) for i in instances] == [(1, 10), (1, 14), (2, 9)]
    plain, clipped, full = instances
    np.testing.assert_array_equal(plain.bbox_xywh, [10.5, 10, 29, 39])
    np.testing.assert_array_equal(clipped.bbox_xywh, [0, 60, 99, 19])
    assert plain.bbox_xywh.dtype == np.float32 and plain.keypoints.dtype == np.float32
    assert plain.keypoints.shape == (17, 3)
    np.testing.assert_array_equal(plain.keypoints[2], [22, 32, 2])
    np.testing.assert_array_equal(plain.keypoints[3], [0, 0, 0])
    assert (plain.file_name, plain.image_wh, plain.area) == ("a.jpg", (100, 80), 612.5)
    assert (full.file_name, full.image_wh) == ("b.jpg", (50, 50))
    assert (full.keypoints[:, 2] == 2).all()


def test_missing_or_invalid_annotation_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_instances(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json"):
        load_coco(bad)
    no_person = tmp_path / "dogs.json"
    no_person.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 2, "name": "dog"}]}))
    with pytest.raises(UserError, match="person"):
        load_instances(no_person)


def test_read_image_returns_rgb(tmp_path):
    bgr = np.zeros((6, 8, 3), dtype=np.uint8)
    bgr[2, 3] = (255, 10, 0)  # blue in OpenCV's BGR order
    path = tmp_path / "img.png"
    assert cv2.imwrite(str(path), bgr)
    rgb = read_image(path)
    assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[2, 3], (0, 10, 255))


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="missing.jpg"):
        read_image(tmp_path / "missing.jpg")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    with pytest.raises(UserError, match="junk.jpg"):
        read_image(junk)
