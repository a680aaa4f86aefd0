"""The keypoint codec: UDP encode, DARK-UDP decode, flips and the heatmap -> crop mapping."""

import cv2
import numpy as np
import pytest
import torch

from kdcache.heatmaps import (blur_heatmaps, decode, encode, flip_heatmaps,
                              heatmap_to_crop)
from kdcache.keypoints import FLIP_INDEX, NUM_KEYPOINTS

INPUT_HW = (256, 192)
HEATMAP_HW = (64, 48)


def _random_keypoints(rng, n=NUM_KEYPOINTS, margin=24.0):
    """Sub-pixel keypoints in crop pixels, at least `margin` from the border, all labelled."""
    kpts = np.empty((n, 3), dtype=np.float32)
    kpts[:, 0] = rng.uniform(margin, INPUT_HW[1] - 1 - margin, n)
    kpts[:, 1] = rng.uniform(margin, INPUT_HW[0] - 1 - margin, n)
    kpts[:, 2] = 2
    return kpts


def _reference_decode(maps, kernel=11):
    """Slow DARK-UDP written out per joint: whole-map cv2 blur, log, edge pad, Newton step."""
    n, k, h, w = maps.shape
    coords = np.zeros((n, k, 2))
    for i in range(n):
        for j in range(k):
            m = maps[i, j]
            y, x = np.unravel_index(np.argmax(m), m.shape)
            lg = np.pad(np.log(np.clip(cv2.GaussianBlur(m, (kernel, kernel), 0), 0.001, 50)), 1, mode="edge")
            p = lambda dx, dy: float(lg[y + 1 + dy, x + 1 + dx])  # noqa: E731
            grad = np.array([0.5 * (p(1, 0) - p(-1, 0)), 0.5 * (p(0, 1) - p(0, -1))])
            dxy = 0.5 * (p(1, 1) - p(1, 0) - p(0, 1) + 2 * p(0, 0) - p(-1, 0) - p(0, -1) + p(-1, -1))
            hess = np.array([[p(1, 0) - 2 * p(0, 0) + p(-1, 0), dxy],
                             [dxy, p(0, 1) - 2 * p(0, 0) + p(0, -1)]])
            coords[i, j] = np.array([x, y]) - np.linalg.inv(hess + np.finfo(np.float32).eps * np.eye(2)) @ grad
    return coords


def test_round_trip_is_sub_pixel_exact():
    rng = np.random.default_rng(0)
    kpts = np.stack([_random_keypoints(rng) for _ in range(8)])  # [8, 17, 3]
    maps = np.stack([encode(k, INPUT_HW, HEATMAP_HW, sigma=2.0)[0] for k in kpts])
    coords, scores = decode(maps)
    expected = kpts[..., :2] * np.array([47 / 191, 63 / 255])  # UDP: (w-1)/(W-1), not w/W
    assert coords.shape == (8, 17, 2) and coords.dtype == np.float32
    assert np.abs(coords - expected).max() < 0.05
    assert np.all(scores > np.exp(-1 / 8)) and np.all(scores <= 1.0)
    # Back to crop pixels with the (size-1) strides.
    assert np.abs(heatmap_to_crop(coords, INPUT_HW, HEATMAP_HW) - kpts[..., :2]).max() < 0.05 * 4.1


def test_encode_values_and_weights():
    kpts = np.zeros((NUM_KEYPOINTS, 3), dtype=np.float32)
    stride_x, stride_y = 191 / 47, 255 / 63  # UDP strides
    kpts[0] = (20.3 * stride_x, 30.6 * stride_y, 2)  # mu = (20.3, 30.6) in heatmap pixels
    kpts[1] = (100, 100, 0)  # not labelled
    kpts[2] = (-100, 100, 2)  # far left of the crop
    kpts[3] = (100, 400, 1)  # far below the crop
    kpts[4] = (-2, 100, 1)  # just outside: part of its Gaussian window is inside
    maps, weight = encode(kpts, INPUT_HW, HEATMAP_HW)
    assert maps.shape == (NUM_KEYPOINTS, 64, 48) and maps.dtype == np.float32
    np.testing.assert_array_equal(weight[:5], [1, 0, 0, 0, 1])
    assert not maps[1:4].any()
    assert maps[4].max() > 0
    # Unnormalised Gaussian with sigma 2 at the sub-pixel centre.
    np.testing.assert_allclose(maps[0, 31, 20], np.exp(-(0.3 ** 2 + 0.4 ** 2) / 8), rtol=1e-6)
    np.testing.assert_allclose(maps[0, 30, 22], np.exp(-(1.7 ** 2 + 0.6 ** 2) / 8), rtol=1e-6)
    # mmpose cuts the Gaussian to the 13x13 window around round(mu) = (20, 31).
    assert maps[0, 31, 26] > 0 and maps[0, 31, 27] == 0 and maps[0, 31, 14] > 0 and maps[0, 31, 13] == 0
    assert maps[0, 37, 20] > 0 and maps[0, 38, 20] == 0


