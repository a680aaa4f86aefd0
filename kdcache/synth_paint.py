"""How a synthetic image is painted (`kdcache synth`): cluttered backgrounds, the people's clothes and skin from
their material label maps, and the camera (exposure, sensor noise, blur). Every draw comes from the image's own
generator, in a fixed order, so that an image is the same however many are rendered.
"""

from __future__ import annotations

import cv2
import numpy as np

from kdcache import synth_figure as sf

BAND_BGR = (0.0, 230.0, 255.0)  # the left wrist/ankle band: one colour for everyone (yellow)
LEFT_SHADE = 0.7  # left limbs wear the same clothes, this much darker
_SKIN_BGR = ((190, 215, 245), (160, 190, 230), (120, 160, 215), (90, 130, 190), (60, 95, 150),
             (40, 65, 110), (150, 180, 220))
_HAIR_BGR = ((20, 20, 25), (30, 45, 70), (40, 70, 110), (90, 150, 200), (160, 160, 165), (30, 60, 150))
_TROUSER_BGR = ((120, 70, 40), (90, 50, 30), (30, 30, 30), (90, 90, 90), (110, 160, 180), (60, 80, 60))


def _random_bgr(rng: np.random.Generator, sat: tuple[float, float] = (0.2, 0.9),
                val: tuple[float, float] = (0.25, 0.95)) -> np.ndarray:
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(*sat) * 255, rng.uniform(*val) * 255]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _texture(rng: np.random.Generator, base: np.ndarray, hw: tuple[int, int], scale: float,
             kinds: tuple[float, float, float, float]) -> np.ndarray | None:
    """Cloth texture float32 [h, w, 3]: solid (None), stripes, checks or noise (probabilities `kinds`)."""
    h, w = hw
    kind = rng.choice(4, p=kinds)
    if kind == 0:
        return None  # solid: the base colour is already in place
    if kind == 3:
        noise = rng.uniform(0.65, 1.3, (h // 3 + 2, w // 3 + 2)).astype(np.float32)
        return base * cv2.resize(noise, (w, h), interpolation=cv2.INTER_LINEAR)[..., None]
    other = _random_bgr(rng) if rng.random() < 0.6 else base * rng.uniform(0.35, 0.7)
    period, angle = max(scale * rng.uniform(0.03, 0.1), 3.0), rng.uniform(0, np.pi)
    on = _stripes(hw, period, angle)
    if kind == 2:
        on ^= _stripes(hw, period, angle + np.pi / 2)
    return np.take(np.stack([other, base]), on, axis=0)


def _stripes(hw: tuple[int, int], period: float, angle: float) -> np.ndarray:
    """int32 [h, w] of 0/1: stripes `period` px wide (on + off) across direction `angle`."""
    h, w = hw
    f = 2.0 / period  # two half-periods per period; the integer part's parity says on or off
    phase = (np.arange(w, dtype=np.float32) * np.float32(np.cos(angle) * f))[None, :] + \
        (np.arange(h, dtype=np.float32) * np.float32(np.sin(angle) * f))[:, None]
    # An even offset keeps the phase positive, so truncation to int is a floor.
    return (phase + np.float32(2 * np.ceil((h + w) * f))).astype(np.int32) & 1


def composite(rng: np.random.Generator, canvas: np.ndarray, p: dict) -> None:
    """Colours a person's label map (clothes, skin, left shade) and alpha-blends it into `canvas`."""
    labels, mask = p["labels_in"], p["mask"]
    if not mask.any():
        return
    lut = np.zeros((sf.NUM_MATERIALS, 3), np.float32)
    skin = np.array(_SKIN_BGR[rng.integers(len(_SKIN_BGR))], np.float32) * rng.uniform(0.85, 1.1)
    trousers = (np.array(_TROUSER_BGR[rng.integers(len(_TROUSER_BGR))], np.float32) * rng.uniform(0.7, 1.2)
                if rng.random() < 0.6 else _random_bgr(rng))
    lut[sf.SKIN], lut[sf.SHIRT], lut[sf.TROUSERS] = skin, _random_bgr(rng), trousers
    lut[sf.SHOES] = _random_bgr(rng, val=(0.05, 0.5))
    lut[sf.HAIR] = np.array(_HAIR_BGR[rng.integers(len(_HAIR_BGR))], np.float32)
    lut[sf.BAND], lut[sf.EYE], lut[sf.NOSE] = BAND_BGR, (25, 25, 30), skin * 0.75
    shade_lut = np.ones(sf.NUM_MATERIALS, np.float32)
    for right, left in sf.LEFT_OF.items():
        lut[left], shade_lut[left] = lut[right], LEFT_SHADE
    out = np.take(lut, labels, axis=0)  # [h, w, 3]; np.take is several times faster than lut[labels]
    hw, scale = labels.shape, p["fig"].stature_px
    for mat, kinds in ((sf.SHIRT, (0.35, 0.3, 0.15, 0.2)), (sf.TROUSERS, (0.6, 0.1, 0.0, 0.3))):
        tex = _texture(rng, lut[mat], hw, scale, kinds)
        if tex is not None:
            np.copyto(out, tex, where=((labels == mat) | (labels == sf.LEFT_OF[mat]))[..., None])
    # Dark seams where materials meet make overlapping limbs readable; a linear light gradient gives
    # some relief; the soft inner edge of alpha stands in for anti-aliasing.
    seam = np.zeros(hw, bool)
    seam[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    seam[1:, :] |= labels[1:, :] != labels[:-1, :]
    light = rng.uniform(-0.25, 0.25, 2).astype(np.float32) / max(hw)
    shade = np.take(shade_lut, labels) * np.where(seam, np.float32(0.72), np.float32(1.0))
    shade *= (1 + (np.arange(hw[0], dtype=np.float32)[:, None] - hw[0] / 2) * light[0]
              + (np.arange(hw[1], dtype=np.float32)[None, :] - hw[1] / 2) * light[1])
    alpha = cv2.blur(mask.astype(np.float32), (3, 3)) * mask
    out *= shade[..., None]
    canvas[p["clip"]] = cv2.blendLinear(out, canvas[p["clip"]], alpha, 1 - alpha)


def background(rng: np.random.Generator, w: int, h: int, clutter: float = 1.0) -> np.ndarray:
    """Cluttered scene uint8 [H, W, 3]: colour gradients, a floor, noise, shapes, limb-like sticks."""
    grid = rng.uniform(20, 235, (rng.integers(2, 5), rng.integers(2, 5), 3)).astype(np.float32)
    img = cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.6:  # a floor below a horizon
        horizon = int(rng.uniform(0.3, 0.75) * h)
        floor = rng.uniform(20, 235, (2, 2, 3)).astype(np.float32)
        img[horizon:] = cv2.resize(floor, (w, h - horizon), interpolation=cv2.INTER_LINEAR)
    coarse = rng.normal(0, rng.uniform(3, 12), (h // 8 + 1, w // 8 + 1, 3)).astype(np.float32)
    blocky = rng.random() < 0.5
    img += cv2.resize(coarse, (w, h), interpolation=cv2.INTER_NEAREST if blocky else cv2.INTER_LINEAR)
    img = np.clip(img, 0, 255).astype(np.uint8)
    aa = cv2.LINE_AA
    for _ in range(int(round(rng.integers(6, 22) * clutter))):
        colour = tuple(float(c) for c in _random_bgr(rng, (0.0, 1.0), (0.1, 1.0)))
        x, y = int(rng.integers(-20, w + 20)), int(rng.integers(-20, h + 20))
        size = int(rng.uniform(5, 0.5 * max(w, h)))
        kind, thick = rng.integers(5), int(rng.choice([-1, -1, 1, 2, 4]))
        if kind == 0:
            cv2.rectangle(img, (x, y), (x + size, y + int(rng.uniform(5, 0.5 * h))), colour, thick, aa)
        elif kind == 1:
            cv2.ellipse(img, (x, y), (size // 2 + 1, int(rng.uniform(3, size / 2 + 4))),
                        rng.uniform(0, 180), 0, 360, colour, thick, aa)
        elif kind == 2:
            pts = (rng.uniform(-0.5, 0.5, (int(rng.integers(3, 7)), 2)) * size + (x, y)).astype(np.int32)
            cv2.fillPoly(img, [pts], colour, aa)
        else:  # straight lines and limb-like jointed sticks with round caps, in skin or cloth colours
            if kind == 4 and rng.random() < 0.6:
                colour = tuple(float(c) for c in _SKIN_BGR[rng.integers(len(_SKIN_BGR))])
            pts = [np.array([x, y], np.float64)]
            for _ in range(int(rng.integers(1, 4)) if kind == 4 else 1):
                step, angle = rng.uniform(0.15, 0.5) * size, rng.uniform(0, 2 * np.pi)
                pts.append(pts[-1] + step * np.array([np.cos(angle), np.sin(angle)]))
            width = int(rng.uniform(0.02, 0.06) * size + 2) if kind == 4 else int(rng.integers(1, 4))
            for a, b in zip(pts[:-1], pts[1:]):
                cv2.line(img, tuple(a.astype(int)), tuple(b.astype(int)), colour, width, aa)
    return img


def camera(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """Exposure, sensor noise and occasional blur; float32 [H, W, 3] -> uint8 [H, W, 3]."""
    # Uniform noise from raw bytes: a few times cheaper than Gaussian draws, and looks the same.
    noise = np.frombuffer(rng.bytes(canvas.size), np.uint8).reshape(canvas.shape)
    gain, sigma = rng.uniform(0.75, 1.2), rng.uniform(1, 6) / 73.6  # 73.6: std of uniform 0..255
    img = cv2.addWeighted(canvas, gain, noise, sigma, rng.uniform(-25, 25) - 127.5 * sigma, dtype=cv2.CV_32F)
    if rng.random() < 0.25:
        img = cv2.GaussianBlur(img, (3, 3), rng.uniform(0.5, 1.0))
    return np.clip(img, 0, 255, out=img).astype(np.uint8)
