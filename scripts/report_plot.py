"""A small OpenCV plot (axes, error bars, bands, legend) for the benchmark report: kdcache already needs
OpenCV, so the report adds no plotting dependency."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

BLACK, GREY = (0, 0, 0), (150, 150, 150)
PALETTE = [(40, 150, 40), (200, 90, 30), (30, 30, 200), (150, 40, 150), (0, 140, 200), (90, 90, 90)]  # BGR


class Plot:
    """A white canvas with axes; data coordinates map linearly (or log2 on x) to pixels."""

    def __init__(self, x_range: tuple[float, float], y_range: tuple[float, float], x_label: str, y_label: str,
                 title: str, log2_x: bool = False, size: tuple[int, int] = (900, 560)):
        self.w, self.h = size
        self.margin = (80, 60, 60, 70)  # left, top, right, bottom
        self.log2_x = log2_x
        self.x0, self.x1 = (math.log2(v) for v in x_range) if log2_x else x_range
        self.y0, self.y1 = y_range
        self.img = np.full((self.h, self.w, 3), 255, np.uint8)
        self.legend: list[tuple[str, tuple[int, int, int], bool]] = []
        left, top, right, bottom = self.margin
        cv2.rectangle(self.img, (left, top), (self.w - right, self.h - bottom), BLACK, 1)
        self.text(title, (left, 24), 0.55)
        self.text(x_label, (self.w // 2 - 4 * len(x_label), self.h - 20), 0.5)
        self.text(y_label, (8, top - 12), 0.5)

    def px(self, x: float, y: float) -> tuple[int, int]:
        left, top, right, bottom = self.margin
        xv = math.log2(x) if self.log2_x else x
        u = (xv - self.x0) / (self.x1 - self.x0)
        v = (y - self.y0) / (self.y1 - self.y0)
        return int(left + u * (self.w - left - right)), int(self.h - bottom - v * (self.h - top - bottom))

    def text(self, s: str, at: tuple[int, int], scale: float = 0.45, colour=BLACK) -> None:
        cv2.putText(self.img, s, at, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)

    def ticks(self, xs: Sequence[float], ys: Sequence[float], x_fmt: str = "{:g}", y_fmt: str = "{:g}") -> None:
        for x in xs:
            p = self.px(x, self.y0)
            cv2.line(self.img, p, (p[0], p[1] - 5), BLACK, 1)
            label = x_fmt.format(x)
            self.text(label, (p[0] - 4 * len(label), p[1] + 18))
        for y in ys:
            p = self.px(self.x1 if not self.log2_x else 2 ** self.x0, y)
            q = self.px(2 ** self.x0 if self.log2_x else self.x0, y)
            cv2.line(self.img, q, (q[0] + 5, q[1]), BLACK, 1)
            cv2.line(self.img, (q[0] + 6, q[1]), (p[0], p[1]), (235, 235, 235), 1)
            label = y_fmt.format(y)
            self.text(label, (q[0] - 10 - 8 * len(label), q[1] + 5))

    def band(self, mean: float, std: float, colour, label: str) -> None:
        """A horizontal line at `mean` with a shaded +-std band, across the whole plot."""
        left, top, right, bottom = self.margin
        overlay = self.img.copy()
        y_hi, y_lo = self.px(0 if not self.log2_x else 1, mean + std)[1], self.px(1, mean - std)[1]
        cv2.rectangle(overlay, (left + 1, y_hi), (self.w - right - 1, y_lo), colour, -1)
        self.img = cv2.addWeighted(overlay, 0.15, self.img, 0.85, 0)
        y = self.px(1, mean)[1]
        for x in range(left, self.w - right, 12):  # dashed
            cv2.line(self.img, (x, y), (min(x + 6, self.w - right), y), colour, 2, cv2.LINE_AA)
        self.legend.append((label, colour, True))

    def series(self, points: Sequence[tuple[float, float, float]], colour, label: str, line: bool = True,
               marker: int = 5) -> None:
        """(x, mean, std) points with error bars, joined by a line when `line`."""
        pts = [self.px(x, m) for x, m, _ in points]
        if line:
            for a, b in zip(pts, pts[1:]):
                cv2.line(self.img, a, b, colour, 2, cv2.LINE_AA)
        for (x, m, s), p in zip(points, pts):
            if s > 0:
                lo, hi = self.px(x, m - s), self.px(x, m + s)
                cv2.line(self.img, lo, hi, colour, 2, cv2.LINE_AA)
                for q in (lo, hi):
                    cv2.line(self.img, (q[0] - 5, q[1]), (q[0] + 5, q[1]), colour, 2, cv2.LINE_AA)
            cv2.circle(self.img, p, marker, colour, -1, cv2.LINE_AA)
        self.legend.append((label, colour, False))

    def label(self, x: float, y: float, s: str, colour=BLACK) -> None:
        p = self.px(x, y)
        self.text(s, (p[0] + 8, p[1] - 8), 0.42, colour)

    def save(self, path: Path, corner: str = "bottom-right") -> None:
        left, top, right, bottom = self.margin
        x = self.w - right - 330 if corner.endswith("right") else left + 15
        y0 = self.h - bottom - 18 * len(self.legend) - 8 if corner.startswith("bottom") else top + 20
        for i, (label, colour, dashed) in enumerate(self.legend):
            y = y0 + 18 * i
            if dashed:
                cv2.line(self.img, (x, y), (x + 8, y), colour, 2)
                cv2.line(self.img, (x + 14, y), (x + 22, y), colour, 2)
            else:
                cv2.line(self.img, (x, y), (x + 22, y), colour, 2)
                cv2.circle(self.img, (x + 11, y), 4, colour, -1)
            self.text(label, (x + 30, y + 5))
        cv2.imwrite(str(path), self.img)


def y_range(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = max(1.0, 0.1 * (hi - lo))
    return math.floor(lo - pad), math.ceil(hi + pad)


def nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    step = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(step))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= step), default=mag)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 6) for i in range(int((hi - first) / step) + 1)]