def test_flip_heatmaps_is_an_involution_numpy_and_torch():
    rng = np.random.default_rng(1)
    maps = rng.random((2, NUM_KEYPOINTS, 64, 48)).astype(np.float32)
    np.testing.assert_array_equal(flip_heatmaps(flip_heatmaps(maps)), maps)
    flipped_t = flip_heatmaps(torch.from_numpy(maps))
    assert isinstance(flipped_t, torch.Tensor)
    np.testing.assert_array_equal(flipped_t.numpy(), flip_heatmaps(maps))
    np.testing.assert_array_equal(flip_heatmaps(flipped_t).numpy(), maps)
    # Channel 5 (left shoulder) of the flipped maps is channel 6 mirrored.
    np.testing.assert_array_equal(flip_heatmaps(maps)[:, 5], maps[:, 6, :, ::-1])


def test_flipped_heatmaps_equal_heatmaps_of_mirrored_keypoints():
    rng = np.random.default_rng(2)
    kpts = _random_keypoints(rng, margin=2.0)
    mirrored = kpts.copy()
    mirrored[:, 0] = INPUT_HW[1] - 1 - kpts[:, 0]
    mirrored = mirrored[list(FLIP_INDEX)]
    maps, _ = encode(kpts, INPUT_HW, HEATMAP_HW)
    maps_mirrored, _ = encode(mirrored, INPUT_HW, HEATMAP_HW)
    # Exact under UDP (no half-pixel shift), up to float rounding.
    np.testing.assert_allclose(flip_heatmaps(maps), maps_mirrored, atol=1e-6)
    np.testing.assert_allclose(flip_heatmaps(torch.from_numpy(maps)).numpy(), maps_mirrored, atol=1e-6)


def test_heatmap_to_crop_corners():
    pts = np.array([[0.0, 0.0], [47.0, 63.0], [23.5, 31.5]])
    np.testing.assert_allclose(heatmap_to_crop(pts, INPUT_HW, HEATMAP_HW),
                               [[0, 0], [191, 255], [95.5, 127.5]], atol=1e-12)


def test_blur_heatmaps_equals_per_map_blur():
    rng = np.random.default_rng(3)
    maps = rng.random((3, 5, 64, 48)).astype(np.float32)
    expected = np.stack([[cv2.GaussianBlur(m, (11, 11), 0) for m in inst] for inst in maps])
    np.testing.assert_array_equal(blur_heatmaps(maps, 11), expected)


def test_decode_matches_reference_on_noisy_maps_with_border_peaks():
    rng = np.random.default_rng(4)
    kpts = _random_keypoints(rng, margin=0.0)
    kpts[0, :2] = (0.0, 0.0)  # peak in a corner
    kpts[1, :2] = (191.0, 120.3)  # peak on the right edge
    maps = np.stack([encode(kpts)[0], encode(_random_keypoints(rng))[0]])
    maps = maps + rng.normal(0.0, 0.02, maps.shape).astype(np.float32)
    coords, scores = decode(maps)
    np.testing.assert_allclose(coords, _reference_decode(maps), atol=1e-3)
    np.testing.assert_array_equal(scores, maps.reshape(2, NUM_KEYPOINTS, -1).max(-1))
    np.testing.assert_allclose(decode(torch.from_numpy(maps))[0], coords)


def test_decode_marks_non_positive_maps():
    maps = np.full((1, NUM_KEYPOINTS, 64, 48), -0.5, dtype=np.float32)
    maps[0, 3, 10, 12] = 1.0
    coords, scores = decode(maps)
    assert scores[0, 0] == pytest.approx(-0.5)
    np.testing.assert_array_equal(coords[0, 0], [-1, -1])
    # A single-pixel peak is symmetric: DARK leaves it on the pixel.
    np.testing.assert_allclose(coords[0, 3], [12, 10], atol=1e-4)
