"""Evaluation chain: crop geometry, decoding, projection, OKS-NMS and COCOeval."""

import numpy as np

from kdcache import heatmaps as codec
from kdcache.evaluate import (coco_keypoint_metrics, coco_results, gt_person_boxes, heatmaps_to_image,
                              oks_nms)
from kdcache.keypoints import NUM_KEYPOINTS
from kdcache.coco import load_instances
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
