"""COCO-WholeBody: its files load as 133-point people, its protocol scores each part, `synth` writes its layout.

The file layout is COCO-WholeBody's (jin-s13/COCO-WholeBody): COCO's 17 body keypoints in `keypoints`, then
`foot_kpts` (6), `face_kpts` (68), `lefthand_kpts` (21), `righthand_kpts` (21), each with `*_valid`, and
face/hand boxes. The protocol is xtcocotools' (`keypoints_body`, `_foot`, `_face`, `_lefthand`, `_righthand`,
`_wholebody`); `scripts/check_wholebody_metric.py` compares kdcache's numbers with xtcocotools' itself.
"""

import json

import numpy as np
import pytest

from kdcache.coco import instances_from_coco, keypoint_set_of, load_coco
from kdcache.errors import UserError
from kdcache.keypoints import COCO_17, COCO_WHOLEBODY_133
from kdcache.metrics import coco_keypoint_metrics, format_metrics
from kdcache.synth import SynthConfig, synthesize
from kdcache.wholebody import split_wholebody_result

PARTS = (("foot_kpts", 6), ("face_kpts", 68), ("lefthand_kpts", 21), ("righthand_kpts", 21))


def person(ann_id: int, x0: float, labelled: dict[str, bool] | None = None, image_id: int = 1) -> dict:
    """A person whose point j of the whole 133 sits at (x0 + j, 100 + j % 7), labelled per field."""
    labelled = {"keypoints": True, **dict.fromkeys((f for f, _ in PARTS), True), **(labelled or {})}
    ann = {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0, "bbox": [x0, 80.0, 140.0, 60.0],
           "area": 5000.0}
    start = 0
    for field, n in (("keypoints", 17), *PARTS):
        on = labelled[field]
        ann[field] = [v for j in range(start, start + n) for v in (x0 + j if on else 0, 100.0 + j % 7 if on else 0,
                                                                     2 if on else 0)]
        if field != "keypoints":
            ann[field.replace("kpts", "valid")] = on
        start += n
    ann["num_keypoints"] = 17 if labelled["keypoints"] else 0
    return ann


def wholebody_file(path, people: list[dict]) -> str:
    doc = {"images": [{"id": 1, "file_name": "a.jpg", "width": 640, "height": 480},
                      {"id": 2, "file_name": "b.jpg", "width": 640, "height": 480}],
           "annotations": people, "categories": [COCO_17.category(1)]}  # COCO-WholeBody keeps COCO's category
    path.write_text(json.dumps(doc))
    return path


def test_a_wholebody_person_is_one_133_point_instance_in_part_order(tmp_path):
    not_valid = person(2, 200.0)
    not_valid["lefthand_valid"] = False  # points written but flagged: unlabelled
    hands_only = person(3, 400.0, {"keypoints": False})
    bare = {k: v for k, v in person(4, 10.0, image_id=2).items() if not k.endswith(("_kpts", "_valid"))}
    coco = load_coco(wholebody_file(tmp_path / "wb.json", [person(1, 0.0), not_valid, hands_only, bare]))
    assert keypoint_set_of(coco) is COCO_WHOLEBODY_133  # from the part fields: the category names COCO's 17
    by_id = {i.ann_id: i for i in instances_from_coco(coco)}
    # A person counts as labelled by its body, as mmpose loads COCO-WholeBody: the hands-only one is not.
    assert sorted(by_id) == [1, 2, 4]
    full = by_id[1].keypoints
    assert full.shape == (133, 3)
    np.testing.assert_array_equal(full[:, 0], np.arange(133))  # body, foot, face, left hand, right hand
    np.testing.assert_array_equal(full[:, 2], 2)
    hand = COCO_WHOLEBODY_133.part("left_hand")
    assert (by_id[2].keypoints[hand.start:hand.stop, 2] == 0).all()
    assert (by_id[2].keypoints[hand.stop:, 2] == 2).all()
    assert (by_id[4].keypoints[17:, 2] == 0).all() and (by_id[4].keypoints[:17, 2] == 2).all()  # parts filled


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(face_kpts=a["face_kpts"][:-3]), "face_kpts that are not 68 x 3 finite numbers"),
    (lambda a: a.update(righthand_valid="yes"), "righthand_valid 'yes', not true or false"),
    (lambda a: a.update(keypoints=a["keypoints"][:42]), "42 keypoint values, expected 17 x 3"),
])
def test_a_malformed_wholebody_person_is_one_line(tmp_path, change, message):
    ann = person(1, 0.0)
    change(ann)
    with pytest.raises(UserError, match=message):
        load_coco(wholebody_file(tmp_path / "bad.json", [ann]))


# ------------------------------------------------------------------------------------------- the protocol


@pytest.fixture()
def scene(tmp_path):
    """Two large people on image 1, one on image 2; every point labelled."""
    people = [person(1, 0.0), person(2, 300.0), person(3, 50.0, image_id=2)]
    return wholebody_file(tmp_path / "wb.json", people), people


def oracle(people: list[dict], **per_id) -> list[dict]:
    """Perfect results in kdcache's joined layout; `per_id[str(id)]` edits one person's [133, 3] array."""
    out = []
    for ann in people:
        k = np.concatenate([np.asarray(ann[f], float).reshape(-1, 3) for f in ("keypoints", *dict(PARTS))])
        k[:, 2] = 0.9
        if f"p{ann['id']}" in per_id:
            per_id[f"p{ann['id']}"](k)
        out.append({"image_id": ann["image_id"], "category_id": 1, "keypoints": k.ravel().tolist(), "score": 0.9})
    return out


