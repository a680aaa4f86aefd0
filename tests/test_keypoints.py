"""Keypoint sets: COCO-17's published flip pairs, names, skeleton and sigmas, and finding a set by name or count."""

import json

import pytest

from kdcache.errors import UserError
from kdcache.keypoints import COCO_17, KEYPOINT_SETS, KeypointSet, keypoint_set, keypoint_set_with

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


@pytest.mark.parametrize("keypoints", list(KEYPOINT_SETS.values()), ids=list(KEYPOINT_SETS))
def test_mirror_closed_facts(keypoints):
    """A mirror maps the skeleton, the upper body and the OKS sigmas onto themselves (half-body crops and
    flipped targets rely on it)."""
    flip = keypoints.flip_index
    limbs = {frozenset(pair) for pair in keypoints.skeleton}
    assert {frozenset(flip[i - 1] + 1 for i in pair) for pair in keypoints.skeleton} == limbs
    assert {flip[k] for k in keypoints.upper_body} == set(keypoints.upper_body)
    assert [keypoints.oks_sigmas[flip[k]] for k in range(keypoints.num_keypoints)] == list(keypoints.oks_sigmas)


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
    assert KEYPOINT_SETS == {"coco-17": COCO_17}
    with pytest.raises(UserError, match=r"unknown keypoint set 'mpii-16'; this kdcache knows coco-17"):
        keypoint_set("mpii-16")


def test_keypoint_set_by_count_names_where_the_count_came_from():
    assert keypoint_set_with(17, "model m.pt") is COCO_17
    with pytest.raises(UserError, match=r"^model m\.pt has 14 keypoints per person; kdcache knows the keypoint "
                                        r"sets COCO \(17\)"):
        keypoint_set_with(14, "model m.pt")


@pytest.mark.parametrize("sigmas, pairs", [((0.1, 0.1), ((1, 2),)), ((0.1, 0.1, 0.1), ((1, 3),))])
def test_a_set_whose_sigmas_or_pairs_do_not_fit_its_names_is_refused(sigmas, pairs):
    with pytest.raises(ValueError, match="three: sigmas or flip pairs do not fit its 3 names"):
        KeypointSet(name="three", title="Three", names=("a", "left_b", "right_b"), flip_pairs=pairs,
                    skeleton=((1, 2),), oks_sigmas=sigmas, upper_body=(0,))
