"""The published facts of the built-in keypoint sets, as plain data (`kdcache.keypoints` makes them `KeypointSet`s).

Each entry of `BUILT_IN` holds the keyword arguments of one `KeypointSet`. Conventions: `flip_pairs` are 0-based
channel pairs (left first where the names say which is left); `skeleton` limbs are 1-based, as COCO annotation files
write them; `upper_body` and `lower_body` are the 0-based channels mmpose types "upper" and "lower" (a channel in
neither, e.g. a whole-body face point, belongs to neither half of a half-body crop).

Sources: mmpose 1.x `configs/_base_/datasets/{coco,coco_wholebody,crowdpose,aic,mpii,ap10k,ochuman}.py` (mmpose
1.3.2) for names, types, swaps, skeletons and sigmas, checked against each dataset's own files where one exists:
pycocotools/xtcocotools `cocoeval.py` (COCO), COCO-WholeBody's `evaluation/myeval_*.py` and xtcocotools'
`demos/demo_coco_wholebody.py` (whole-body sigmas), CrowdPose's `crowdposetools/cocoeval.py` and
`annotations/crowdpose_val.json` (CrowdPose), AI Challenger 2017's `keypoint_eval.py` (AIC), AP-10K's README
(its keypoints); the names annotation files declare are from mmpose's `tests/data` excerpts of them (AIC, AP-10K,
COCO-WholeBody, OCHuman). Where we depart from mmpose, the entry says so.
"""

from __future__ import annotations

from typing import Any

_COCO_17: dict[str, Any] = dict(
    name="coco-17",
    title="COCO",
    names=("nose", "left_eye", "right_eye", "left_ear", "right_ear",
           "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
           "left_wrist", "right_wrist", "left_hip", "right_hip",
           "left_knee", "right_knee", "left_ankle", "right_ankle"),
    flip_pairs=((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)),
    skeleton=((16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8),
              (7, 9), (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7)),
    oks_sigmas=(0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
                0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089),
    upper_body=tuple(range(11)),
)

# COCO-WholeBody: body (COCO's 17), feet, face (the 68-point Multi-PIE/300-W layout), left hand, right hand, in
# that channel order; annotation files keep the body in "keypoints" and the rest in foot_kpts, face_kpts,
# lefthand_kpts, righthand_kpts.
_FEET = ("left_big_toe", "left_small_toe", "left_heel", "right_big_toe", "right_small_toe", "right_heel")
_FINGERS = ("thumb", "forefinger", "middle_finger", "ring_finger", "pinky_finger")


def _hand(side: str) -> tuple[str, ...]:
    return (f"{side}_hand_root",) + tuple(f"{side}_{finger}{joint}" for finger in _FINGERS for joint in range(1, 5))


def _hand_limbs(root: int) -> tuple[tuple[int, int], ...]:
    """A hand's 20 limbs, 1-based from its root: root to each finger's first joint, then along the finger."""
    limbs = []
    for finger in range(5):
        joints = [root] + [root + 1 + 4 * finger + j for j in range(4)]
        limbs += list(zip(joints[:-1], joints[1:]))
    return tuple(limbs)


# 0-based pairs within the 68 face points that a mirror swaps: contour, brows, nose base, eyes, outer lips, inner lips.
_FACE_PAIRS = ((0, 16), (1, 15), (2, 14), (3, 13), (4, 12), (5, 11), (6, 10), (7, 9),
               (17, 26), (18, 25), (19, 24), (20, 23), (21, 22),
               (31, 35), (32, 34),
               (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),
               (48, 54), (49, 53), (50, 52), (55, 59), (56, 58),
               (60, 64), (61, 63), (65, 67))

