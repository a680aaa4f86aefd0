"""Keypoint sets: what the joints are called, which mirror into which, how they are drawn and scored.

A `KeypointSet` is the one place a set's facts live; every stage that needs one (annotations, crops and
augmentation, cache, training, evaluation, pictures, export) is handed the set rather than assuming COCO.
COCO-17 is the only built-in set today; a new one is one more `KeypointSet` in `KEYPOINT_SETS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kdcache.errors import UserError


@dataclass(frozen=True)
class KeypointSet:
    """One keypoint definition (e.g. COCO's 17 person keypoints).

    Attributes:
        name: identifier recorded in caches ("coco-17").
        title: how messages name it ("COCO").
        names: keypoint names in channel order; "left_"/"right_" prefixes mark sides.
        flip_pairs: 0-based (left, right) channel pairs that a horizontal mirror swaps.
        skeleton: limbs as 1-based keypoint pairs, as COCO annotation files write them.
        oks_sigmas: per-keypoint OKS sigmas (COCOeval's, and OKS-NMS's).
        upper_body: 0-based keypoints of the upper body, for the half-body crop; the rest are lower body.
    """

    name: str
    title: str
    names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    skeleton: tuple[tuple[int, int], ...]
    oks_sigmas: tuple[float, ...]
    upper_body: tuple[int, ...]
    flip_index: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        k = len(self.names)
        if len(self.oks_sigmas) != k or any(not 0 <= i < k for pair in self.flip_pairs for i in pair):
            raise ValueError(f"keypoint set {self.name}: sigmas or flip pairs do not fit its {k} names")
        index = list(range(k))
        for left, right in self.flip_pairs:
            index[left], index[right] = right, left
        # flip_index[k] is the keypoint that k becomes under a mirror: `mirrored = x[..., flip_index, :]`.
        object.__setattr__(self, "flip_index", tuple(index))

    @property
    def num_keypoints(self) -> int:
        return len(self.names)

    def category(self, category_id: int = 1) -> dict:
        """The person category of a COCO annotation file with this set's names and skeleton."""
        return {"id": category_id, "name": "person", "supercategory": "person", "keypoints": list(self.names),
                "skeleton": [list(pair) for pair in self.skeleton]}


COCO_17 = KeypointSet(
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

# The built-in sets by name (the name a cache records).
KEYPOINT_SETS = {s.name: s for s in (COCO_17,)}


def keypoint_set(name: str) -> KeypointSet:
    """A built-in set by the name a cache records."""
    if name not in KEYPOINT_SETS:
        raise UserError(f"unknown keypoint set {name!r}; this kdcache knows {', '.join(KEYPOINT_SETS)}")
    return KEYPOINT_SETS[name]


def keypoint_set_with(count: int, where: str) -> KeypointSet:
    """The built-in set of `count` keypoints (for a file or model that states only its count).

    Raises:
        UserError: no built-in set has `count` keypoints; `where` names the file or model in the message.
    """
    for s in KEYPOINT_SETS.values():
        if s.num_keypoints == count:
            return s
    known = ", ".join(f"{s.title} ({s.num_keypoints})" for s in KEYPOINT_SETS.values())
    raise UserError(f"{where} has {count} keypoints per person; kdcache knows the keypoint sets {known}: "
                    "pass a file of one of them")
