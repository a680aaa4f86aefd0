"""Evaluation chain: crop geometry, decoding, projection, OKS-NMS and COCOeval; `kdcache eval` end to end."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from kdcache.coco import load_instances
from kdcache.keypoints import COCO_17
from kdcache.predict import PredictConfig

NUM_KEYPOINTS = COCO_17.num_keypoints


# ---- through the command line on a tiny model -------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, synth_data):
    """Three synthetic val images; a random ViTPose-nano at 128x96 whose heatmaps peak near 1 (scores pass 0.3)."""
    import torch

    from kdcache.checkpoint import checkpoint_dict
    from kdcache.vitpose import build_vitpose, vitpose_config

    root = tmp_path_factory.mktemp("eval")
    data = synth_data(0, 3, 5, max_people=2)
    torch.manual_seed(0)
    model = build_vitpose(vitpose_config("vitpose-nano", input_hw=(128, 96))).eval()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]  # heatmaps are linear in it
    with torch.no_grad():
        last.bias.zero_()
        last.weight.div_(model(torch.randn(8, 3, 128, 96)).amax(dim=(2, 3)).median())
    torch.save(checkpoint_dict(model), root / "nano.pt")
    ann = data / "annotations/person_keypoints_val.json"
    return {"ann": ann, "images": data / "val", "model": root / "nano.pt",
            "args": ["eval", "--model", str(root / "nano.pt"), "--ann", str(ann), "--images", str(data / "val"),
                     "--workers", "0"]}


def test_eval_vis_draws_ground_truth_and_predictions(tiny, tmp_path, capsys):
    from kdcache.cli import main
    from kdcache.coco import load_coco
    from kdcache.images import read_image
    from kdcache.viz import GT_RGB, PRED_RGB

    vis, res = tmp_path / "vis", tmp_path / "r.json"
    assert main([*tiny["args"], "--vis", str(vis), "--vis-count", "2", "--results-out", str(res)]) == 0
    assert str(vis) in capsys.readouterr().out
    coco = load_coco(tiny["ann"])
    first = sorted(coco.imgs)[:2]  # 3 images, count 2: the first two by id
    assert sorted(p.name for p in vis.iterdir()) == [f"{i:012d}.png" for i in first]
    results = json.loads(res.read_text())
    gt_hits = pred_hits = 0
    for image_id in first:
        original = read_image(tiny["images"] / coco.imgs[image_id]["file_name"])
        picture = cv2.cvtColor(cv2.imread(str(vis / f"{image_id:012d}.png")), cv2.COLOR_BGR2RGB)
        assert picture.shape == original.shape
        H, W = original.shape[:2]
        for ann in coco.imgToAnns[image_id]:  # GT joints: green unless a prediction was drawn over them
            for x, y, v in np.reshape(ann["keypoints"], (-1, 3)):
                if v > 0 and tuple(picture[round(y), round(x)]) == GT_RGB:
                    gt_hits += 1
                    assert tuple(original[round(y), round(x)]) != GT_RGB
        for r in results:  # predicted joints above the threshold: always orange (drawn last)
            if r["image_id"] != image_id:
                continue
            for x, y, s in np.reshape(r["keypoints"], (-1, 3)):
                if s >= 0.3 and 4 <= x < W - 4 and 4 <= y < H - 4:
                    assert tuple(picture[round(y), round(x)]) == PRED_RGB
                    pred_hits += 1
    assert gt_hits >= 5 and pred_hits >= 5


def test_eval_with_detections_thresholds_rescores_and_suppresses(tiny, tmp_path):
    """Detections from the GT boxes (scores 0.9, 0.8, ...) plus: an exact duplicate at a lower score (OKS-NMS
    removes it), a low-score box elsewhere (only --box-score-thr removes it), a non-person and an unknown image."""
    from kdcache.cli import main

    instances = load_instances(tiny["ann"])
    scores = [round(0.9 - 0.05 * i, 2) for i in range(len(instances))]
    dets = [{"image_id": i.image_id, "category_id": 1, "bbox": [float(v) for v in i.bbox_xywh], "score": s}
            for i, s in zip(instances, scores)]
    first = instances[0]
    dets += [
        {"image_id": first.image_id, "category_id": 1, "bbox": dets[0]["bbox"], "score": 0.5},  # duplicate
        {"image_id": first.image_id, "category_id": 1, "bbox": [2.0, 2.0, 30.0, 60.0], "score": 0.05},  # weak
        {"image_id": first.image_id, "category_id": 2, "bbox": [40.0, 2.0, 30.0, 60.0], "score": 0.99},  # no person
        {"image_id": 987654, "category_id": 1, "bbox": [2.0, 2.0, 30.0, 60.0], "score": 0.99},  # not in ann
    ]
    boxes = tmp_path / "dets.json"
    boxes.write_text(json.dumps(dets))
    ratios = {}
    for thr in ("0", "0.1"):
        res = tmp_path / f"r{thr}.json"
        assert main([*tiny["args"], "--boxes", str(boxes), "--box-score-thr", thr, "--flip-test",
                     "--results-out", str(res), "--metrics-out", str(tmp_path / "m.json")]) == 0
        results = json.loads(res.read_text())
        # Instance score / mean keypoint score above 0.2 gives back the box score (up to the 3-decimal keypoints).
        kp = np.array([r["keypoints"] for r in results]).reshape(len(results), NUM_KEYPOINTS, 3)[..., 2]
        mean_kp = np.array([k[k > 0.2].mean() for k in kp])
        ratios[thr] = sorted(np.array([r["score"] for r in results]) / mean_kp)
    np.testing.assert_allclose(ratios["0.1"], sorted(scores), rtol=1e-2)  # the duplicate's 0.5 is suppressed
    np.testing.assert_allclose(ratios["0"], sorted([*scores, 0.05]), rtol=1e-2)  # the weak box was kept at 0


# ---- real-world annotation files, results files and outputs ----------------------------------------

def _oracle_predictions(ann):
    """A stand-in for `predict_keypoints` that returns each box's ground-truth person (score 1): AP 100."""
    by_box = {(i.image_id, tuple(np.round(i.bbox_xywh, 2))): i for i in load_instances(ann)}

    def predict(model, boxes, images, *args, **kwargs):
        people = [by_box[(b.image_id, tuple(np.round(b.bbox_xywh, 2)))] for b in boxes]
        keypoints = np.stack([p.keypoints for p in people])
        keypoints[..., 2] = 1.0
        return keypoints, np.array([p.area for p in people], np.float64)
    return predict