_COCO_WHOLEBODY_133: dict[str, Any] = dict(
    name="coco-wholebody-133",
    title="COCO-WholeBody",
    names=_COCO_17["names"] + _FEET + tuple(f"face-{i}" for i in range(68)) + _hand("left") + _hand("right"),
    flip_pairs=(_COCO_17["flip_pairs"] + ((17, 20), (18, 21), (19, 22))
                + tuple((23 + a, 23 + b) for a, b in _FACE_PAIRS)
                + tuple((91 + i, 112 + i) for i in range(21))),
    skeleton=(_COCO_17["skeleton"] + ((16, 18), (16, 19), (16, 20), (17, 21), (17, 22), (17, 23))
              + _hand_limbs(92) + _hand_limbs(113)),  # mmpose draws no face limbs and no wrist-to-hand limb
    oks_sigmas=(_COCO_17["oks_sigmas"]
                # feet: left big toe, small toe, heel, then right
                + (0.068, 0.066, 0.066, 0.092, 0.094, 0.094)
                # face, points 0-67 (measured per point, so not mirror-symmetric)
                + (0.042, 0.043, 0.044, 0.043, 0.040, 0.035, 0.031, 0.025, 0.020, 0.023, 0.029, 0.032, 0.037,
                   0.038, 0.043, 0.041, 0.045, 0.013, 0.012, 0.011, 0.011, 0.012, 0.012, 0.011, 0.011, 0.013,
                   0.015, 0.009, 0.007, 0.007, 0.007, 0.012, 0.009, 0.008, 0.016, 0.010, 0.017, 0.011, 0.009,
                   0.011, 0.009, 0.007, 0.013, 0.008, 0.011, 0.012, 0.010, 0.034, 0.008, 0.008, 0.009, 0.008,
                   0.008, 0.007, 0.010, 0.008, 0.009, 0.009, 0.009, 0.007, 0.007, 0.008, 0.011, 0.008, 0.008,
                   0.008, 0.010, 0.008)
                # each hand, root then thumb, forefinger, middle, ring, pinky (4 joints each)
                + (0.029, 0.022, 0.035, 0.037, 0.047, 0.026, 0.025, 0.024, 0.035, 0.018, 0.024, 0.022, 0.026,
                   0.017, 0.021, 0.021, 0.032, 0.020, 0.019, 0.022, 0.031) * 2),
    upper_body=tuple(range(11)),       # nose to wrists, as for COCO
    lower_body=tuple(range(11, 23)),   # hips to heels; face and hands are in neither half (mmpose types them "")
    parts=(("body", 0, 17), ("foot", 17, 23), ("face", 23, 91), ("left_hand", 91, 112), ("right_hand", 112, 133)),
)

# CrowdPose: the names its own annotation files declare ("head" is mmpose's "top_head"). Its files also carry
# COCO's body skeleton, whose indices run past 14; the skeleton here is mmpose's.
_CROWDPOSE_14: dict[str, Any] = dict(
    name="crowdpose-14",
    title="CrowdPose",
    names=("left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
           "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "head", "neck"),
    flip_pairs=((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)),
    skeleton=((11, 9), (9, 7), (12, 10), (10, 8), (7, 8), (1, 7), (2, 8), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6),
              (13, 14), (2, 14), (1, 14)),
    oks_sigmas=(0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089, 0.079, 0.079),
    upper_body=(0, 1, 2, 3, 4, 5, 12, 13),
)

# AI Challenger: right side first. mmpose's converted files spell the names "Right Shoulder", ..., "Head top".
# Sigmas: AI Challenger's keypoint_eval.py writes delta = 2 * these (measured per point, not mirror-symmetric).
_AIC_14: dict[str, Any] = dict(
    name="aic-14",
    title="AIC",
    names=("right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist",
           "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle", "head_top", "neck"),
    flip_pairs=((3, 0), (4, 1), (5, 2), (9, 6), (10, 7), (11, 8)),
    skeleton=((3, 2), (2, 1), (1, 14), (14, 4), (4, 5), (5, 6), (9, 8), (8, 7), (7, 10), (10, 11), (11, 12),
              (13, 14), (1, 7), (4, 10)),
    oks_sigmas=(0.01388152, 0.01515228, 0.01057665, 0.01417709, 0.01497891, 0.01402144, 0.03909642, 0.03686941,
                0.01981803, 0.03843971, 0.03412318, 0.02415081, 0.01291456, 0.01236173),
    upper_body=(0, 1, 2, 3, 4, 5, 12, 13),
)

