"""Person boxes: the annotated people as ViTPose evaluates them, and detection files filtered as mmpose does."""

import json

import numpy as np
import pytest

from kdcache.boxes import detected_person_boxes, gt_person_boxes
from kdcache.coco import load_instances
from kdcache.errors import UserError


@pytest.fixture(scope="module")
def ann(synth_data):
    return synth_data(0, 3, 5, max_people=2) / "annotations/person_keypoints_val.json"


def test_ground_truth_boxes_are_the_instances_with_score_1(ann):
    instances = load_instances(ann)
    boxes = gt_person_boxes(ann)
    assert [(b.image_id, b.score) for b in boxes] == [(i.image_id, 1.0) for i in instances]
    for box, inst in zip(boxes, instances):
        np.testing.assert_array_equal(box.bbox_xywh, inst.bbox_xywh)  # clipped as ViTPose clips
        assert box.image_wh == inst.image_wh


def test_detection_file_filters_like_mmpose(ann, tmp_path):
    image_ids = sorted({i.image_id for i in load_instances(ann)})
    dets = [{"image_id": image_ids[-1], "category_id": 1, "bbox": [1, 2, 30, 40], "score": 0.3},
            {"image_id": image_ids[0], "category_id": 1, "bbox": [5, 6, 30, 40], "score": 0.2},
            {"image_id": image_ids[0], "category_id": 1, "bbox": [5, 6, 0, 40], "score": 0.9},  # empty
            {"image_id": image_ids[0], "category_id": 1, "bbox": [5, 6, 30, 40], "score": 0.1},  # below thr
            {"image_id": image_ids[0], "category_id": 3, "bbox": [5, 6, 30, 40], "score": 0.9},  # not a person
            {"image_id": -1, "bbox": [5, 6, 30, 40], "score": 0.9}]  # unknown image
    path = tmp_path / "d.json"
    path.write_text(json.dumps(dets))
    boxes = detected_person_boxes(ann, path, score_thr=0.2)  # kept: score >= thr, as mmpose
    assert [(b.image_id, b.score) for b in boxes] == [(image_ids[0], 0.2), (image_ids[-1], 0.3)]  # by image
    np.testing.assert_array_equal(boxes[0].bbox_xywh, [5, 6, 30, 40])  # as given, not clipped
    path.write_text(json.dumps([{"image_id": image_ids[0], "bbox": [1, 2, 3]}]))
    with pytest.raises(UserError, match="not a COCO detection results list"):
        detected_person_boxes(ann, path, 0.0)
