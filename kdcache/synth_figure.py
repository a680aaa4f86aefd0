"""The articulated person figure behind `kdcache synth`: pose sampling, kinematics, body parts.

A figure is a kinematic tree measured in units of its stature (standing height): pelvis → spine →
neck → head, shoulders → elbows → wrists → hand tips, hips → knees → ankles → toes, with bone
lengths from anthropometric tables (Drillis & Contini). Joint angles come from one of a few pose families
(standing, walking, arms raised, sitting, crouching, free) inside human limits: elbows and knees bend
one way, shoulders and hips stay within their ranges. The body is built in 3-D (x = the person's left,
y = up, z = forward), turned about the vertical axis (facing the camera, sideways or away), projected
orthographically and leaned in the image plane; this gives foreshortening, left/right swapping sides in
the image when the person faces away, and a depth per body part for the painter's algorithm. The five
face keypoints sit on an ellipsoidal head whose orientation decides whether each is visible, hidden by
the head itself (v=1, e.g. the far ear in profile) or unlabelled (v=0, the face of a person seen from
behind).

Left limbs wear a darker shade of the same clothes and a band of one fixed colour at the left wrist and
the left ankle, so that left and right can be told apart (as they must be for flip augmentation to be
learnable).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# Materials: the values of a figure's label map, turned into colours by synth.py.
SKIN, SKIN_L, SHIRT, SHIRT_L, TROUSERS, TROUSERS_L, SHOES, SHOES_L, HAIR, BAND, EYE, NOSE = range(1, 13)
NUM_MATERIALS = 13
LEFT_OF = {SKIN: SKIN_L, SHIRT: SHIRT_L, TROUSERS: TROUSERS_L, SHOES: SHOES_L}

# Point indices: the 17 COCO keypoints first, then helper points used only for drawing.
NECK, PELVIS, HEAD, HAND_L, HAND_R, TOE_L, TOE_R, FACE, HAIR_C = range(17, 26)
NUM_POINTS = 26

# Stature fractions (Drillis & Contini); widths are clothed thicknesses.
_SPINE, _NECK_TO_HEAD, _SHOULDER_HALF, _HIP_HALF = 0.30, 0.105, 0.13, 0.09
_UPPER_ARM, _FOREARM, _HAND, _THIGH, _SHANK = 0.186, 0.146, 0.09, 0.245, 0.246
_HEAD_AXES = np.array([0.05, 0.066, 0.058])  # ellipsoid half-axes x, y, z
_WIDTH = {"neck": 0.055, "upper_arm": 0.068, "forearm": 0.055, "hand": 0.045,
          "thigh": 0.1, "shank": 0.074, "foot": 0.045}

# Face points in the head frame (relative to the head centre) and the outward normal that decides
# their visibility: (offset, normal, z above which visible, z above which still labelled).
_FACE = (
    ((0.0, -0.012, 0.06), (0.0, -0.2, 1.0), 0.15, -0.6),      # nose
    ((0.02, 0.008, 0.048), (0.35, 0.1, 1.0), 0.15, -0.6),     # left eye
    ((-0.02, 0.008, 0.048), (-0.35, 0.1, 1.0), 0.15, -0.6),   # right eye
    ((0.05, -0.002, -0.005), (1.0, 0.0, -0.1), -0.2, -0.85),  # left ear
    ((-0.05, -0.002, -0.005), (-1.0, 0.0, -0.1), -0.2, -0.85),  # right ear
)


def _face68() -> tuple[np.ndarray, np.ndarray]:
    """The 68-point face (iBUG / COCO-WholeBody order, point 0 on the person's right) on the head ellipsoid's
    front, in the head frame: offsets [68, 3] and unit outward normals [68, 3]."""
    t = np.linspace(0, np.pi, 17)
    jaw = np.stack([-0.047 * np.cos(t), 0.006 - 0.058 * np.sin(t)], 1)            # 0-16, right ear to left ear
    brow = np.stack([np.linspace(-0.036, -0.008, 5), 0.022 + 0.004 * np.sin(np.linspace(0, np.pi, 5))], 1)
    brows = np.concatenate([brow, brow[::-1] * (-1, 1)])                            # 17-21 right, 22-26 left
    bridge = np.stack([np.zeros(4), np.linspace(0.014, -0.01, 4)], 1)               # 27-30
    nostrils = np.stack([np.linspace(-0.01, 0.01, 5), -0.017 + 0.002 * np.abs(np.linspace(-1, 1, 5))], 1)
    a = np.radians((180, 135, 45, 0, -45, -135))                                    # outer corner first
    eye = np.stack([0.01 * np.cos(a), 0.004 * np.sin(a)], 1)
    eyes = np.concatenate([eye + (-0.02, 0.008), eye[[3, 2, 1, 0, 5, 4]] * (1, 1) + (0.02, 0.008)])  # 36-47
    a = np.radians(np.linspace(180, -150, 12))
    outer = np.stack([0.018 * np.cos(a), 0.008 * np.sin(a)], 1) + (0, -0.034)       # 48-59
    a = np.radians((180, 120, 90, 60, 0, -60, -90, -120))
    inner = np.stack([0.012 * np.cos(a), 0.003 * np.sin(a)], 1) + (0, -0.034)       # 60-67
    xy = np.concatenate([jaw, brows, bridge, nostrils, eyes, outer, inner])
    ax, ay, az = _HEAD_AXES
    z = az * np.sqrt(np.clip(1 - (xy[:, 0] / ax) ** 2 - (xy[:, 1] / ay) ** 2, 0.05, None))
    offsets = np.concatenate([xy, z[:, None]], 1)
    normals = offsets / _HEAD_AXES ** 2
    return offsets, normals / np.linalg.norm(normals, axis=1, keepdims=True)


_FACE68, _FACE68_NORMALS = _face68()
# Each hand's 21 points in its forearm's frame (x the person's left, y along the arm, z forward, palm facing
# forward), in units of the hand's length: the wrist, then thumb, forefinger, middle, ring and pinky from the
# base joint to the tip; mirrored in x for the right hand.
_THUMB = [(0.15 + 0.08 * j, -0.1 - 0.15 * j, 0.03 * j) for j in range(4)]
_FINGERS = [(x * (1 + 0.1 * j), -(0.45 + 0.18 * j) * length, 0.0)
            for x, length in ((0.16, 0.95), (0.04, 1.0), (-0.08, 0.95), (-0.19, 0.8)) for j in range(4)]
_HAND21 = np.array([(0.0, 0.0, 0.0), *_THUMB, *_FINGERS])
NUM_WHOLEBODY_EXTRA = 6 + 68 + 21 + 21  # COCO-WholeBody's points after the 17 body ones

_FAMILIES = ("standing", "walking", "arms_raised", "sitting", "crouching", "free")
_FAMILY_P = (0.24, 0.24, 0.16, 0.1, 0.1, 0.16)


def _rx(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _ry(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rz(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def sample_pose(rng: np.random.Generator) -> dict[str, float]:
    """Joint angles in degrees: flexion forward > 0, abduction outward > 0, knees/elbows bend >= 0."""
    u = rng.uniform
    family = _FAMILIES[rng.choice(len(_FAMILIES), p=_FAMILY_P)]
    p: dict[str, float] = {"pitch": u(-5, 10), "side": u(-6, 6), "twist": u(-15, 15)}
    for s in "lr":  # relaxed standing, overwritten below by the family
        p.update({f"sflex_{s}": u(-15, 25), f"sabd_{s}": u(3, 25), f"srot_{s}": u(-30, 30),
                  f"elbow_{s}": u(0, 35), f"hflex_{s}": u(-5, 10), f"habd_{s}": u(0, 12),
                  f"knee_{s}": u(0, 10), f"ankle_{s}": u(-15, 15)})
    if family == "walking":
        phase, amp, swing = u(0, 2 * np.pi), u(15, 35), u(10, 35)
        for s, sign in (("l", 1.0), ("r", -1.0)):
            hflex = sign * amp * np.sin(phase)
            p[f"hflex_{s}"] = hflex
            p[f"knee_{s}"] = u(5, 20) + (u(10, 50) if hflex < 0 else 0.0)
            p[f"sflex_{s}"] = -sign * swing * np.sin(phase)
            p[f"elbow_{s}"] = u(10, 45)
            p[f"sabd_{s}"] = u(3, 15)
    elif family == "arms_raised":
        for s in "lr":
            if rng.random() < 0.75:
                if rng.random() < 0.5:
                    p[f"sflex_{s}"], p[f"sabd_{s}"] = u(100, 180), u(0, 40)
                else:
                    p[f"sflex_{s}"], p[f"sabd_{s}"] = u(-10, 40), u(70, 170)
                p[f"elbow_{s}"], p[f"srot_{s}"] = u(0, 100), u(-70, 70)
    elif family in ("sitting", "crouching"):
        sit = family == "sitting"
        p["pitch"] = u(-10, 20) if sit else u(20, 55)
        for s in "lr":
            p[f"hflex_{s}"] = u(70, 100) if sit else u(90, 130)
            p[f"knee_{s}"] = u(70, 110) if sit else u(110, 150)
            p[f"habd_{s}"] = u(0, 20) if sit else u(5, 30)
            p[f"sflex_{s}"], p[f"elbow_{s}"] = u(-10, 70), u(20, 110)
    elif family == "free":
        p.update({"pitch": u(-15, 50), "side": u(-20, 20), "twist": u(-35, 35)})
        for s in "lr":
            p.update({f"sflex_{s}": u(-40, 180), f"sabd_{s}": u(0, 160), f"srot_{s}": u(-80, 80),
                      f"elbow_{s}": u(0, 150), f"hflex_{s}": u(-25, 110), f"habd_{s}": u(-10, 50),
                      f"knee_{s}": u(0, 140)})
    r = rng.random()  # facing the camera, sideways, or away
    p["yaw"] = u(-45, 45) if r < 0.6 else (rng.choice([-1, 1]) * u(45, 120) if r < 0.85 else u(120, 240))
    p["roll"] = u(-35, 35) if rng.random() < 0.1 else float(np.clip(rng.normal(0, 6), -15, 15))
    p.update({"head_yaw": u(-50, 50), "head_pitch": u(-20, 25), "head_roll": u(-15, 15)})
    return p


def forward_kinematics(p: dict[str, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """3-D points [NUM_POINTS, 3] (camera frame: x right, y up, z towards the camera, stature units,
    pelvis at the origin), head rotation [3, 3], face visibilities [5] (0/1/2), and COCO-WholeBody's other
    points [NUM_WHOLEBODY_EXTRA, 4] (x, y, z, visibility 0/2) in its order: feet, face, left hand, right hand."""
    pts = np.zeros((NUM_POINTS, 3))
    extra = np.zeros((NUM_WHOLEBODY_EXTRA, 4))
    body = _ry(p["yaw"])
    torso = body @ _ry(p["twist"]) @ _rz(p["side"]) @ _rx(p["pitch"])
    pts[NECK] = torso @ (0, _SPINE, 0)
    head_rot = torso @ _ry(p["head_yaw"]) @ _rx(-p["head_pitch"]) @ _rz(p["head_roll"])
    pts[HEAD] = pts[NECK] + head_rot @ (0, _NECK_TO_HEAD, 0.01)
    pts[FACE] = pts[HEAD] + head_rot @ (0, -0.004, 0.012)
    pts[HAIR_C] = pts[HEAD] + head_rot @ (0, 0.01, -0.012)
    face_vis = np.zeros(5, np.int64)
    for k, (offset, normal, visible_z, labelled_z) in enumerate(_FACE):
        pts[k] = pts[HEAD] + head_rot @ offset
        z = (head_rot @ (np.array(normal) / np.linalg.norm(normal)))[2]
        face_vis[k] = 2 if z > visible_z else (1 if z > labelled_z else 0)
    for s, g in (("l", 1.0), ("r", -1.0)):
        i = 0 if s == "l" else 1  # left and right keypoints alternate in COCO order
        pts[5 + i] = pts[NECK] + torso @ (g * _SHOULDER_HALF, -0.015, 0)
        upper = torso @ _rz(g * p[f"sabd_{s}"]) @ _rx(-p[f"sflex_{s}"]) @ _ry(g * p[f"srot_{s}"])
        pts[7 + i] = pts[5 + i] + upper @ (0, -_UPPER_ARM, 0)
        fore = upper @ _rx(-p[f"elbow_{s}"])
        pts[9 + i] = pts[7 + i] + fore @ (0, -_FOREARM, 0)
        pts[HAND_L + i] = pts[9 + i] + fore @ (0, -_HAND, 0)
        pts[11 + i] = body @ (g * _HIP_HALF, 0, 0)
        thigh = body @ _rz(g * p[f"habd_{s}"]) @ _rx(-p[f"hflex_{s}"])
        pts[13 + i] = pts[11 + i] + thigh @ (0, -_THIGH, 0)
        shank = thigh @ _rx(p[f"knee_{s}"])
        pts[15 + i] = pts[13 + i] + shank @ (0, -_SHANK, 0)
        foot = shank @ _rx(p[f"ankle_{s}"])
        pts[TOE_L + i] = pts[15 + i] + foot @ (0, -0.035, 0.12)
        for j, offset in enumerate(((-g * 0.02, -0.04, 0.125), (g * 0.025, -0.04, 0.1), (0, -0.045, -0.03))):
            extra[3 * i + j, :3] = pts[15 + i] + foot @ offset  # big toe, small toe, heel
        hand = (np.array([g, 1.0, 1.0]) * _HAND21) @ fore.T * _HAND  # fore @ each offset
        extra[74 + 21 * i:95 + 21 * i, :3] = pts[9 + i] + hand
    extra[:6, 3] = extra[74:, 3] = 2
    extra[6:74, :3] = pts[HEAD] + _FACE68 @ head_rot.T
    if face_vis[0]:  # a face seen at all: its points that turn towards the camera are labelled
        extra[6:74, 3] = np.where((_FACE68_NORMALS @ head_rot.T)[:, 2] > 0.05, 2, 0)
    return pts, head_rot, face_vis, extra


@dataclass
class Figure:
    """A posed figure in image pixels.

    points: [NUM_POINTS, 2] float64, x right / y down, pixel centres at integers.
    face_vis: [5] 0/1/2 from the head's own orientation.
    wholebody: the other points of a COCO-WholeBody person, in pixels as `points`, with their visibility
        (a face point turned away from the camera is 0); drawn (fingers, brows, mouth) only when the figure
        is built `wholebody`.
    parts: drawing commands sorted far to near: (kind, material, geometry...).
    """

    points: np.ndarray
    face_vis: np.ndarray
    parts: list[tuple]
    stature_px: float
    wholebody: np.ndarray  # [NUM_WHOLEBODY_EXTRA, 3]: COCO-WholeBody's feet, face and hand points (x, y, v)

    def extent(self) -> tuple[float, float, float, float]:
        """x0, y0, x1, y1 of everything drawn (points plus a margin for thickness and the head)."""
        margin = 0.11 * self.stature_px  # hair reaches ~0.1 stature above the head centre
        xy = self.points
        return (xy[:, 0].min() - margin, xy[:, 1].min() - margin,
                xy[:, 0].max() + margin, xy[:, 1].max() + margin)


def build_figure(pose: dict[str, float], stature_px: float, short_sleeves: bool, shorts: bool,
                 wholebody: bool = False) -> Figure:
    """Projects the posed body to pixels (pelvis at 0, 0) and lists its parts in painter's order; with
    `wholebody`, also the fingers, brows and mouth that COCO-WholeBody's points lie on."""
    pts3, head_rot, face_vis, extra3 = forward_kinematics(pose)
    c, s = np.cos(np.radians(pose["roll"])), np.sin(np.radians(pose["roll"]))
    turn = np.array([[c, s], [-s, c]])
    xy = np.stack([pts3[:, 0], -pts3[:, 1]], 1) @ turn * stature_px
    extra = np.concatenate([np.stack([extra3[:, 0], -extra3[:, 1]], 1) @ turn * stature_px, extra3[:, 3:]], 1)
    depth = pts3[:, 2]
    S = stature_px
    parts: list[tuple[float, tuple]] = []

    def seg(a: int, b: int, width: str, mat: int, bias: float) -> None:
        parts.append(((depth[a] + depth[b]) / 2 + bias, ("seg", mat, xy[a], xy[b], _WIDTH[width] * S)))

    # Torso: trousers from the waist down, shirt over it; widths follow the projected shoulders/hips.
    spine = xy[NECK] - xy[PELVIS]
    up = spine / max(np.linalg.norm(spine), 1e-6)
    perp = np.array([-up[1], up[0]])
    top = max(abs((xy[5] - xy[6]) @ perp) / 2 + 0.04 * S, 0.075 * S)
    bottom = max(abs((xy[11] - xy[12]) @ perp) / 2 + 0.06 * S, 0.075 * S)
    waist_c, waist = xy[PELVIS] + 0.35 * spine, 0.9 * min(top, bottom)
    low = xy[PELVIS] - 0.06 * S * up
    z_torso = (depth[NECK] + depth[PELVIS]) / 2
    trousers = np.array([waist_c + perp * waist, low + perp * bottom, low - perp * bottom,
                         waist_c - perp * waist])
    shirt_end = xy[PELVIS] + 0.2 * spine
    shirt = np.array([xy[NECK] + perp * top, waist_c + perp * waist, shirt_end + perp * waist * 1.05,
                      shirt_end - perp * waist * 1.05, waist_c - perp * waist, xy[NECK] - perp * top])
    parts.append((z_torso, ("poly", TROUSERS, trousers)))
    parts.append((z_torso + 1e-4, ("poly", SHIRT, shirt)))
    parts.append((z_torso + 2e-4, ("seg", SHIRT, xy[5], xy[6], 0.09 * S)))
    seg(NECK, HEAD, "neck", SKIN, -0.01)
    for i, left in ((0, True), (1, False)):
        side = (lambda m: LEFT_OF[m]) if left else (lambda m: m)
        seg(5 + i, 7 + i, "upper_arm", side(SHIRT), 0.03)
        seg(7 + i, 9 + i, "forearm", side(SKIN if short_sleeves else SHIRT), 0.03)
        seg(9 + i, HAND_L + i, "hand", side(SKIN), 0.03)
        seg(11 + i, 13 + i, "thigh", side(TROUSERS), -0.01)
        seg(13 + i, 15 + i, "shank", side(SKIN if shorts else TROUSERS), -0.01)
        seg(15 + i, TOE_L + i, "foot", side(SHOES), -0.01)
        if left:  # the fixed-colour bands: the absolute left/right cue
            for a, b, w in ((7, 9, "forearm"), (13, 15, "shank")):
                z = (depth[a] + depth[b]) / 2 + (0.03 if a == 7 else -0.01) + 1e-4
                along = xy[b] - xy[a]
                across = np.array([-along[1], along[0]]) / max(np.linalg.norm(along), 1e-6)
                across *= 0.55 * _WIDTH[w] * S
                p0, p1 = xy[a] + 0.72 * along, xy[a] + 0.84 * along  # a cuff just above the joint
                parts.append((z, ("poly", BAND, np.array([p0 + across, p1 + across, p1 - across,
                                                          p0 - across]))))
    # Head: the exact outline of the rotated ellipsoid under orthographic projection (eigen-axes of
    # P R diag(a^2) R^T P^T, P keeping x and flipping y), face and hair in depth order, then the
    # features that face the camera, tilted with the head's projected up vector.
    proj = head_rot[:2] * _HEAD_AXES * np.array([[1.0], [-1.0]])
    var, vec = np.linalg.eigh(proj @ proj.T)
    axes = np.sqrt(np.maximum(var, 1e-8)) * S
    angle = np.degrees(np.arctan2(vec[1, 0], vec[0, 0])) + pose["roll"]
    tilt = np.degrees(np.arctan2(-head_rot[0, 1], -head_rot[1, 1])) + pose["roll"]
    z_head = depth[HEAD] + 0.08
    parts.append((z_head + (depth[HAIR_C] - depth[FACE]) * 1e-2,
                  ("ellipse", HAIR, xy[HAIR_C] - 0.012 * S * up, axes * 1.06, angle)))
    parts.append((z_head, ("ellipse", SKIN, xy[FACE], axes, angle)))
    feature = max(0.008 * S, 0.7)
    for k, mat in ((3, SKIN), (4, SKIN), (1, EYE), (2, EYE), (0, NOSE)):
        if face_vis[k] == 2:
            size = np.array([feature, 2 * feature]) if k >= 3 else np.array([feature, feature])
            parts.append((z_head + 0.01, ("ellipse", mat, xy[k], size, tilt)))
    if wholebody:
        _wholebody_parts(parts, extra, depth, z_head, face_vis, S)
    parts.sort(key=lambda zp: zp[0])
    return Figure(xy, face_vis, [p for _, p in parts], S, extra)


def _wholebody_parts(parts: list, extra: np.ndarray, depth: np.ndarray, z_head: float, face_vis: np.ndarray,
                     S: float) -> None:
    """Fingers (skin, the left hand's shaded), and for a face towards the camera brows and lips, on
    COCO-WholeBody's points (`extra`: [NUM_WHOLEBODY_EXTRA, 3] as `Figure.wholebody`)."""
    for i, mat in ((0, SKIN_L), (1, SKIN)):
        hand = extra[74 + 21 * i:95 + 21 * i, :2]
        z = depth[9 + i] + 0.031
        for f in range(5):
            base, tip = hand[0] if f == 0 else hand[1 + 4 * f], hand[4 + 4 * f]
            parts.append((z, ("seg", mat, base, tip, max(0.012 * S, 1.0))))
    if face_vis[0] == 2:
        face = extra[6:74, :2]
        for a, b in ((17, 21), (22, 26)):
            parts.append((z_head + 0.01, ("seg", HAIR, face[a], face[b], max(0.006 * S, 1.0))))
        mouth = face[48:60]
        parts.append((z_head + 0.01, ("poly", NOSE, mouth)))


def draw_labels(fig: Figure, origin_xy: tuple[int, int], hw: tuple[int, int]) -> np.ndarray:
    """Material label map uint8 [h, w] of the figure on a canvas whose pixel (0, 0) is `origin_xy`."""
    shift, one = 4, 16.0  # sub-pixel drawing in 1/16 pixel
    labels = np.zeros(hw, np.uint8)
    o = np.asarray(origin_xy, np.float64)

    def fx(p: np.ndarray) -> np.ndarray:
        return np.round((p - o) * one).astype(np.int32)

    for kind, mat, *geo in fig.parts:
        if kind == "seg":
            a, b, width = geo
            cv2.line(labels, tuple(fx(a)), tuple(fx(b)), mat, max(int(round(width)), 1), cv2.LINE_8, shift)
        elif kind == "poly":
            cv2.fillPoly(labels, [fx(geo[0])], mat, cv2.LINE_8, shift)
        else:
            center, axes, angle = geo
            cv2.ellipse(labels, tuple(fx(center)), tuple(np.maximum(np.round(axes * one), 1).astype(int)),
                        float(angle), 0, 360, mat, -1, cv2.LINE_8, shift)
    return labels
