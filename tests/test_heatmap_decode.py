"""Heatmap decoding numerics: argmax, the two blurs, DARK-UDP (ViTPose) and TokenPose's DARK, against slow
per-map references written from the papers' code paths."""

import cv2
import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from kdcache.heatmap_decode import blur_heatmaps, blur_zero_border, dark_tokenpose, dark_udp, get_max_preds

HEATMAP_HW = (64, 48)
NUM_KEYPOINTS = 17


def _gaussians(mu_xy, sigma=2.0, hw=HEATMAP_HW):
    """float32 [K, h, w] unnormalised Gaussians at sub-pixel centres mu_xy [K, 2] (heatmap pixels)."""
    ys, xs = np.mgrid[0:hw[0], 0:hw[1]]
    d2 = (xs[None] - mu_xy[:, 0, None, None]) ** 2 + (ys[None] - mu_xy[:, 1, None, None]) ** 2
    return np.exp(-d2 / (2 * sigma ** 2)).astype(np.float32)


def _random_mu(rng, n=NUM_KEYPOINTS, margin=6.0, hw=HEATMAP_HW):
    return np.stack([rng.uniform(margin, hw[1] - 1 - margin, n), rng.uniform(margin, hw[0] - 1 - margin, n)], 1)


def _noisy_maps_with_border_peaks(rng):
    """[2, K, h, w]: Gaussians plus noise, peaks on and next to every border, one negative and one zero map."""
    mu = _random_mu(rng, margin=0.0)
    mu[:8] = [(0, 30), (1, 30.2), (2, 30.4), (45, 20.3), (46, 20), (47, 10), (20.3, 1), (20, 62)]
    maps = np.stack([_gaussians(mu), _gaussians(_random_mu(rng))])
    maps += rng.normal(0.0, 0.02, maps.shape).astype(np.float32)
    maps[1, 3] = -np.abs(maps[1, 3]) - 0.1
    maps[1, 4] = 0.0
    return maps


def test_get_max_preds_gives_argmax_and_marks_non_positive_maps():
    maps = np.zeros((1, 3, 4, 5), np.float32)
    maps[0, 0, 2, 3] = 0.75
    maps[0, 1] = -1.0
    maps[0, 1, 1, 1] = -0.5
    coords, scores = get_max_preds(maps)
    np.testing.assert_array_equal(coords[0], [[3, 2], [-1, -1], [-1, -1]])
    np.testing.assert_array_equal(scores[0], [0.75, -0.5, 0.0])


def test_blur_heatmaps_equals_per_map_blur():
    rng = np.random.default_rng(3)
    maps = rng.random((3, 5, 64, 48)).astype(np.float32)
    expected = np.stack([[cv2.GaussianBlur(m, (11, 11), 0) for m in inst] for inst in maps])
    np.testing.assert_array_equal(blur_heatmaps(maps, 11), expected)


def _zero_border_blur_reference(m, kernel=11):
    """TokenPose's gaussian_blur written as a 2-D convolution with zeros outside the map, rescaled to its max."""
    taps = cv2.getGaussianKernel(kernel, 0)[:, 0]
    padded = np.pad(m.astype(np.float64), (kernel - 1) // 2)
    blurred = np.einsum("yxij,i,j->yx", sliding_window_view(padded, (kernel, kernel)), taps, taps)
    blurred = blurred.astype(np.float32)
    return blurred * (m.max() / blurred.max())


def test_blur_zero_border_is_a_zero_padded_convolution_rescaled_to_the_max():
    rng = np.random.default_rng(6)
    maps = rng.random((2, 3, 64, 48)).astype(np.float32)
    maps[0, 0] = _gaussians(np.array([[0.0, 0.0]]))[0]  # peak in a corner: reflect-101 would differ
    out = blur_zero_border(maps)
    assert out.shape == maps.shape and out.dtype == np.float32
    expected = np.stack([[_zero_border_blur_reference(m) for m in inst] for inst in maps])
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out.max(axis=(2, 3)), maps.max(axis=(2, 3)), rtol=1e-6)
    # Zeros outside, not cv2's reflected border: a corner peak blurs flatter against the zeros.
    reflected = blur_heatmaps(maps[0, 0])
    assert out[0, 0, 0, 0] < 0.9 * reflected[0, 0] / reflected.max()


