"""The built-in keypoint sets against their published definitions; description files; recognising a set from an
annotation file's category.

The expectations below are transcribed from mmpose 1.x's `configs/_base_/datasets/*.py` (each keypoint's "swap"
and "type", its "sigmas") and from the datasets' own files, written out by name rather than copied from
`kdcache.keypoint_sets`.
"""

import dataclasses
import json
import re

import pytest

from kdcache.errors import UserError
from kdcache.keypoints import (AIC_14, AP10K_17, COCO_17, COCO_WHOLEBODY_133, CROWDPOSE_14, DEFAULT_OKS_SIGMA,
                               KEYPOINT_SETS, MPII_16, flip_pairs_from_names, keypoint_set_from_file,
                               keypoint_set_of_category)

SIDES = ["shoulder", "elbow", "wrist", "hip", "knee", "ankle"]
HAND = ["hand_root"] + [f"{finger}{j}" for finger in ("thumb", "forefinger", "middle_finger", "ring_finger",
                                                       "pinky_finger") for j in range(1, 5)]
# COCO-WholeBody's face swaps as mmpose lists them ("face-0" swaps with "face-16", ...): the 68-point layout's
# contour, brows, nose base, eyes, outer and inner lips.
FACE_SWAPS = [(0, 16), (1, 15), (2, 14), (3, 13), (4, 12), (5, 11), (6, 10), (7, 9), (17, 26), (18, 25), (19, 24),
              (20, 23), (21, 22), (31, 35), (32, 34), (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),
              (48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)]

# Published swap lists, as name pairs.
SWAPS = {
    "coco-17": [("left_eye", "right_eye"), ("left_ear", "right_ear")] + [(f"left_{j}", f"right_{j}") for j in SIDES],
    "coco-wholebody-133": ([("left_eye", "right_eye"), ("left_ear", "right_ear")]
                           + [(f"left_{j}", f"right_{j}") for j in SIDES + ["big_toe", "small_toe", "heel"] + HAND]
                           + [(f"face-{a}", f"face-{b}") for a, b in FACE_SWAPS]),
    "crowdpose-14": [(f"left_{j}", f"right_{j}") for j in SIDES],
    "aic-14": [(f"left_{j}", f"right_{j}") for j in SIDES],
    "mpii-16": [(f"left_{j}", f"right_{j}") for j in SIDES],
    "ap10k-17": [("left_eye", "right_eye")] + [(f"left_{j}", f"right_{j}") for j in
                                               ("shoulder", "elbow", "front_paw", "hip", "knee", "back_paw")],
}
COUNTS = {"coco-17": 17, "coco-wholebody-133": 133, "crowdpose-14": 14, "aic-14": 14, "mpii-16": 16, "ap10k-17": 17}
# The keypoints each meta file types "upper" (AP-10K: both front paws, see keypoint_sets.py).
UPPER = {
    "coco-17": ["nose", "left_eye", "right_eye", "left_ear", "right_ear"] + [f"{s}_{j}" for s in ("left", "right")
                                                                            for j in SIDES[:3]],
    "crowdpose-14": ["head", "neck"] + [f"{s}_{j}" for s in ("left", "right") for j in SIDES[:3]],
    "aic-14": ["head_top", "neck"] + [f"{s}_{j}" for s in ("left", "right") for j in SIDES[:3]],
    "mpii-16": ["thorax", "upper_neck", "head_top"] + [f"{s}_{j}" for s in ("left", "right") for j in SIDES[:3]],
    "ap10k-17": ["left_eye", "right_eye", "nose", "neck"] + [f"{s}_{j}" for s in ("left", "right")
                                                             for j in ("shoulder", "elbow", "front_paw")],
}
UPPER["coco-wholebody-133"] = UPPER["coco-17"]
# Spot values of the published sigmas, by keypoint name.
SIGMAS = {
    "coco-17": {"nose": 0.026, "left_ear": 0.035, "right_hip": 0.107, "left_ankle": 0.089},
    "coco-wholebody-133": {"nose": 0.026, "left_big_toe": 0.068, "right_big_toe": 0.092, "right_heel": 0.094,
                           "face-0": 0.042, "face-16": 0.045, "face-47": 0.034, "face-67": 0.008,
                           "left_hand_root": 0.029, "right_hand_root": 0.029, "left_thumb4": 0.047,
                           "right_pinky_finger4": 0.031},
    "crowdpose-14": {"left_shoulder": 0.079, "right_wrist": 0.062, "left_ankle": 0.089, "head": 0.079, "neck": 0.079},
    "aic-14": {"right_shoulder": 0.01388152, "left_shoulder": 0.01417709, "right_hip": 0.03909642,
               "left_ankle": 0.02415081, "neck": 0.01236173},
    "mpii-16": {"right_ankle": 0.089, "right_knee": 0.083, "pelvis": 0.026, "head_top": 0.026, "left_shoulder": 0.179,
                "left_wrist": 0.062},
    "ap10k-17": {"left_eye": 0.025, "nose": 0.026, "root_of_tail": 0.035, "left_shoulder": 0.079,
                 "right_front_paw": 0.062, "left_back_paw": 0.089, "right_hip": 0.107},
}
# The sum of each meta file's sigmas list: any single wrong value changes it.
SIGMA_SUMS = {"coco-17": 1.138, "coco-wholebody-133": 3.861, "crowdpose-14": 1.15, "aic-14": 0.30056174,
              "mpii-16": 1.288, "ap10k-17": 1.138}
