"""Keypoint sets: COCO-17's published flip pairs, names, skeleton and sigmas; what a set's checks refuse; sides read
from names; finding a set by name or count. (Every other built-in set's facts: test_keypoint_sets.py.)"""

import json

import pytest

from kdcache.errors import UserError
from kdcache.keypoints import (AIC_14, AP10K_17, COCO_17, COCO_WHOLEBODY_133, CROWDPOSE_14, KEYPOINT_SETS, MPII_16,
                               KeypointSet, body_halves_from_names, flip_pairs_from_names, keypoint_set,
                               keypoint_set_with, mirror_name)

# The COCO flip pairs as the ViTPose/mmpose COCO configs list them (0-based).
COCO_PAIRS = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]


def test_coco_flip_index_swaps_exactly_the_published_pairs():
    flip = COCO_17.flip_index
    assert len(flip) == COCO_17.num_keypoints == 17
    moved = {k: flip[k] for k in range(17) if flip[k] != k}
    assert moved == {**dict(COCO_PAIRS), **{r: l for l, r in COCO_PAIRS}}
    assert flip[0] == 0  # the nose stays
    assert [flip[flip[k]] for k in range(17)] == list(range(17))  # an involution


def test_left_and_right_names_are_exactly_the_flip_pairs():
    names = COCO_17.names
    sided = {(names.index(n), names.index("right_" + n[len("left_"):])) for n in names if n.startswith("left_")}
    assert sided == set(COCO_17.flip_pairs) == set(COCO_PAIRS)
    assert all(n.startswith(("left_", "right_")) for pair in COCO_PAIRS for n in (names[pair[0]], names[pair[1]]))


# Sets whose published OKS sigmas were measured point by point, so a left joint's differs from its right twin's.
PER_POINT_SIGMAS = {"aic-14", "coco-wholebody-133"}


@pytest.mark.parametrize("keypoints", list(KEYPOINT_SETS.values()), ids=list(KEYPOINT_SETS))
def test_mirror_closed_facts(keypoints):
    """A mirror maps the skeleton and each body half onto themselves (half-body crops and flipped targets rely on
    it), and the OKS sigmas too except where the dataset published per-point values."""
    flip = keypoints.flip_index
    limbs = {frozenset(pair) for pair in keypoints.skeleton}
    assert {frozenset(flip[i - 1] + 1 for i in pair) for pair in keypoints.skeleton} == limbs
    assert {flip[k] for k in keypoints.upper_body} == set(keypoints.upper_body)
    assert {flip[k] for k in keypoints.lower_body} == set(keypoints.lower_body)
    mirrored = [keypoints.oks_sigmas[flip[k]] for k in range(keypoints.num_keypoints)]
    assert (mirrored == list(keypoints.oks_sigmas)) == (keypoints.name not in PER_POINT_SIGMAS)


def test_category_is_a_coco_person_category_with_a_one_based_skeleton():
    category = json.loads(json.dumps(COCO_17.category()))  # plain JSON values
    assert category == {"id": 1, "name": "person", "supercategory": "person", "keypoints": list(COCO_17.names),
                         "skeleton": [list(pair) for pair in COCO_17.skeleton]}
    flat = [i for pair in category["skeleton"] for i in pair]
    assert min(flat) == 1 and max(flat) == 17  # 1-based, as COCO files write it
    assert [16, 14] in category["skeleton"]  # left_ankle - left_knee
    assert (COCO_17.names[15], COCO_17.names[13]) == ("left_ankle", "left_knee")
    assert COCO_17.category(3)["id"] == 3


def test_keypoint_set_by_name():
    assert keypoint_set("coco-17") is COCO_17
    assert KEYPOINT_SETS == {"coco-17": COCO_17, "coco-wholebody-133": COCO_WHOLEBODY_133, "crowdpose-14": CROWDPOSE_14,
                             "aic-14": AIC_14, "mpii-16": MPII_16, "ap10k-17": AP10K_17}
    assert all(keypoint_set(name) is s for name, s in KEYPOINT_SETS.items())
    assert keypoint_set("ochuman-17") is COCO_17  # the same joints, names, skeleton and sigmas
    with pytest.raises(UserError, match=r"^unknown keypoint set 'halpe-26'; this kdcache knows coco-17, "
                                        r"coco-wholebody-133, crowdpose-14, aic-14, mpii-16, ap10k-17, ochuman-17"):
        keypoint_set("halpe-26")


def test_keypoint_set_by_count_names_where_the_count_came_from():
    assert keypoint_set_with(17, "model m.pt") is COCO_17  # not AP-10K: a bare 17 has always meant COCO
    assert keypoint_set_with(16, "model m.pt") is MPII_16
    assert keypoint_set_with(133, "model m.pt") is COCO_WHOLEBODY_133
    with pytest.raises(UserError, match=r"^model m\.pt has 21 keypoints per person; kdcache knows the keypoint "
                                        r"sets COCO \(17\), COCO-WholeBody \(133\), CrowdPose \(14\), AIC \(14\)"):
        keypoint_set_with(21, "model m.pt")