def _person_id(data, new_id):
    for cat in data["categories"]:
        cat["id"] = new_id
    for a in data["annotations"]:
        a["category_id"] = new_id


@pytest.fixture()
def model(tiny):
    from kdcache.models import load_model

    return load_model(tiny["model"])


def test_person_category_of_another_id_scores_the_same(tiny, model, tmp_path, monkeypatch, rewrite_json):
    import kdcache.evaluate as ev
    from kdcache.boxes import detected_person_boxes

    ann7 = rewrite_json(tiny["ann"], tmp_path / "person7.json", lambda d: _person_id(d, 7))
    monkeypatch.setattr(ev, "predict_keypoints", _oracle_predictions(tiny["ann"]))
    m1, r1 = ev.evaluate_model(model, tiny["ann"], tiny["images"])
    m7, r7 = ev.evaluate_model(model, ann7, tiny["images"])
    assert m1["AP"] == m7["AP"] == 100.0 and m1 == m7
    assert {r["category_id"] for r in r1} == {1} and {r["category_id"] for r in r7} == {7}
    # Detections: the file's person category is kept; 1 is another category in this file.
    dets = [{"image_id": i.image_id, "category_id": 7, "bbox": [float(v) for v in i.bbox_xywh], "score": 0.9}
            for i in load_instances(ann7)]
    dets.append({**dets[0], "category_id": 1, "bbox": [0.0, 0.0, 20.0, 20.0]})
    (tmp_path / "d.json").write_text(json.dumps(dets))
    assert len(detected_person_boxes(ann7, tmp_path / "d.json", 0.0)) == len(dets) - 1
    assert ev.evaluate_model(model, ann7, tiny["images"], boxes=tmp_path / "d.json")[0]["AP"] == 100.0