def parts_ap(metrics: dict) -> dict:
    return {p: metrics[f"{p} AP"] for p in ("body", "foot", "face", "left_hand", "right_hand")} | {
        "wholebody": metrics["AP"]}


def test_each_part_is_scored_on_its_own_points_and_sigmas(scene):
    ann, people = scene
    assert set(parts_ap(coco_keypoint_metrics(ann, oracle(people))).values()) == {100.0}

    def face_off(k):
        k[23:91, :2] += 40.0  # the face 40 px away: face OKS ~0 for it, the other parts untouched
    got = parts_ap(coco_keypoint_metrics(ann, oracle(people, p1=face_off)))
    assert got["body"] == got["foot"] == got["left_hand"] == got["right_hand"] == 100.0
    assert got["face"] < 80.0 and got["wholebody"] < 100.0
    table = format_metrics(coco_keypoint_metrics(ann, oracle(people, p1=face_off)))
    assert table.splitlines()[0] == "whole-body (all 133 keypoints):"
    assert any(line.startswith("face ") for line in table.splitlines())


def no_left_hand(k):
    k[91:112, 2] = 0.0


def test_a_part_with_no_labelled_point_ignores_that_person(tmp_path):
    """Person 1's body is labelled, its left hand is not: no left hand found for it is no miss."""
    people = [person(1, 0.0, {"lefthand_kpts": False}), person(2, 300.0)]
    ann = wholebody_file(tmp_path / "wb.json", people)
    got = coco_keypoint_metrics(ann, oracle(people, p1=no_left_hand))
    assert got["left_hand AR"] == pytest.approx(100.0) and got["left_hand AP"] == pytest.approx(100.0)


def test_a_result_without_a_positive_score_in_a_part_is_dropped_for_that_part(scene):
    """xtcocotools drops it (pycocotools would still match it: OKS ignores scores): the person is then missed."""
    ann, people = scene
    got = coco_keypoint_metrics(ann, oracle(people, p2=no_left_hand))
    assert got["left_hand AR"] == pytest.approx(100 * 2 / 3) and got["right_hand AR"] == 100.0
    assert got["AR"] == 100.0  # the whole body still has positive scores


def test_an_unmatched_result_falls_in_the_area_range_of_its_body(tmp_path):
    """xtcocotools' loadRes takes a result's area from its `keypoints`, which in COCO-WholeBody's layout are the
    body's: a false positive whose body is large but whose hand is tiny counts among the large results."""
    people = [person(1, 0.0)]
    people[0]["area"] = 20000.0  # large
    ann = wholebody_file(tmp_path / "wb.json", people)

    def elsewhere(k):
        k[:, 0] += 300.0
        k[:17, :2] = np.linspace(100.0, 300.0, 17)[:, None]  # a body 200 px square: large; its hand is not
    results = oracle(people) + [dict(r, score=0.95) for r in oracle(people, p1=elsewhere)]
    got = coco_keypoint_metrics(ann, results)
    assert got["left_hand APl"] == pytest.approx(50.0)  # the false positive outranks the match among the large


def test_results_in_wholebody_layout_score_as_joined_ones(scene):
    ann, people = scene

    def noisy(k):
        k[:, :2] += np.random.default_rng(0).normal(0, 2.0, (133, 2))
    joined = oracle(people, p1=noisy, p3=noisy)
    split = [split_wholebody_result(r) for r in joined]
    assert len(split[0]["keypoints"]) == 51 and len(split[0]["face_kpts"]) == 204
    assert coco_keypoint_metrics(ann, split) == coco_keypoint_metrics(ann, joined)


# ------------------------------------------------------------------------------------------- synth


def test_synth_wholebody_labels_the_same_people_with_their_feet_faces_and_hands(tmp_path):
    body = synthesize(SynthConfig(out=tmp_path / "body", train_images=6, val_images=0, seed=4))
    whole = synthesize(SynthConfig(out=tmp_path / "whole", train_images=6, val_images=0, seed=4,
                                   keypoint_set=COCO_WHOLEBODY_133.name))
    name = "annotations/person_keypoints_train.json"
    a, b = json.loads((body / name).read_text()), json.loads((whole / name).read_text())
    assert len(a["annotations"]) == len(b["annotations"]) > 6
    coco = load_coco(whole / name)
    assert keypoint_set_of(coco) is COCO_WHOLEBODY_133
    seen_from_behind = 0
    for x, y in zip(a["annotations"], b["annotations"]):
        # The same person: the same body keypoints; its drawn fingers may widen the mask by a pixel or two.
        assert x["keypoints"][0::3] == y["keypoints"][0::3] and x["keypoints"][1::3] == y["keypoints"][1::3]
        assert np.abs(np.subtract(x["bbox"], y["bbox"])).max() <= 3 and abs(x["area"] / y["area"] - 1) < 0.03
        k = np.asarray(y["keypoints"]).reshape(17, 3)
        hand = np.asarray(y["lefthand_kpts"]).reshape(21, 3)
        if k[9, 2] == 2 and hand[0, 2] == 2:
            np.testing.assert_allclose(hand[0, :2], k[9, :2], atol=0.01)  # the hand's root is the wrist
        foot = np.asarray(y["foot_kpts"]).reshape(6, 3)
        if k[15, 2] and foot[2, 2]:  # the left heel is near the left ankle (a foot is ~0.15 stature long)
            assert np.linalg.norm(foot[2, :2] - k[15, :2]) < 0.1 * y["bbox"][3]
        if k[0, 2] == 0:  # no nose: a face seen from behind has no face points
            seen_from_behind += 1
            assert not y["face_valid"] and max(y["face_kpts"][2::3]) == 0
        assert y["face_valid"] == (max(y["face_kpts"][2::3]) > 0)
    assert seen_from_behind > 0
