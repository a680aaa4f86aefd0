"""The simulated person detector that boxes the people of `kdcache synth`'s unlabelled split.

`SynthDetector.detect` turns the true person boxes of one image into COCO-style detections as a real
detector's would look: each person is missed with a probability that grows for small people; a detected
one has its box corners jittered in proportion to the box size, and a score that falls with the jittered
box's IoU to the true box, plus noise. Each image also gets 0-2 person-shaped false positives on the
background, with low-to-mid scores.

The detector draws only from the generator it is given. `kdcache synth` gives it the stream
`[seed, split, index, 1]`, separate from the image's `[seed, split, index]`, so the rendered images are
the same whatever the detector's settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SynthDetector:
    """A simulated person detector: how `kdcache synth` boxes the people of its unlabelled split.

    A true positive's score is `tp_score - (1 - IoU) + N(0, score_noise)`, IoU between its jittered box and
    the true one; all scores are clipped to [0.01, 0.99].
    """

    miss_prob: float = 0.05  # chance of missing a person whose box is at least 2 * small_px (sqrt(w * h))
    small_miss_prob: float = 0.4  # chance of missing one whose box is at most small_px; linear in between
    small_px: float = 32.0  # sqrt(box area) in px at and below which a person is small (COCO's border)
    jitter: float = 0.06  # std of each box corner's shift, as a fraction of the box's width (x) or height (y)
    tp_score: float = 0.95  # mean score of a detection whose box is exact
    score_noise: float = 0.08  # std of the noise on a true positive's score
    max_false_positives: int = 2  # false positives per image: uniform in 0..this
    fp_height: tuple[float, float] = (0.15, 0.6)  # range of a false positive's height, fraction of image height
    fp_aspect: tuple[float, float] = (0.3, 0.7)  # range of a false positive's width / height
    fp_score: float = 0.3  # mean score of a false positive
    fp_score_noise: float = 0.12  # std of a false positive's score

    def detect(self, rng: np.random.Generator, true_xywh: np.ndarray,
               image_wh: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Detections in one image of the people whose true boxes are `true_xywh` ([N, 4] px, x y w h).

        Returns:
            bbox_xywh: float64 [M, 4] px, inside the image, corners rounded to 0.01 px.
            scores: float64 [M] in [0.01, 0.99].
        """
        w, h = image_wh
        true_xyxy = np.array(true_xywh, float).reshape(-1, 4)
        true_xyxy[:, 2:] += true_xyxy[:, :2]
        boxes, scores = [], []
        for box in true_xyxy:
            bw, bh = box[2:] - box[:2]
            small = np.clip(2 - np.sqrt(bw * bh) / self.small_px, 0, 1)
            # Every person takes the same draws, so changing one setting leaves the others' effects alone.
            u, shift = rng.random(), rng.normal(0, self.jitter, 4) * (bw, bh, bw, bh)
            noise = rng.normal(0, self.score_noise)
            det = np.round(np.clip(box + shift, 0, (w, h, w, h)), 2)
            if u < self.miss_prob + (self.small_miss_prob - self.miss_prob) * small or np.any(det[2:] - det[:2] < 1):
                continue
            boxes.append(det)
            scores.append(self.tp_score - (1 - _iou(det, box)) + noise)
        for _ in range(rng.integers(self.max_false_positives + 1)):
            fh = rng.uniform(*self.fp_height) * h
            fw = min(rng.uniform(*self.fp_aspect) * fh, w)
            for _ in range(20):  # on the background: at most a quarter of the box on any true person's box
                x, y = rng.uniform(0, w - fw), rng.uniform(0, h - fh)
                det = np.round([x, y, x + fw, y + fh], 2)
                if all(_intersection(det, t) < 0.25 * fw * fh for t in true_xyxy):
                    boxes.append(det)
                    scores.append(rng.normal(self.fp_score, self.fp_score_noise))
                    break
        xywh = np.array(boxes, float).reshape(-1, 4)
        xywh[:, 2:] -= xywh[:, :2]
        return np.round(xywh, 2), np.clip(np.array(scores, float), 0.01, 0.99)


def _intersection(a: np.ndarray, b: np.ndarray) -> float:
    """Overlap area of two x0 y0 x1 y1 boxes."""
    return float(max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two x0 y0 x1 y1 boxes."""
    inter = _intersection(a, b)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
