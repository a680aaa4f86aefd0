"""kdcache.synth: COCO layout, keypoint/visibility invariants, self-scoring, determinism, cues, unlabelled split."""

import contextlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from kdcache.keypoints import COCO_17
from kdcache.cli import main
from kdcache.synth import SynthConfig, SynthDetector, render_image, synthesize
from kdcache.synth_paint import BAND_BGR


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


# ---- the unlabelled split: images, a simulated detector's boxes, the truth kept apart ---------------------

UNLABELLED_WH = (160, 128)


def _unlabelled(out: Path, detector: SynthDetector = SynthDetector(), images: int = 40) -> Path:
    return synthesize(SynthConfig(out, train_images=0, val_images=0, unlabelled_images=images, seed=2,
                                  image_wh=UNLABELLED_WH, detector=detector))


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory) -> Path:
    return _unlabelled(tmp_path_factory.mktemp("unlabelled"))


def _xyxy(bbox_xywh: list[float]) -> np.ndarray:
    x, y, w, h = bbox_xywh
    return np.array([x, y, x + w, y + h])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _best_ious(unlabelled: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(each true person's best IoU with a detection, each detection's best IoU with a true person, scores)."""
    truth = json.loads((unlabelled / "annotations/person_keypoints_unlabelled_truth.json").read_text())
    dets = json.loads((unlabelled / "annotations/detections_unlabelled.json").read_text())
    people = [(a["image_id"], _xyxy(a["bbox"])) for a in truth["annotations"]]
    pairs = np.array([[_iou(_xyxy(d["bbox"]), box) if d["image_id"] == iid else 0.0 for iid, box in people]
                      for d in dets])  # [detections, people]
    return pairs.max(axis=0), pairs.max(axis=1), np.array([d["score"] for d in dets])


def test_unlabelled_split_layout(unlabelled: Path) -> None:
    assert {p.name for p in unlabelled.iterdir()} == {"annotations", "unlabelled"}  # empty splits write nothing
    assert {p.name for p in (unlabelled / "annotations").iterdir()} == {
        "image_info_unlabelled.json", "detections_unlabelled.json", "person_keypoints_unlabelled_truth.json"}
    info = json.loads((unlabelled / "annotations/image_info_unlabelled.json").read_text())
    assert "annotations" not in info and info["categories"] == [COCO_17.category(1)]
    assert [img["id"] for img in info["images"]] == list(range(2_000_001, 2_000_041))
    sizes = {}
    for img in info["images"]:
        pixels = cv2.imread(str(unlabelled / "unlabelled" / img["file_name"]))
        assert img["file_name"] == f"{img['id']:012d}.jpg" and pixels.shape == (img["height"], img["width"], 3)
        sizes[img["id"]] = (img["width"], img["height"])
    dets = json.loads((unlabelled / "annotations/detections_unlabelled.json").read_text())
    assert [d["image_id"] for d in dets] == sorted(d["image_id"] for d in dets)
    assert len({d["image_id"] for d in dets}) > 30  # nearly every image has a detection
    for d in dets:
        assert set(d) == {"image_id", "category_id", "bbox", "score"} and d["category_id"] == 1
        w, h = sizes[d["image_id"]]
        x, y, bw, bh = d["bbox"]
        assert x >= 0 and y >= 0 and bw > 0 and bh > 0 and x + bw <= w + 1e-6 and y + bh <= h + 1e-6
        assert 0 < d["score"] <= 1 and d["score"] == round(d["score"], 3)
        assert d["bbox"] == [round(v, 2) for v in d["bbox"]]
    # The truth is what rendering the split's images gives, as train images are rendered (split id 2).
    truth = _quiet(COCO, str(unlabelled / "annotations/person_keypoints_unlabelled_truth.json"))
    assert truth.dataset["images"] == info["images"] and truth.dataset["categories"] == info["categories"]
    alone = render_image(2, 2, 5, UNLABELLED_WH)[1]  # seed 2, split 2, index 5: image 2_000_006
    stored = truth.loadAnns(truth.getAnnIds(imgIds=2_000_006))
    assert [a["keypoints"] for a in stored] == [a["keypoints"] for a in alone]


def test_detector_is_realistic(unlabelled: Path) -> None:
    person_iou, det_iou, scores = _best_ious(unlabelled)
    assert len(person_iou) > 60
    assert 0.7 < np.mean(person_iou > 0.5) < 1  # most people are found, some are missed
    true_pos, false_pos = det_iou > 0.5, det_iou < 0.1
    assert false_pos.sum() >= 10  # 0-2 per image
    assert scores[true_pos].mean() > scores[false_pos].mean() + 0.25
    assert np.mean(scores[true_pos] > 0.5) > 0.9 and np.mean(scores[false_pos] < 0.5) > 0.8


def test_detector_misses_small_people_more_and_scores_fall_with_iou() -> None:
    rng, det = np.random.default_rng(0), SynthDetector(max_false_positives=0)
    found = {}
    for side in (16, 100):
        boxes = np.tile([[10.0, 10.0, side, side]], (500, 1))
        bbox_xywh, scores = det.detect(rng, boxes, (200, 200))
        found[side] = len(scores) / 500
        ious = np.array([_iou(_xyxy(b), _xyxy(boxes[0])) for b in bbox_xywh])
        assert np.corrcoef(ious, scores)[0, 1] > 0.3
    assert found[16] < 0.75 and found[100] > 0.9


def test_unlabelled_split_is_deterministic_and_detector_has_its_own_stream(unlabelled: Path, tmp_path: Path) -> None:
    again = _unlabelled(tmp_path / "again")
    perfect = _unlabelled(tmp_path / "perfect", SynthDetector(miss_prob=0, small_miss_prob=0, max_false_positives=0))
    names = sorted(p.name for p in (unlabelled / "unlabelled").iterdir())
    assert len(names) == 40
    for name in names:
        image = (unlabelled / "unlabelled" / name).read_bytes()
        assert (again / "unlabelled" / name).read_bytes() == image
        assert (perfect / "unlabelled" / name).read_bytes() == image  # the detector's settings change no pixel
    dets = "annotations/detections_unlabelled.json"
    assert (again / dets).read_bytes() == (unlabelled / dets).read_bytes()
    assert (perfect / dets).read_bytes() != (unlabelled / dets).read_bytes()
    # Image i's detections come from its own stream, [seed, split id, i, 1], whatever the other images.
    truth = json.loads((unlabelled / "annotations/person_keypoints_unlabelled_truth.json").read_text())
    for index in (3, 4):
        iid = 2_000_001 + index
        bbox_xywh, scores = SynthDetector().detect(np.random.default_rng([2, 2, index, 1]),
                                                   [a["bbox"] for a in truth["annotations"] if a["image_id"] == iid],
                                                   UNLABELLED_WH)
        stored = [d for d in json.loads((unlabelled / dets).read_text()) if d["image_id"] == iid]
        assert sorted(d["score"] for d in stored) == sorted(round(float(v), 3) for v in scores)
        assert sorted(d["bbox"] for d in stored) == sorted(bbox_xywh.tolist())
    person_iou, det_iou, _ = _best_ious(perfect)
    assert np.all(person_iou > 0.3) and np.all(det_iou > 0.3)  # nobody missed, no false positive


def test_a_split_with_no_images_writes_nothing(tmp_path: Path) -> None:
    out = synthesize(SynthConfig(tmp_path / "data", train_images=2, val_images=0, image_wh=(64, 64)))
    assert {p.relative_to(out).as_posix() for p in out.rglob("*")} == {
        "annotations", "annotations/person_keypoints_train.json", "train", "train/000000000001.jpg",
        "train/000000000002.jpg"}
    empty = synthesize(SynthConfig(tmp_path / "empty", train_images=0, val_images=0))
    assert not empty.exists()


def test_cli_synth_unlabelled_images(tmp_path: Path, capsys) -> None:
    args = ["synth", "--train-images", "0", "--val-images", "0", "--seed", "4"]
    assert main([*args, "--out", str(tmp_path / "cli"), "--unlabelled-images", "2"]) == 0
    lib = synthesize(SynthConfig(tmp_path / "lib", train_images=0, val_images=0, unlabelled_images=2, seed=4))
    for rel in ("annotations/detections_unlabelled.json", "annotations/image_info_unlabelled.json",
                "unlabelled/000002000002.jpg"):
        assert (tmp_path / "cli" / rel).read_bytes() == (lib / rel).read_bytes(), rel
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "neg"), "--unlabelled-images", "-1"]) == 2
    assert "--unlabelled-images" in capsys.readouterr().err and not (tmp_path / "neg").exists()
