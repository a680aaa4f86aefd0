"""Keypoint sets: what the joints are called, which mirror into which, how they are drawn and scored.

A `KeypointSet` is the one place a set's facts live; every stage that needs one (annotations, crops and
augmentation, cache, training, evaluation, pictures, export) is handed the set rather than assuming COCO.
The built-in sets' facts are data in `kdcache.keypoint_sets`; a set kdcache does not know is a small JSON
description file (`keypoint_set_from_file`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcache import keypoint_sets
from kdcache.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeypointSet:
    """One keypoint definition (e.g. COCO's 17 person keypoints).

    Attributes:
        name: identifier recorded in caches ("coco-17").
        title: how messages name it ("COCO").
        names: keypoint names in channel order; "left_"/"right_" (or "l_"/"r_") mark sides.
        flip_pairs: 0-based channel pairs that a horizontal mirror swaps (left first where the names tell).
        skeleton: limbs as 1-based keypoint pairs, as COCO annotation files write them.
        oks_sigmas: per-keypoint OKS sigmas (COCOeval's, and OKS-NMS's).
        upper_body: 0-based keypoints of the upper body, for the half-body crop.
        lower_body: 0-based keypoints of the lower body; None: all that are not upper body. (COCO-WholeBody's
            face and hands are in neither half.)
        parts: (part, start, stop) channel ranges of a set scored part by part (COCO-WholeBody's body, foot,
            face, left_hand, right_hand); empty for a set scored as one.
    """

    name: str
    title: str
    names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    skeleton: tuple[tuple[int, int], ...]
    oks_sigmas: tuple[float, ...]
    upper_body: tuple[int, ...]
    lower_body: tuple[int, ...] | None = None
    parts: tuple[tuple[str, int, int], ...] = ()
    flip_index: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        k = len(self.names)
        where = f"keypoint set {self.name}"
        if len(self.oks_sigmas) != k or any(not 0 <= i < k for pair in self.flip_pairs for i in pair):
            raise ValueError(f"{where}: sigmas or flip pairs do not fit its {k} names")
        if len(set(self.names)) != k:
            raise ValueError(f"{where}: a keypoint name appears twice")
        if any(not s > 0 for s in self.oks_sigmas):
            raise ValueError(f"{where}: OKS sigmas must be positive")
        paired = [i for pair in self.flip_pairs for i in pair]
        if len(set(paired)) != len(paired):
            raise ValueError(f"{where}: flip pairs must be disjoint (a keypoint is in two pairs or paired with itself)")
        outside = [pair for pair in self.skeleton if not all(1 <= i <= k for i in pair)]
        if outside:
            raise ValueError(f"{where}: skeleton limb {outside[0]} is outside 1..{k} (limbs are 1-based)")
        lower = (tuple(i for i in range(k) if i not in set(self.upper_body)) if self.lower_body is None
                 else self.lower_body)
        halves = [*self.upper_body, *lower]
        if len(set(halves)) != len(halves) or any(not 0 <= i < k for i in halves):
            raise ValueError(f"{where}: upper and lower body must be distinct keypoints of 0..{k - 1}")
        spans = sorted((start, stop) for _, start, stop in self.parts)
        if any(not 0 <= a < b <= k for a, b in spans) or any(b > c for (_, b), (c, _) in zip(spans, spans[1:])):
            raise ValueError(f"{where}: parts must be disjoint, non-empty channel ranges within 0..{k}")
        object.__setattr__(self, "lower_body", lower)
        index = list(range(k))
        for left, right in self.flip_pairs:
            index[left], index[right] = right, left
        # flip_index[k] is the keypoint that k becomes under a mirror: `mirrored = x[..., flip_index, :]`.
        object.__setattr__(self, "flip_index", tuple(index))

    @property
    def num_keypoints(self) -> int:
        return len(self.names)

    def part(self, name: str) -> range:
        """The channels of one part (e.g. COCO-WholeBody's "face": range(23, 91))."""
        for part, start, stop in self.parts:
            if part == name:
                return range(start, stop)
        raise KeyError(f"{self.title} has no part {name!r}; its parts: {', '.join(p for p, _, _ in self.parts)}")

    def category(self, category_id: int = 1, name: str = "person") -> dict:
        """A category of a COCO annotation file with this set's names and skeleton (the person's; AP-10K's files
        have one per species, `name`)."""
        return {"id": category_id, "name": name, "supercategory": name, "keypoints": list(self.names),
                "skeleton": [list(pair) for pair in self.skeleton]}

    def description(self) -> dict[str, Any]:
        """This set as a description file holds it (JSON values; `keypoint_set_from_file` reads it back)."""
        n = self.names
        out: dict[str, Any] = {
            "name": self.name, "title": self.title, "keypoints": list(n),
            "flip_pairs": [[n[a], n[b]] for a, b in self.flip_pairs],
            "skeleton": [[n[a - 1], n[b - 1]] for a, b in self.skeleton],
            "sigmas": list(self.oks_sigmas),
            "upper_body": [n[i] for i in self.upper_body], "lower_body": [n[i] for i in self.lower_body or ()]}
        if self.parts:
            out["parts"] = {part: [start, stop] for part, start, stop in self.parts}
        return out


# ---- what names tell: sides and body halves ----

_SIDE_OF = {"left": "right", "right": "left", "l": "r", "r": "l"}
_SIDE_WORD = re.compile(r"left|right", re.IGNORECASE)


def _like(word: str, model: str) -> str:
    """`word` in `model`'s case ("L" -> "R", "Left" -> "Right", "left" -> "right")."""
    return word.upper() if model.isupper() else word.capitalize() if model[0].isupper() else word


def mirror_name(name: str) -> str:
    """The name of `name`'s mirror twin: every side word swapped, in its case.

    Side words are "left"/"right" anywhere in a word ("left_wrist", "LeftHand", "lefthand_kpts") and "l"/"r"
    standing alone ("l_ankle", "L_Eye", "r knee"). A name without side words is its own twin.
    """
    def swap(word: re.Match) -> str:
        w = word.group(0)
        if w.lower() in ("l", "r"):
            return _like(_SIDE_OF[w.lower()], w)
        return _SIDE_WORD.sub(lambda s: _like(_SIDE_OF[s.group(0).lower()], s.group(0)), w)
    return re.sub(r"[A-Za-z]+", swap, name)


def _is_left(name: str) -> bool:
    first = re.search(r"(?<![A-Za-z])[lr](?![A-Za-z])|left|right", name, re.IGNORECASE)
    return first is not None and first.group(0).lower() in ("l", "left")


def flip_pairs_from_names(names: tuple[str, ...] | list[str]) -> tuple[tuple[int, int], ...]:
    """0-based (left, right) pairs of the names that are each other's `mirror_name`, in order of the left one.

    Names that do not say their side (COCO-WholeBody's "face-0".."face-67") get no pair: give those explicitly.
    """
    index = {n: i for i, n in enumerate(names)}
    return tuple((i, index[mirror_name(n)]) for i, n in enumerate(names)
                 if _is_left(n) and index.get(mirror_name(n), i) != i)


_UPPER_WORDS = frozenset("nose eye eyes ear ears head neck shoulder elbow wrist thorax chest face mouth lip chin "
                         "jaw brow eyebrow forehead cheek hand thumb finger forefinger pinky".split())
_LOWER_WORDS = frozenset("hip hips pelvis knee ankle foot feet toe heel tail thigh leg".split())


def body_halves_from_names(names: tuple[str, ...] | list[str]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(upper, lower) body keypoints by the words in their names ("head_top": upper, "root_of_tail": lower), or
    None when some name says neither or both (e.g. AP-10K's "left_front_paw")."""
    upper, lower = [], []
    for i, n in enumerate(names):
        words = set(re.findall(r"[a-z]+", n.lower()))
        up, low = bool(words & _UPPER_WORDS), bool(words & _LOWER_WORDS)
        if up == low:
            return None
        (upper if up else lower).append(i)
    return tuple(upper), tuple(lower)


# ---- the built-in sets ----

# The built-in sets by name (the name a cache records).
KEYPOINT_SETS: dict[str, KeypointSet] = {facts["name"]: KeypointSet(**facts) for facts in keypoint_sets.BUILT_IN}
COCO_17 = KEYPOINT_SETS["coco-17"]
COCO_WHOLEBODY_133 = KEYPOINT_SETS["coco-wholebody-133"]
CROWDPOSE_14 = KEYPOINT_SETS["crowdpose-14"]
AIC_14 = KEYPOINT_SETS["aic-14"]
MPII_16 = KEYPOINT_SETS["mpii-16"]
AP10K_17 = KEYPOINT_SETS["ap10k-17"]

# The set a bare keypoint count means where several built-in sets share it. 17 meant COCO to every caller (dump,
# export, annotation files without names) before AP-10K was built in, and still does.
_COUNT_MEANS = {17: COCO_17}


def keypoint_set(name: str) -> KeypointSet:
    """A built-in set by the name a cache records, or by another name for it ("ochuman-17" is COCO-17)."""
    name = keypoint_sets.ALIASES.get(name, name)
    if name not in KEYPOINT_SETS:
        known = ", ".join([*KEYPOINT_SETS, *keypoint_sets.ALIASES])
        raise UserError(f"unknown keypoint set {name!r}; this kdcache knows {known}")
    return KEYPOINT_SETS[name]


def is_built_in(name: str) -> bool:
    """`name` is a built-in set's, or an alias of one (a set described in a file has a name of its own)."""
    return name in KEYPOINT_SETS or name in keypoint_sets.ALIASES


def keypoint_set_named(value: str) -> KeypointSet:
    """What `--keypoint-set` names: a built-in set (or an alias), or a JSON description file
    (`keypoint_set_from_file`) when `value` is an existing file or ends in .json.

    Raises:
        UserError: neither; the message lists the built-in names.
    """
    if is_built_in(value):
        return keypoint_set(value)
    if Path(value).is_file() or value.endswith(".json"):
        return keypoint_set_from_file(value)
    known = ", ".join([*KEYPOINT_SETS, *keypoint_sets.ALIASES])
    raise UserError(f"--keypoint-set {value!r} is neither a built-in keypoint set ({known}) nor a JSON file "
                    "describing one; pass one of those")


def keypoint_set_with(count: int, where: str) -> KeypointSet:
    """The built-in set of `count` keypoints (for a file or model that states only its count).

    17 means COCO-17 although AP-10K has 17 too; a count that two sets share otherwise (14: CrowdPose, AIC) is
    refused, naming the candidates.

    Raises:
        UserError: no built-in set, or more than one, has `count` keypoints; `where` names the file or model.
    """
    fits = [s for s in KEYPOINT_SETS.values() if s.num_keypoints == count]
    if len(fits) == 1 or count in _COUNT_MEANS:
        return _COUNT_MEANS.get(count) or fits[0]
    if fits:
        names = " or ".join(s.name for s in fits)
        raise UserError(f"{where} has {count} keypoints per person, as {' and '.join(s.title for s in fits)} have; "
                        f"kdcache cannot tell which from the count: pass --keypoint-set {names}, or give an "
                        "annotation file whose category lists the keypoint names")
    known = ", ".join(f"{s.title} ({s.num_keypoints})" for s in KEYPOINT_SETS.values())
    raise UserError(f"{where} has {count} keypoints per person; kdcache knows the keypoint sets {known}: pass "
                    "a file of one of them, or --keypoint-set FILE.json describing yours (names, flip pairs, sigmas)")


# ---- recognising a set from an annotation file's category ----

_WORD_SPELLINGS = {"l": "left", "r": "right", "f": "front", "b": "back"}
# Whole-name spellings of one joint: CrowdPose files write "head", mmpose "top_head", AIC/MPII "head_top".
_NAME_SPELLINGS = {"head": "head_top", "top_head": "head_top"}


def _spelling(name: str) -> str:
    """A name reduced to how it is spelt across files: "Right Shoulder", "r shoulder", "R_Shoulder" ->
    "right_shoulder"; "L_F_Paw" -> "left_front_paw"."""
    words = "_".join(_WORD_SPELLINGS.get(w, w) for w in re.findall(r"[a-z]+|[0-9]+", name.lower()))
    return _NAME_SPELLINGS.get(words, words)


_BY_SPELLING = {tuple(_spelling(n) for n in s.names): s for s in KEYPOINT_SETS.values()}


def keypoint_set_of_category(category: dict) -> KeypointSet | None:
    """The built-in set whose keypoint names a COCO-style category lists, however the file spells them.

    None when the category lists no names or names no built-in set's (the caller may then go by the count,
    `keypoint_set_with`). A COCO-WholeBody file's category lists only the 17 body names (its feet, face and
    hands are separate arrays of each annotation), so it is recognised as COCO-17 here; OCHuman's is COCO-17.
    """
    names = category.get("keypoints")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return None
    return _BY_SPELLING.get(tuple(_spelling(n) for n in names))


# ---- a set described in a JSON file ----

# OKS sigma for a keypoint whose file gives none: the mean of COCO-17's (0.067), i.e. an average body joint.
DEFAULT_OKS_SIGMA = round(sum(COCO_17.oks_sigmas) / COCO_17.num_keypoints, 3)
_SHAPE = '{"name": ..., "keypoints": [...]}'
_KEYS = ("name", "title", "keypoints", "flip_pairs", "skeleton", "sigmas", "upper_body", "lower_body", "parts")


def keypoint_set_from_file(path: Path | str) -> KeypointSet:
    """A keypoint set described in a JSON file.

    The file: {"name": "dogs-20", "keypoints": ["nose", "left_eye", ...]} and optionally "title", "flip_pairs"
    ([["left_eye", "right_eye"], ...]; default: `flip_pairs_from_names`), "skeleton" (limbs as name pairs or
    1-based index pairs; default none), "sigmas" (one per keypoint; default `DEFAULT_OKS_SIGMA` each),
    "upper_body" and "lower_body" (names; default: `body_halves_from_names`, else the first half of the
    keypoints is upper body), "parts" ({"face": [start, stop], ...}, 0-based channel ranges).

    Raises:
        UserError: the file is missing or not such a description; the message says what to write.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"keypoint set file {path} does not exist; pass a JSON file describing the set") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable JSON file ({e}); write {_SHAPE}") from None
    return keypoint_set_from_description(doc, str(path))


def keypoint_set_from_description(doc: Any, where: str) -> KeypointSet:
    """A keypoint set from a description's JSON value (`KeypointSet.description` writes one); see
    `keypoint_set_from_file`. `where` names its source in messages."""
    def fail(what: str) -> UserError:
        return UserError(f"{where}: {what}")

    if not isinstance(doc, dict):
        raise fail(f"holds a JSON {type(doc).__name__}; a keypoint set is an object {_SHAPE}")
    unknown = [k for k in doc if k not in _KEYS]
    if unknown:
        raise fail(f"unknown key {unknown[0]!r}; a keypoint set description has the keys {', '.join(_KEYS)}")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise fail("\"name\" must be a non-empty string that caches will record, e.g. \"dogs-20\"")
    if is_built_in(name):
        raise fail(f"\"name\" {name!r} is a built-in keypoint set's; give yours its own name")
    title = doc.get("title", name)
    if not isinstance(title, str) or not title:
        raise fail("\"title\" must be a non-empty string (how messages name the set), or left out")
    names = doc.get("keypoints")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise fail("\"keypoints\" must be a non-empty list of keypoint names, in channel order")
    twice = [n for i, n in enumerate(names) if n in names[:i]]
    if twice:
        raise fail(f"keypoint {twice[0]!r} is listed twice in \"keypoints\"; each name must be unique")
    k = len(names)
    index = {n: i for i, n in enumerate(names)}

    def keypoint(key: str, value: Any, one_based: bool = False) -> int:
        if isinstance(value, str) and value in index:
            return index[value] + one_based
        if one_based and isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= k:
            return value
        raise fail(f"\"{key}\" names {value!r}, which is not one of \"keypoints\""
                   + (f" nor a 1-based index 1..{k}" if one_based else ""))

    def pairs(key: str, one_based: bool = False) -> tuple[tuple[int, int], ...]:
        value = doc[key]
        if not isinstance(value, list) or not all(isinstance(p, list) and len(p) == 2 for p in value):
            example = "[[\"left_hip\", \"left_knee\"], [1, 2]] (names or 1-based indices)" if one_based else \
                "[[\"left_eye\", \"right_eye\"]]"
            raise fail(f"\"{key}\" must be a list of keypoint pairs, e.g. {example}")
        return tuple((keypoint(key, a, one_based), keypoint(key, b, one_based)) for a, b in value)

    def keypoints(key: str) -> tuple[int, ...]:
        value = doc[key]
        if not isinstance(value, list):
            raise fail(f"\"{key}\" must be a list of keypoint names, e.g. [\"nose\", \"left_shoulder\"]")
        return tuple(keypoint(key, n) for n in value)

    flip_pairs = pairs("flip_pairs") if "flip_pairs" in doc else flip_pairs_from_names(names)
    paired = [i for pair in flip_pairs for i in pair]
    if len(set(paired)) != len(paired):
        again = next(names[i] for i in paired if paired.count(i) > 1)
        raise fail(f"\"flip_pairs\" uses {again!r} twice; each keypoint mirrors into at most one other")
    sigmas = doc.get("sigmas", [DEFAULT_OKS_SIGMA] * k)
    if (not isinstance(sigmas, list) or len(sigmas) != k
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in sigmas)):
        raise fail(f"\"sigmas\" must be {k} positive numbers, one per keypoint (or left out: {DEFAULT_OKS_SIGMA} each)")
    if "sigmas" not in doc:
        log.info("%s gives no OKS sigmas: each keypoint gets %s, the mean of COCO's", where, DEFAULT_OKS_SIGMA)
    halves = body_halves_from_names(names) if "upper_body" not in doc else None
    upper = keypoints("upper_body") if "upper_body" in doc else halves[0] if halves else tuple(range((k + 1) // 2))
    if "upper_body" not in doc and not halves:
        log.info("%s: the keypoint names do not tell the body halves; the first %d are upper body", where, (k + 1) // 2)
    lower = keypoints("lower_body") if "lower_body" in doc else halves[1] if halves else None  # None: the rest
    if len(set(upper + (lower or ()))) != len(upper) + len(lower or ()):
        raise fail("\"upper_body\" and \"lower_body\" share a keypoint or repeat one; list each keypoint once")
    parts = doc.get("parts", {})
    if not isinstance(parts, dict) or not all(isinstance(v, list) and len(v) == 2 and all(
            isinstance(i, int) and not isinstance(i, bool) for i in v) for v in parts.values()):
        raise fail("\"parts\" must map part names to 0-based [start, stop] channel ranges, e.g. {\"face\": [23, 91]}")
    try:
        return KeypointSet(name=name, title=title, names=tuple(names), flip_pairs=flip_pairs,
                           skeleton=pairs("skeleton", one_based=True) if "skeleton" in doc else (),
                           oks_sigmas=tuple(float(s) for s in sigmas), upper_body=upper, lower_body=lower,
                           parts=tuple((p, a, b) for p, (a, b) in parts.items()))
    except ValueError as e:  # what the checks above leave to KeypointSet: overlapping parts
        raise fail(f"{str(e).split(': ', 1)[-1]}; fix the description") from None