SETS = list(KEYPOINT_SETS.values())
IDS = list(KEYPOINT_SETS)


def _pairs(keypoints, pairs):
    return {frozenset((keypoints.names.index(a), keypoints.names.index(b))) for a, b in pairs}


@pytest.mark.parametrize("keypoints", SETS, ids=IDS)
def test_count_flip_pairs_and_sigmas_are_the_published_ones(keypoints):
    k = COUNTS[keypoints.name]
    assert keypoints.num_keypoints == len(keypoints.oks_sigmas) == len(keypoints.flip_index) == k
    assert {frozenset(p) for p in keypoints.flip_pairs} == _pairs(keypoints, SWAPS[keypoints.name])
    assert len(keypoints.flip_pairs) == len(SWAPS[keypoints.name])
    assert sum(keypoints.oks_sigmas) == pytest.approx(SIGMA_SUMS[keypoints.name], abs=1e-9)
    for name, sigma in SIGMAS[keypoints.name].items():
        assert keypoints.oks_sigmas[keypoints.names.index(name)] == sigma, name
    assert {keypoints.names[i] for i in keypoints.upper_body} == set(UPPER[keypoints.name])


@pytest.mark.parametrize("keypoints", SETS, ids=IDS)
def test_flip_index_is_an_involution_taking_each_left_name_to_its_right_twin(keypoints):
    flip, names = keypoints.flip_index, keypoints.names
    assert [flip[flip[i]] for i in range(len(names))] == list(range(len(names)))
    lefts = [i for i, n in enumerate(names) if n.startswith("left_")]
    assert lefts and all(names[flip[i]] == "right_" + names[i][len("left_"):] for i in lefts)
    assert sum(n.startswith("right_") for n in names) == len(lefts)


@pytest.mark.parametrize("keypoints", SETS, ids=IDS)
def test_pairs_derived_from_names_are_the_published_ones(keypoints):
    derived = {frozenset(p) for p in flip_pairs_from_names(keypoints.names)}
    published = _pairs(keypoints, SWAPS[keypoints.name])
    if keypoints is COCO_WHOLEBODY_133:
        # "face-0".."face-67" do not say their side: the names give every pair but the face's 29.
        face = _pairs(keypoints, [(f"face-{a}", f"face-{b}") for a, b in FACE_SWAPS])
        assert derived == published - face and len(face) == 29
    else:
        assert derived == published