def test_a_count_two_sets_share_is_refused_naming_both():
    with pytest.raises(UserError, match=r"^model m\.pt has 14 keypoints per person, as CrowdPose and AIC have; .*"
                                        r"pass --keypoint-set crowdpose-14 or aic-14") as caught:
        keypoint_set_with(14, "model m.pt")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("sigmas, pairs", [((0.1, 0.1), ((1, 2),)), ((0.1, 0.1, 0.1), ((1, 3),))])
def test_a_set_whose_sigmas_or_pairs_do_not_fit_its_names_is_refused(sigmas, pairs):
    with pytest.raises(ValueError, match="three: sigmas or flip pairs do not fit its 3 names"):
        KeypointSet(name="three", title="Three", names=("a", "left_b", "right_b"), flip_pairs=pairs,
                    skeleton=((1, 2),), oks_sigmas=sigmas, upper_body=(0,))


@pytest.mark.parametrize("change, message", [
    ({"flip_pairs": ((1, 2), (2, 3))}, "flip pairs must be disjoint"),
    ({"flip_pairs": ((1, 1),)}, "flip pairs must be disjoint"),
    ({"skeleton": ((0, 1),)}, r"skeleton limb \(0, 1\) is outside 1\.\.4 \(limbs are 1-based\)"),
    ({"skeleton": ((4, 5),)}, r"skeleton limb \(4, 5\) is outside 1\.\.4"),
    ({"names": ("a", "b", "b", "c")}, "a keypoint name appears twice"),
    ({"oks_sigmas": (0.1, 0.0, 0.1, 0.1)}, "OKS sigmas must be positive"),
    ({"upper_body": (0, 4)}, "upper and lower body must be distinct keypoints of 0..3"),
    ({"lower_body": (0, 1)}, "upper and lower body must be distinct keypoints of 0..3"),
    ({"parts": (("a", 0, 2), ("b", 1, 4))}, "parts must be disjoint"),
    ({"parts": (("a", 0, 5),)}, "parts must be disjoint"),
])
def test_a_set_with_overlapping_pairs_or_limbs_out_of_range_is_refused(change, message):
    facts = dict(name="four", title="Four", names=("a", "left_b", "right_b", "c"), flip_pairs=((1, 2),),
                 skeleton=((1, 2), (1, 3), (1, 4)), oks_sigmas=(0.1,) * 4, upper_body=(0, 1, 2))
    KeypointSet(**facts)  # as given, the set is fine
    with pytest.raises(ValueError, match=f"^keypoint set four: {message}"):
        KeypointSet(**{**facts, **change})


def test_lower_body_defaults_to_every_keypoint_not_upper():
    assert COCO_17.lower_body == tuple(range(11, 17))
    assert set(COCO_WHOLEBODY_133.lower_body) == set(range(11, 23))  # the face and hands are in neither half


@pytest.mark.parametrize("name, twin", [
    ("left_wrist", "right_wrist"), ("right_wrist", "left_wrist"), ("L_Eye", "R_Eye"), ("R_F_Paw", "L_F_Paw"),
    ("l ankle", "r ankle"), ("Right Shoulder", "Left Shoulder"), ("LEFT_KNEE", "RIGHT_KNEE"),
    ("lefthand_root", "righthand_root"), ("hand_left_thumb1", "hand_right_thumb1"), ("leftEye", "rightEye"),
    ("nose", "nose"), ("face-3", "face-3"), ("root_of_tail", "root_of_tail"), ("lr_joint", "lr_joint"),
])
def test_mirror_name_swaps_side_words_in_their_spelling(name, twin):
    assert mirror_name(name) == twin
    assert mirror_name(twin) == name


def test_flip_pairs_from_names_pair_each_left_with_its_right_twin():
    names = ("nose", "R_Eye", "L_Eye", "l knee", "r knee", "left_hand_root", "right_hand_root", "left_only", "bright")
    assert flip_pairs_from_names(names) == ((2, 1), (3, 4), (5, 6))  # (left, right), in order of the left one
    assert flip_pairs_from_names(COCO_17.names) == COCO_17.flip_pairs


def test_body_halves_from_names_or_none_when_a_name_says_neither():
    assert body_halves_from_names(COCO_17.names) == (tuple(range(11)), tuple(range(11, 17)))
    assert body_halves_from_names(["head_top", "root_of_tail", "left_thumb1"]) == ((0, 2), (1,))
    assert body_halves_from_names(["nose", "left_front_paw"]) is None