# MPII: its community scores PCKh and publishes no OKS sigmas. These are mmpose's mpii.py values ("adapted from
# COCO"), kept as mmpose has them, shoulders' 0.179 and knees' 0.083 included (COCO has 0.079 and 0.087).
_MPII_16: dict[str, Any] = dict(
    name="mpii-16",
    title="MPII",
    names=("right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle", "pelvis", "thorax",
           "upper_neck", "head_top", "right_wrist", "right_elbow", "right_shoulder", "left_shoulder",
           "left_elbow", "left_wrist"),
    flip_pairs=((3, 2), (4, 1), (5, 0), (13, 12), (14, 11), (15, 10)),
    skeleton=((1, 2), (2, 3), (3, 7), (7, 4), (4, 5), (5, 6), (7, 8), (8, 9), (9, 10), (9, 13), (13, 12),
              (12, 11), (9, 14), (14, 15), (15, 16)),
    oks_sigmas=(0.089, 0.083, 0.107, 0.107, 0.083, 0.089, 0.026, 0.026, 0.026, 0.026,
                0.062, 0.072, 0.179, 0.179, 0.072, 0.062),
    upper_body=tuple(range(7, 16)),  # thorax up; the pelvis is lower body
)

# AP-10K (animals): the names its annotation files declare (mmpose spells them "L_Eye", "L_F_Paw", "Root of tail").
# Sigmas: mmpose 1.x's, which since mmpose 0.22 follow the channel order (shoulder/elbow/front paw take COCO's
# shoulder/elbow/wrist, hip/knee/back paw its hip/knee/ankle); AP-10K's own repository still has the earlier
# list copied in COCO's order. Upper body: mmpose types the right front paw "lower" but the left one "upper";
# both are upper here, so that a mirror keeps the halves.
_AP10K_17: dict[str, Any] = dict(
    name="ap10k-17",
    title="AP-10K",
    names=("left_eye", "right_eye", "nose", "neck", "root_of_tail", "left_shoulder", "left_elbow", "left_front_paw",
           "right_shoulder", "right_elbow", "right_front_paw", "left_hip", "left_knee", "left_back_paw",
           "right_hip", "right_knee", "right_back_paw"),
    flip_pairs=((0, 1), (5, 8), (6, 9), (7, 10), (11, 14), (12, 15), (13, 16)),
    skeleton=((1, 2), (1, 3), (2, 3), (3, 4), (4, 5), (4, 6), (6, 7), (7, 8), (4, 9), (9, 10), (10, 11),
              (5, 12), (12, 13), (13, 14), (5, 15), (15, 16), (16, 17)),
    oks_sigmas=(0.025, 0.025, 0.026, 0.035, 0.035, 0.079, 0.072, 0.062, 0.079, 0.072,
                0.062, 0.107, 0.087, 0.089, 0.107, 0.087, 0.089),
    upper_body=(0, 1, 2, 3, 5, 6, 7, 8, 9, 10),
)

BUILT_IN: tuple[dict[str, Any], ...] = (_COCO_17, _COCO_WHOLEBODY_133, _CROWDPOSE_14, _AIC_14, _MPII_16, _AP10K_17)

# Other names for a built-in set with the same facts. OCHuman annotates COCO's 17 joints with COCO's names,
# skeleton and sigmas (mmpose's ochuman.py is coco.py's content), so a model of either is the other's.
ALIASES: dict[str, str] = {"ochuman-17": "coco-17"}
