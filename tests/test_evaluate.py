"""Evaluation chain: crop geometry, decoding, projection, OKS-NMS and COCOeval; `kdcache eval` end to end."""

import json

import cv2
import numpy as np
import pytest

from kdcache import heatmaps as codec
from kdcache.coco import load_instances
from kdcache.evaluate import coco_keypoint_metrics, coco_results, gt_person_boxes, heatmaps_to_image, oks_nms
from kdcache.keypoints import NUM_KEYPOINTS
from kdcache.synth import SynthConfig, synthesize
from kdcache.transforms import bbox_to_center_scale, keypoints_to_crop, udp_affine

INPUT_HW = (256, 192)


def test_oracle_heatmaps_score_near_100(tmp_path):
    """Ground truth encoded as heatmaps in each box's crop, decoded and projected back, scores ~AP 100."""
    data = synthesize(SynthConfig(out=tmp_path, train_images=1, val_images=6, seed=3))
    ann = data / "annotations/person_keypoints_val.json"
    instances = load_instances(ann)
    boxes = gt_person_boxes(ann)
    heat, affines, areas = [], [], []
    for inst in instances:
        center, scale_wh = bbox_to_center_scale(inst.bbox_xywh)
        affine = udp_affine(center, scale_wh, 0.0, INPUT_HW)
        kp = keypoints_to_crop(inst.keypoints, affine, False)
        h, _ = codec.encode(kp, INPUT_HW, (64, 48), 2.0)
        heat.append(h)
        affines.append(affine)
        areas.append(scale_wh[0] * scale_wh[1])
    kps = heatmaps_to_image(np.stack(heat), np.stack(affines), INPUT_HW)
    labelled = np.stack([i.keypoints for i in instances])[..., 2] > 0
    inside = (np.stack([i.keypoints for i in instances])[..., :2] > 0).all(-1)
    err = np.linalg.norm(kps[..., :2] - np.stack([i.keypoints[:, :2] for i in instances]), axis=-1)
    assert np.median(err[labelled & inside]) < 0.5  # pixels in the original image
    metrics = coco_keypoint_metrics(ann, coco_results(boxes, kps, np.asarray(areas)))
    assert metrics["AP"] > 95.0


def test_coco_results_format_and_rescoring():
    from kdcache.evaluate import PersonBox

    kps = np.zeros((2, NUM_KEYPOINTS, 3), np.float32)
    kps[0, :, :2] = np.arange(NUM_KEYPOINTS)[:, None] * 10
    kps[1, :, :2] = kps[0, :, :2] + 300  # far away: not suppressed
    kps[0, :, 2] = 0.1
    kps[0, :4, 2] = 0.9            # only 4 keypoints count: mean 0.9
    kps[1, :, 2] = 0.5
    boxes = [PersonBox(7, "a.jpg", np.zeros(4, np.float32), 0.5), PersonBox(7, "a.jpg", np.zeros(4, np.float32), 1.0)]
    res = coco_results(boxes, kps, np.array([1e4, 1e4]))
    assert len(res) == 2 and all(len(r["keypoints"]) == 51 and r["category_id"] == 1 for r in res)
    scores = sorted(r["score"] for r in res)
    np.testing.assert_allclose(scores, [0.45, 0.5], rtol=1e-6)


def test_oks_nms_suppresses_duplicates_only():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 100, (NUM_KEYPOINTS, 3))
    dup = base + np.array([0.5, 0.5, 0])
    far = base + np.array([60.0, 0, 0])
    kps = np.stack([base, dup, far])
    keep = oks_nms(kps, np.array([0.9, 0.8, 0.7]), np.array([1e4, 1e4, 1e4]), thr=0.9)
    assert keep == [0, 2]


# ---- through the command line on a tiny model -------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Three synthetic val images; a random ViTPose-nano at 128x96 whose heatmaps peak near 1 (scores pass 0.3)."""
    import torch

    from kdcache.checkpoint import checkpoint_dict
    from kdcache.teacher import build_vitpose, vitpose_config

    root = tmp_path_factory.mktemp("eval")
    data = synthesize(SynthConfig(out=root / "data", train_images=0, val_images=3, seed=5, max_people=2))
    torch.manual_seed(0)
    model = build_vitpose(vitpose_config("vitpose-nano", input_hw=(128, 96))).eval()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]  # heatmaps are linear in it
    with torch.no_grad():
        last.bias.zero_()
        last.weight.div_(model(torch.randn(8, 3, 128, 96)).amax(dim=(2, 3)).median())
    torch.save(checkpoint_dict(model), root / "nano.pt")
    ann = data / "annotations/person_keypoints_val.json"
    return {"ann": ann, "images": data / "val",
            "args": ["eval", "--model", str(root / "nano.pt"), "--ann", str(ann), "--images", str(data / "val"),
                     "--workers", "0"]}


def test_eval_vis_draws_ground_truth_and_predictions(tiny, tmp_path, capsys):
    from kdcache.cli import main
    from kdcache.coco import load_coco, read_image
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


def test_detection_file_filters_like_mmpose(tiny, tmp_path):
    from kdcache.errors import UserError
    from kdcache.evaluate import detected_person_boxes

    image_ids = sorted({i.image_id for i in load_instances(tiny["ann"])})
    dets = [{"image_id": image_ids[-1], "category_id": 1, "bbox": [1, 2, 30, 40], "score": 0.3},
            {"image_id": image_ids[0], "category_id": 1, "bbox": [5, 6, 30, 40], "score": 0.2},
            {"image_id": image_ids[0], "category_id": 1, "bbox": [5, 6, 0, 40], "score": 0.9},  # empty
            {"image_id": image_ids[0], "category_id": 1, "bbox": [5, 6, 30, 40], "score": 0.1},  # below thr
            {"image_id": image_ids[0], "category_id": 3, "bbox": [5, 6, 30, 40], "score": 0.9},  # not a person
            {"image_id": -1, "bbox": [5, 6, 30, 40], "score": 0.9}]  # unknown image
    path = tmp_path / "d.json"
    path.write_text(json.dumps(dets))
    boxes = detected_person_boxes(tiny["ann"], path, score_thr=0.2)  # kept: score >= thr, as mmpose
    assert [(b.image_id, b.score) for b in boxes] == [(image_ids[0], 0.2), (image_ids[-1], 0.3)]  # by image
    np.testing.assert_array_equal(boxes[0].bbox_xywh, [5, 6, 30, 40])  # as given, not clipped
    path.write_text(json.dumps([{"image_id": image_ids[0], "bbox": [1, 2, 3]}]))
    with pytest.raises(UserError, match="not a COCO detection results list"):
        detected_person_boxes(tiny["ann"], path, 0.0)