def test_nothing_to_score_is_refused_before_inference_and_nothing_is_written(tiny, model, tmp_path, rewrite_json):
    from kdcache.cli import main
    from kdcache.errors import UserError
    from kdcache.evaluate import evaluate_model

    def unlabel(data):
        for a in data["annotations"]:
            a["keypoints"], a["num_keypoints"] = [0] * 51, 0
    unlabelled = rewrite_json(tiny["ann"], tmp_path / "unlabelled.json", unlabel)
    nowhere = tmp_path / "no-images"  # inference would fail here first, with another message
    with pytest.raises(UserError, match="nothing to score: .*unlabelled.json has no person annotation with labelled"):
        evaluate_model(model, unlabelled, nowhere)
    weak = [{"image_id": i.image_id, "category_id": 1, "bbox": [float(v) for v in i.bbox_xywh], "score": 0.1}
            for i in load_instances(tiny["ann"])]
    (tmp_path / "weak.json").write_text(json.dumps(weak))
    with pytest.raises(UserError, match=r"nothing to score: no person box of the 3 in .*weak.json is left .*"
                                        r"3 below score 0.5"):
        evaluate_model(model, tiny["ann"], nowhere, boxes=tmp_path / "weak.json", box_score_thr=0.5)
    metrics = tmp_path / "m.json"
    assert main([*tiny["args"], "--boxes", str(tmp_path / "weak.json"), "--box-score-thr", "0.5",
                 "--metrics-out", str(metrics)]) == 2
    assert not metrics.exists()


def test_model_with_another_keypoint_count_is_refused_before_inference(tiny, tmp_path):
    import dataclasses

    import torch

    from kdcache.checkpoint import checkpoint_dict
    from kdcache.config import EvalConfig
    from kdcache.errors import UserError
    from kdcache.evaluate import evaluate
    from kdcache.vitpose import build_vitpose, vitpose_config

    cfg16 = dataclasses.replace(vitpose_config("vitpose-nano", input_hw=(128, 96)), num_keypoints=16)
    torch.save(checkpoint_dict(build_vitpose(cfg16)), tmp_path / "mpii.pt")
    cfg = EvalConfig(model=tmp_path / "mpii.pt", ann=tiny["ann"], images=tmp_path / "no-images")
    with pytest.raises(UserError, match=r"model predicts 16 keypoints but .*person_keypoints_val.json has 17"):
        evaluate(cfg)


def test_unwritable_outputs_are_refused_before_the_model_is_loaded(tiny, tmp_path, monkeypatch):
    import os

    from kdcache.config import EvalConfig
    from kdcache.errors import UserError
    from kdcache.evaluate import evaluate

    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    base = dict(model=tmp_path / "no-model.pt", ann=tiny["ann"], images=tiny["images"])
    cases = [({"metrics_out": tmp_path / "a_folder"}, r"--metrics-out .*a_folder is a folder"),
             ({"results_out": tmp_path / "a_file" / "sub" / "r.json"}, r"--results-out .*r.json cannot be created: "
                                                                        r".*a_file is a file"),
             ({"vis_dir": tmp_path / "a_file"}, r"--vis .*a_file is a file; pass a folder")]
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    real_access = os.access  # root writes anywhere: the folder reads as locked to everyone here
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    cases.append(({"metrics_out": locked / "m.json"}, r"--metrics-out .*m.json cannot be written"))
    for outputs, message in cases:
        with pytest.raises(UserError, match=message):  # not "checkpoint ... does not exist": checked first
            evaluate(EvalConfig(**base, **outputs))


