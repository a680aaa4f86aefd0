"""COCO keypoint results as ViTPose makes them: instance rescoring and OKS-NMS."""

import numpy as np

from kdcache.boxes import PersonBox
from kdcache.keypoints import COCO_17
from kdcache.results import coco_results, oks_nms

NUM_KEYPOINTS = COCO_17.num_keypoints


def test_coco_results_format_and_rescoring():
    kps = np.zeros((2, NUM_KEYPOINTS, 3), np.float32)
    kps[0, :, :2] = np.arange(NUM_KEYPOINTS)[:, None] * 10
    kps[1, :, :2] = kps[0, :, :2] + 300  # far away: not suppressed
    kps[0, :, 2] = 0.1
    kps[0, :4, 2] = 0.9            # only 4 keypoints count: mean 0.9
    kps[1, :, 2] = 0.5
    boxes = [PersonBox(7, "a.jpg", np.zeros(4, np.float32), 0.5), PersonBox(7, "a.jpg", np.zeros(4, np.float32), 1.0)]
    res = coco_results(boxes, kps, np.array([1e4, 1e4]), COCO_17)
    assert len(res) == 2 and all(len(r["keypoints"]) == 51 and r["category_id"] == 1 for r in res)
    scores = sorted(r["score"] for r in res)
    np.testing.assert_allclose(scores, [0.45, 0.5], rtol=1e-6)


def test_oks_nms_suppresses_duplicates_only():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 100, (NUM_KEYPOINTS, 3))
    dup = base + np.array([0.5, 0.5, 0])
    far = base + np.array([60.0, 0, 0])
    kps = np.stack([base, dup, far])
    keep = oks_nms(kps, np.array([0.9, 0.8, 0.7]), np.array([1e4, 1e4, 1e4]), COCO_17, thr=0.9)
    assert keep == [0, 2]