def _tokenpose_reference(maps, kernel=11):
    """Per map, from TokenPose's get_final_preds: argmax (0 where max <= 0), blur, floor 1e-10, log, Taylor."""
    n, k, h, w = maps.shape
    coords = np.zeros((n, k, 2))
    for i in range(n):
        for j in range(k):
            m = maps[i, j]
            y, x = np.unravel_index(np.argmax(m), m.shape)
            if not m.max() > 0:
                x = y = 0
            coords[i, j] = x, y
            if not (1 < x < w - 2 and 1 < y < h - 2):
                continue
            lg = np.log(np.maximum(_zero_border_blur_reference(m, kernel), 1e-10)).astype(np.float64)
            p = lambda dx, dy: lg[y + dy, x + dx]  # noqa: E731
            grad = np.array([0.5 * (p(1, 0) - p(-1, 0)), 0.5 * (p(0, 1) - p(0, -1))])
            dxy = 0.25 * (p(1, 1) - p(1, -1) - p(-1, 1) + p(-1, -1))
            hess = np.array([[0.25 * (p(2, 0) - 2 * p(0, 0) + p(-2, 0)), dxy],
                             [dxy, 0.25 * (p(0, 2) - 2 * p(0, 0) + p(0, -2))]])
            if np.linalg.det(hess) != 0:
                coords[i, j] -= np.linalg.inv(hess) @ grad
    return coords


def test_dark_tokenpose_matches_per_map_reference_on_noisy_maps_with_border_peaks():
    rng = np.random.default_rng(7)
    maps = _noisy_maps_with_border_peaks(rng)
    coords, scores = dark_tokenpose(maps)
    assert coords.shape == (2, NUM_KEYPOINTS, 2) and coords.dtype == np.float32 and scores.dtype == np.float32
    np.testing.assert_allclose(coords, _tokenpose_reference(maps), atol=1e-4)
    np.testing.assert_array_equal(scores, maps.reshape(2, NUM_KEYPOINTS, -1).max(-1))  # unblurred maxima
    np.testing.assert_array_equal(dark_tokenpose(torch.from_numpy(maps))[0], coords)


def test_dark_tokenpose_steps_only_two_pixels_inside_and_zeroes_non_positive_maps():
    maps = _noisy_maps_with_border_peaks(np.random.default_rng(8))
    coords, _ = dark_tokenpose(maps)
    argmax, _ = get_max_preds(maps)
    # Peaks at x = 0, 1, w-2, w-1 or y = 1, h-2 keep their integer argmax; x = 2 is refined.
    np.testing.assert_array_equal(coords[0, [0, 1, 4, 5, 6, 7]], argmax[0, [0, 1, 4, 5, 6, 7]])
    assert np.abs(coords[0, 2] - argmax[0, 2]).max() > 0.05
    # TokenPose multiplies the argmax of a map without a positive value by 0: (0, 0), where mmpose says -1.
    np.testing.assert_array_equal(coords[1, 3:5], [[0, 0], [0, 0]])


def test_dark_tokenpose_recovers_sub_pixel_centres():
    mu = _random_mu(np.random.default_rng(9), margin=8.0)
    coords, scores = dark_tokenpose(_gaussians(mu)[None])
    assert np.abs(coords[0] - mu).max() < 0.02
    assert np.all(scores > np.exp(-1 / 8))


def _dark_udp_reference(maps, kernel=11):
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


def test_dark_udp_matches_reference_on_noisy_maps_with_border_peaks():
    maps = _noisy_maps_with_border_peaks(np.random.default_rng(4))
    positive = maps.max(axis=(2, 3)) > 0
    coords, scores = dark_udp(maps)
    np.testing.assert_allclose(coords[positive], _dark_udp_reference(maps)[positive], atol=1e-3)
    np.testing.assert_array_equal(scores, maps.reshape(2, NUM_KEYPOINTS, -1).max(-1))
    np.testing.assert_allclose(dark_udp(torch.from_numpy(maps))[0], coords)


def test_dark_udp_marks_non_positive_maps():
    maps = np.full((1, NUM_KEYPOINTS, 64, 48), -0.5, dtype=np.float32)
    maps[0, 3, 10, 12] = 1.0
    coords, scores = dark_udp(maps)
    assert scores[0, 0] == pytest.approx(-0.5)
    np.testing.assert_array_equal(coords[0, 0], [-1, -1])
    # A single-pixel peak is symmetric: DARK leaves it on the pixel.
    np.testing.assert_allclose(coords[0, 3], [12, 10], atol=1e-4)


def test_decoders_reject_maps_that_are_not_four_dimensional():
    for decode in (dark_udp, dark_tokenpose):
        with pytest.raises(ValueError, match=r"\[N, K, h, w\]"):
            decode(np.zeros((17, 64, 48), np.float32))