def test_score_results_matches_evaluate_and_scores_the_file_as_given(tiny, model, tmp_path):
    from kdcache.evaluate import evaluate_model, score_results

    metrics, results = evaluate_model(model, tiny["ann"], tiny["images"])
    (tmp_path / "r.json").write_text(json.dumps(results))
    assert score_results(tiny["ann"], tmp_path / "r.json") == metrics
    oracle = [{"image_id": i.image_id, "category_id": 1, "keypoints": i.keypoints.reshape(-1).tolist(), "score": 1.0}
              for i in load_instances(tiny["ann"])]
    (tmp_path / "o.json").write_text(json.dumps(oracle))
    assert score_results(tiny["ann"], tmp_path / "o.json")["AP"] == 100.0
    (tmp_path / "twice.json").write_text(json.dumps(oracle + oracle))  # no OKS-NMS: duplicates count against it
    assert score_results(tiny["ann"], tmp_path / "twice.json")["AP"] < 100.0


@pytest.mark.parametrize("entries, message", [
    ({"image_id": 1}, r"is not a COCO keypoint results list"),
    ([], r"nothing to score: .*holds no results"),
    ([{"image_id": 1, "keypoints": []}], r"result #0 is not \{image_id, category_id, keypoints, score\}"),
    ([{"image_id": 424242, "category_id": 1, "keypoints": [0] * 51, "score": 1}], r"image 424242, which is not in"),
    ([{"image_id": "IMG", "category_id": 1, "keypoints": [0] * 51, "score": 1}], r"image 'IMG', which is not in"),
    ([{"image_id": "FIRST", "category_id": 3, "keypoints": [0] * 51, "score": 1}], r"category_id 3 but the person"),
    ([{"image_id": "FIRST", "category_id": 1, "keypoints": [0] * 48, "score": 1}], r"not 17 x 3 finite numbers"),
    ([{"image_id": "FIRST", "category_id": 1, "keypoints": [0] * 50 + ["1"], "score": 1}], r"not 17 x 3 finite"),
    ([{"image_id": "FIRST", "category_id": 1, "keypoints": [0] * 51, "score": "high"}], r"score 'high', not a"),
])
def test_score_results_refuses_malformed_files_in_one_line(tiny, tmp_path, entries, message):
    from kdcache.coco import load_coco
    from kdcache.errors import UserError
    from kdcache.evaluate import score_results

    first = sorted(load_coco(tiny["ann"]).imgs)[0]
    if isinstance(entries, list):
        entries = [{**e, "image_id": first} if e.get("image_id") == "FIRST" else e for e in entries]
    (tmp_path / "r.json").write_text(json.dumps(entries))
    with pytest.raises(UserError, match=message) as info:
        score_results(tiny["ann"], tmp_path / "r.json")
    assert "\n" not in str(info.value)


def test_eval_refuses_images_of_another_size_than_annotated(tiny, model, tmp_path, rewrite_json):
    from kdcache.errors import UserError
    from kdcache.evaluate import evaluate_model

    def shrink(data):  # as if the annotations were made on other copies of the images
        data["images"][0]["width"] -= 1
    ann = rewrite_json(tiny["ann"], tmp_path / "other.json", shrink)
    name = json.loads(ann.read_text())["images"][0]["file_name"]
    with pytest.raises(UserError, match=rf"{name} is 320x256 pixels .* says 319x256"):
        evaluate_model(model, ann, tiny["images"])


def test_progress_bar_over_the_inference_batches(tiny, model, capsys):
    from kdcache.evaluate import evaluate_model

    evaluate_model(model, tiny["ann"], tiny["images"], predict=PredictConfig(batch_size=2))
    assert "batch" not in capsys.readouterr().err
    evaluate_model(model, tiny["ann"], tiny["images"], predict=PredictConfig(batch_size=2, progress=True))
    err = capsys.readouterr().err
    assert "eval:" in err and "0/2 " in err and "batch" in err  # 3 boxes in batches of 2; later redraws are timed
