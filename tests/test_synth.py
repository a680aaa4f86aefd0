"""kdcache.synth: COCO layout, keypoint/visibility invariants, self-scoring, determinism, cues."""

import contextlib
import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from kdcache.keypoints import COCO_17
from kdcache.synth import BAND_BGR, SynthConfig, render_image, synthesize


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return synthesize(SynthConfig(tmp_path_factory.mktemp("synth"), train_images=6, val_images=3, seed=1))


def test_layout_and_invariants(tiny: Path) -> None:
    ids = set()
    for split, count in (("train", 6), ("val", 3)):
        coco = _quiet(COCO, str(tiny / "annotations" / f"person_keypoints_{split}.json"))
        (cat,) = coco.loadCats(coco.getCatIds())
        assert cat["id"] == 1 and cat["name"] == "person" and cat["supercategory"] == "person"
        assert cat["keypoints"] == list(COCO_17.names)
        assert [tuple(p) for p in cat["skeleton"]] == list(COCO_17.skeleton)
        assert len(coco.getImgIds()) == count
        ids |= set(coco.getImgIds())
        for img in coco.loadImgs(coco.getImgIds()):
            w, h = img["width"], img["height"]
            pixels = cv2.imread(str(tiny / split / img["file_name"]))
            assert pixels.shape == (h, w, 3)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            assert 1 <= len(anns) <= 4
            for ann in anns:
                assert ann["category_id"] == 1 and ann["iscrowd"] == 0
                kps = np.array(ann["keypoints"], float).reshape(17, 3)
                assert set(kps[:, 2]) <= {0, 1, 2}
                assert ann["num_keypoints"] == int((kps[:, 2] > 0).sum()) >= 5
                assert np.all(kps[kps[:, 2] == 0, :2] == 0)
                bx, by, bw, bh = ann["bbox"]
                assert bx >= 0 and by >= 0 and bw > 0 and bh > 0 and bx + bw <= w and by + bh <= h
                assert 0 < ann["area"] <= bw * bh
                labelled = kps[kps[:, 2] > 0]
                assert np.all((labelled[:, 0] >= 0) & (labelled[:, 0] <= w - 1))
                assert np.all((labelled[:, 1] >= 0) & (labelled[:, 1] <= h - 1))
                # Keypoints lie on the person's own mask, so inside its tight box (1 px rounding).
                assert np.all((labelled[:, 0] >= bx - 1) & (labelled[:, 0] <= bx + bw))
                assert np.all((labelled[:, 1] >= by - 1) & (labelled[:, 1] <= by + bh))
                assert len(ann["segmentation"][0]) == 8
    assert len(ids) == 9  # image ids unique across the splits
    ann_ids = [a["id"] for s in ("train", "val")
               for a in _quiet(COCO, str(tiny / "annotations" / f"person_keypoints_{s}.json")).anns.values()]
    assert len(ann_ids) == len(set(ann_ids))


def test_ground_truth_scores_perfect_ap(tiny: Path) -> None:
    gt = _quiet(COCO, str(tiny / "annotations" / "person_keypoints_train.json"))
    results = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
               for a in gt.anns.values()]
    dt = _quiet(gt.loadRes, results)
    ev = COCOeval(gt, dt, "keypoints")
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    _quiet(ev.summarize)
    assert ev.stats[0] == pytest.approx(1.0)  # AP
    # A wrong answer must not score 1: shift every keypoint by 8 px.
    shifted = [dict(r, keypoints=[v + 8 if i % 3 < 2 and v > 0 else v for i, v in enumerate(r["keypoints"])])
               for r in results]
    ev = COCOeval(gt, _quiet(gt.loadRes, shifted), "keypoints")
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    _quiet(ev.summarize)
    assert ev.stats[0] < 0.9


def test_deterministic_per_seed(tiny: Path, tmp_path: Path) -> None:
    again = synthesize(SynthConfig(tmp_path / "again", train_images=6, val_images=3, seed=1))
    for rel in ("annotations/person_keypoints_train.json", "annotations/person_keypoints_val.json",
                "train/000000000004.jpg", "val/000001000002.jpg"):
        assert (again / rel).read_bytes() == (tiny / rel).read_bytes(), rel
    other = synthesize(SynthConfig(tmp_path / "other", train_images=2, val_images=0, seed=2))
    assert (other / "train/000000000001.jpg").read_bytes() != (tiny / "train/000000000001.jpg").read_bytes()
    # An image does not depend on how many are rendered: image index 3 alone gives the same people.
    gt = _quiet(COCO, str(tiny / "annotations" / "person_keypoints_train.json"))
    alone = render_image(1, 0, 3)[1]
    assert [a["keypoints"] for a in gt.loadAnns(gt.getAnnIds(imgIds=4))] == [a["keypoints"] for a in alone]


def test_occlusion_and_sizes_over_many_images() -> None:
    vis, areas = [], []
    for i in range(30):
        for ann in render_image(0, 0, i)[1]:
            vis.append(ann["keypoints"][2::3])
            areas.append(ann["area"])
    vis, areas = np.array(vis), np.array(areas)
    body = vis[:, 5:]  # face points are also v=1 when the head hides them; body points only by others
    assert 0.03 < np.mean(body == 1) < 0.3  # people hide each other, but most keypoints are visible
    assert np.mean(vis == 2) > 0.6
    assert np.any(vis[:, :5] == 0)  # faces seen from behind are unlabelled, as in COCO
    assert np.mean(areas >= 32**2) > 0.8  # mostly medium and large, as COCOeval's APm/APl need
    assert np.any(areas >= 96**2) and np.any((areas >= 32**2) & (areas < 96**2))


def test_left_band_marks_left_wrists() -> None:
    """The yellow cuff sits just above left wrists and ankles, never the right ones."""
    near = {"left": 0, "right": 0}
    band = np.array(BAND_BGR)
    for i in range(12):
        bgr, anns = render_image(0, 0, i)
        is_band = np.linalg.norm(bgr.astype(float) - band, axis=2) < 60
        for ann in anns:
            kps = np.array(ann["keypoints"]).reshape(17, 3)
            for side, wrist, elbow in (("left", 9, 7), ("right", 10, 8)):
                if kps[wrist, 2] == 2 and kps[elbow, 2] == 2:
                    x, y = (0.8 * kps[wrist, :2] + 0.2 * kps[elbow, :2]).round().astype(int)
                    near[side] += bool(is_band[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2].any())
    assert near["left"] >= 5 and near["left"] > 3 * near["right"]