def test_wholebody_channels_are_body_foot_face_left_hand_right_hand():
    wb = COCO_WHOLEBODY_133
    assert [(p, len(wb.part(p))) for p, _, _ in wb.parts] == [("body", 17), ("foot", 6), ("face", 68),
                                                                ("left_hand", 21), ("right_hand", 21)]
    assert [wb.part(p)[0] for p, _, _ in wb.parts] == [0, 17, 23, 91, 112] and wb.part("right_hand")[-1] == 132
    assert wb.names[:17] == COCO_17.names and wb.oks_sigmas[:17] == COCO_17.oks_sigmas
    assert [wb.names[i] for i in wb.part("foot")] == ["left_big_toe", "left_small_toe", "left_heel",
                                                      "right_big_toe", "right_small_toe", "right_heel"]
    assert [wb.names[i] for i in wb.part("face")] == [f"face-{i}" for i in range(68)]
    assert [wb.names[i] for i in wb.part("left_hand")] == ["left_" + j for j in HAND]
    assert [wb.names[i] for i in wb.part("right_hand")] == ["right_" + j for j in HAND]
    hand_sigmas = [wb.oks_sigmas[i] for i in wb.part("left_hand")]
    assert hand_sigmas == [wb.oks_sigmas[i] for i in wb.part("right_hand")] and hand_sigmas[4] == 0.047
    # Limbs: COCO's 19, ankle to big toe, small toe and heel on each side, 20 per hand; none on the face.
    assert len(wb.skeleton) == 19 + 6 + 40 and (16, 18) in wb.skeleton and (92, 93) in wb.skeleton
    assert not any(24 <= i <= 91 for limb in wb.skeleton for i in limb)
    assert set(wb.lower_body) == set(range(11, 23))
    with pytest.raises(KeyError):
        wb.part("torso")


def test_skeletons_are_the_published_limbs():
    def limbs(keypoints, pairs):
        return {frozenset(keypoints.names.index(n) + 1 for n in pair) for pair in pairs}

    assert {frozenset(p) for p in CROWDPOSE_14.skeleton} == limbs(CROWDPOSE_14, [
        ("left_ankle", "left_knee"), ("left_knee", "left_hip"), ("right_ankle", "right_knee"),
        ("right_knee", "right_hip"), ("left_hip", "right_hip"), ("left_shoulder", "left_hip"),
        ("right_shoulder", "right_hip"), ("left_shoulder", "right_shoulder"), ("left_shoulder", "left_elbow"),
        ("right_shoulder", "right_elbow"), ("left_elbow", "left_wrist"), ("right_elbow", "right_wrist"),
        ("head", "neck"), ("right_shoulder", "neck"), ("left_shoulder", "neck")])
    assert {frozenset(p) for p in MPII_16.skeleton} == limbs(MPII_16, [
        ("right_ankle", "right_knee"), ("right_knee", "right_hip"), ("right_hip", "pelvis"), ("pelvis", "left_hip"),
        ("left_hip", "left_knee"), ("left_knee", "left_ankle"), ("pelvis", "thorax"), ("thorax", "upper_neck"),
        ("upper_neck", "head_top"), ("upper_neck", "right_shoulder"), ("right_shoulder", "right_elbow"),
        ("right_elbow", "right_wrist"), ("upper_neck", "left_shoulder"), ("left_shoulder", "left_elbow"),
        ("left_elbow", "left_wrist")])
    assert {frozenset(p) for p in AIC_14.skeleton} == limbs(AIC_14, [
        ("right_wrist", "right_elbow"), ("right_elbow", "right_shoulder"), ("right_shoulder", "neck"),
        ("neck", "left_shoulder"), ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"),
        ("right_ankle", "right_knee"), ("right_knee", "right_hip"), ("right_hip", "left_hip"),
        ("left_hip", "left_knee"), ("left_knee", "left_ankle"), ("head_top", "neck"),
        ("right_shoulder", "right_hip"), ("left_shoulder", "left_hip")])
    assert {frozenset(p) for p in AP10K_17.skeleton} == limbs(AP10K_17, [
        ("left_eye", "right_eye"), ("left_eye", "nose"), ("right_eye", "nose"), ("nose", "neck"),
        ("neck", "root_of_tail"), ("neck", "left_shoulder"), ("left_shoulder", "left_elbow"),
        ("left_elbow", "left_front_paw"), ("neck", "right_shoulder"), ("right_shoulder", "right_elbow"),
        ("right_elbow", "right_front_paw"), ("root_of_tail", "left_hip"), ("left_hip", "left_knee"),
        ("left_knee", "left_back_paw"), ("root_of_tail", "right_hip"), ("right_hip", "right_knee"),
        ("right_knee", "right_back_paw")])


# ---- description files ----

