"""The COCO keypoint metric: pycocotools' COCOeval on the file's person category; empty ranges are None."""

import json

import pytest

from kdcache.coco import load_instances
from kdcache.evaluate import score_results
from kdcache.metrics import coco_keypoint_metrics, format_metrics


@pytest.fixture(scope="module")
def ann(synth_data):
    return synth_data(0, 3, 5, max_people=2) / "annotations/person_keypoints_val.json"


def test_empty_area_range_is_none_printed_as_a_dash_and_written_as_null(ann, tmp_path, rewrite_json):
    def large(data):  # every person "large" (area > 96^2): COCOeval has no medium one to average
        for a in data["annotations"]:
            a["area"] = 20000.0
    ann = rewrite_json(ann, tmp_path / "large.json", large)
    oracle = [{"image_id": i.image_id, "category_id": 1, "keypoints": i.keypoints.reshape(-1).tolist(), "score": 1.0}
              for i in load_instances(ann)]
    (tmp_path / "r.json").write_text(json.dumps(oracle))
    metrics = score_results(ann, tmp_path / "r.json", metrics_out=tmp_path / "out" / "m.json")
    assert metrics["APm"] is None and metrics["ARm"] is None and metrics["APl"] == metrics["AP"] == 100.0
    table = format_metrics(metrics).splitlines()
    assert table[3].startswith("APm") and table[3].endswith("=      –") and table[4].endswith("= 100.00")
    written = json.loads((tmp_path / "out" / "m.json").read_text())
    assert written["APm"] is None and written["AP"] == 100.0 and "-100" not in (tmp_path / "out" / "m.json").read_text()


def test_converted_annotation_files_score_without_crashing(ann, tmp_path, rewrite_json):
    """CrowdPose/AIC-style ground truth (no area, num_keypoints, iscrowd; a person without keypoints) scores as
    COCO's own: area from the box, num_keypoints from the visibilities, the keypoint-less person ignored."""
    original = ann

    def convert(data):
        for a in data["annotations"]:
            for key in ("area", "num_keypoints", "iscrowd", "segmentation"):
                a.pop(key, None)
        data["annotations"].append({"id": 999, "image_id": data["images"][0]["id"], "category_id": 1,
                                    "bbox": [1.0, 1.0, 30.0, 60.0]})
    ann = rewrite_json(original, tmp_path / "converted.json", convert)
    oracle = [{"image_id": i.image_id, "category_id": 1, "keypoints": i.keypoints.reshape(-1).tolist(), "score": 1.0}
              for i in load_instances(ann)]
    assert len(oracle) == len(load_instances(original))
    assert coco_keypoint_metrics(ann, oracle)["AP"] == 100.0