def _write(tmp_path, doc, name="set.json"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


@pytest.mark.parametrize("keypoints", SETS, ids=IDS)
def test_a_description_round_trips(tmp_path, keypoints):
    mine = dataclasses.replace(keypoints, name="my-" + keypoints.name)
    assert keypoint_set_from_file(_write(tmp_path, mine.description())) == mine


def test_a_bare_description_gets_pairs_halves_and_sigmas_from_defaults(tmp_path):
    names = ["head", "left_hand", "right_hand", "tail", "left_paw", "right_paw"]
    got = keypoint_set_from_file(_write(tmp_path, {"name": "lizard-6", "keypoints": names}))
    assert (got.name, got.title, got.names) == ("lizard-6", "lizard-6", tuple(names))
    assert got.flip_pairs == ((1, 2), (4, 5)) and got.skeleton == () and got.parts == ()
    assert got.oks_sigmas == (DEFAULT_OKS_SIGMA,) * 6 and DEFAULT_OKS_SIGMA == 0.067
    assert (got.upper_body, got.lower_body) == ((0, 1, 2), (3, 4, 5))  # "paw" says neither half: the first half
    named = keypoint_set_from_file(_write(tmp_path, {"name": "arm-3", "keypoints": ["neck", "left_hip", "right_hip"],
                                                     "skeleton": [["neck", "left_hip"], [1, 3]]}))
    assert (named.upper_body, named.lower_body, named.skeleton) == ((0,), (1, 2), ((1, 2), (1, 3)))


BASE = {"name": "dog-4", "keypoints": ["nose", "left_ear", "right_ear", "tail"]}


@pytest.mark.parametrize("doc, message", [
    ("{not json", r"is not a readable JSON file .*; write \{\"name\": \.\.\., \"keypoints\": \[\.\.\.\]\}"),
    ([1, 2], r"holds a JSON list; a keypoint set is an object"),
    ({**BASE, "sigma": [0.1]}, r"unknown key 'sigma'; a keypoint set description has the keys name, title, keypoints"),
    ({"keypoints": BASE["keypoints"]}, r"\"name\" must be a non-empty string"),
    ({**BASE, "name": "coco-17"}, r"\"name\" 'coco-17' is a built-in keypoint set's; give yours its own name"),
    ({**BASE, "name": "ochuman-17"}, r"\"name\" 'ochuman-17' is a built-in keypoint set's"),
    ({**BASE, "keypoints": []}, r"\"keypoints\" must be a non-empty list of keypoint names"),
    ({**BASE, "keypoints": ["nose", "nose"]}, r"keypoint 'nose' is listed twice in \"keypoints\""),
    ({**BASE, "flip_pairs": [["left_ear", "right_eye"]]}, r"\"flip_pairs\" names 'right_eye', which is not one of"),
    ({**BASE, "flip_pairs": [[1, 2]]}, r"\"flip_pairs\" names 1, which is not one of \"keypoints\"$"),
    ({**BASE, "flip_pairs": ["left_ear"]}, r"\"flip_pairs\" must be a list of keypoint pairs, e\.g\."),
    ({**BASE, "flip_pairs": [["left_ear", "right_ear"], ["nose", "left_ear"]]},
     r"\"flip_pairs\" uses 'left_ear' twice; each keypoint mirrors into at most one other"),
    ({**BASE, "skeleton": [[0, 1]]},
     r"\"skeleton\" names 0, which is not one of \"keypoints\" nor a 1-based index 1\.\.4"),
    ({**BASE, "sigmas": [0.1, 0.1]}, r"\"sigmas\" must be 4 positive numbers, one per keypoint \(or left out: 0\.067"),
    ({**BASE, "sigmas": [0.1, 0.1, 0.1, -1]}, r"\"sigmas\" must be 4 positive numbers"),
    ({**BASE, "upper_body": ["nose"], "lower_body": ["nose", "tail"]}, r"\"upper_body\" and \"lower_body\" share a "
                                                                                       r"keypoint or repeat one"),
    ({**BASE, "upper_body": "nose"}, r"\"upper_body\" must be a list of keypoint names"),
    ({**BASE, "parts": {"head": [0, 3], "rest": [2, 4]}}, r"parts must be disjoint, non-empty channel ranges within "
                                                          r"0\.\.4; fix the description"),
    ({**BASE, "parts": {"head": "0-3"}}, r"\"parts\" must map part names to 0-based \[start, stop\] channel ranges"),
])
def test_a_bad_description_is_refused_in_one_line_saying_what_to_write(tmp_path, doc, message):
    path = _write(tmp_path, doc)
    with pytest.raises(UserError, match=message if "readable" in message else f"^{re.escape(str(path))}: {message}") \
            as caught:
        keypoint_set_from_file(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_a_missing_description_file_is_named(tmp_path):
    with pytest.raises(UserError, match=r"keypoint set file .*nowhere\.json does not exist"):
        keypoint_set_from_file(tmp_path / "nowhere.json")


# ---- recognising a set from an annotation file's category ----

def test_categories_as_the_real_files_write_them_are_recognised():
    # CrowdPose's crowdpose_val.json (its skeleton is COCO's, with indices past 14).
    crowdpose = {"supercategory": "person", "id": 1, "name": "person", "keypoints": [
        "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
        "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "head", "neck"],
        "skeleton": [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9],
                     [8, 10], [9, 11]]}
    assert keypoint_set_of_category(crowdpose) is CROWDPOSE_14
    # mmpose's converted AIC files.
    aic = {"keypoints": ["Right Shoulder", "Right Elbow", "Right Wrist", "Left Shoulder", "Left Elbow", "Left Wrist",
                         "Right Hip", "Right Knee", "Right Ankle", "Left Hip", "Left Knee", "Left Ankle", "Head top",
                         "Neck"]}
    assert keypoint_set_of_category(aic) is AIC_14
    # AP-10K: one category per species, all with the same names.
    antelope = {"id": 1, "name": "antelope", "supercategory": "Bovidae", "keypoints": [
        "left_eye", "right_eye", "nose", "neck", "root_of_tail", "left_shoulder", "left_elbow", "left_front_paw",
        "right_shoulder", "right_elbow", "right_front_paw", "left_hip", "left_knee", "left_back_paw", "right_hip",
        "right_knee", "right_back_paw"]}
    assert keypoint_set_of_category(antelope) is AP10K_17
    # COCO, OCHuman and COCO-WholeBody files all declare COCO's 17 body names.
    assert keypoint_set_of_category(COCO_17.category()) is COCO_17
    # MPII publishes no COCO-style file; its own joint names ("r ankle", ...) and mmpose's are both recognised.
    mpii = ["r ankle", "r knee", "r hip", "l hip", "l knee", "l ankle", "pelvis", "thorax", "upper neck", "head top",
            "r wrist", "r elbow", "r shoulder", "l shoulder", "l elbow", "l wrist"]
    assert keypoint_set_of_category({"keypoints": mpii}) is MPII_16


@pytest.mark.parametrize("keypoints", SETS, ids=IDS)
def test_each_set_recognises_its_own_category_and_mmpose_spellings(keypoints):
    assert keypoint_set_of_category(keypoints.category()) is keypoints
    assert keypoint_set_of_category({"keypoints": [n.upper().replace("_", " ") for n in keypoints.names]}) is keypoints


def test_mmpose_meta_spellings_of_ap10k_and_crowdpose_are_recognised():
    ap10k = ["L_Eye", "R_Eye", "Nose", "Neck", "Root of tail", "L_Shoulder", "L_Elbow", "L_F_Paw", "R_Shoulder",
             "R_Elbow", "R_F_Paw", "L_Hip", "L_Knee", "L_B_Paw", "R_Hip", "R_Knee", "R_B_Paw"]
    assert keypoint_set_of_category({"keypoints": ap10k}) is AP10K_17
    assert {frozenset(p) for p in flip_pairs_from_names(ap10k)} == {frozenset(p) for p in AP10K_17.flip_pairs}
    crowdpose = list(CROWDPOSE_14.names[:12]) + ["top_head", "neck"]
    assert keypoint_set_of_category({"keypoints": crowdpose}) is CROWDPOSE_14


@pytest.mark.parametrize("category", [
    {}, {"keypoints": []}, {"keypoints": "nose"}, {"keypoints": [1, 2]},
    {"keypoints": list(reversed(COCO_17.names))},                       # COCO's names in another order
    {"keypoints": list(COCO_17.names[:16]) + ["tail"]},                  # 17 names, not COCO's
    {"keypoints": list(CROWDPOSE_14.names[:13]) + ["chin"]},
])
def test_a_category_naming_no_built_in_set_is_not_recognised(category):
    assert keypoint_set_of_category(category) is None
