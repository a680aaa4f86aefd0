"""The keypoint codec: UDP encode, DARK-UDP decode, flips and the heatmap -> crop mapping."""

import cv2
import numpy as np
import pytest
import torch

from kdcache.codec import UDPHeatmap, blur_heatmaps, codec_from_record, dark_udp
from kdcache.keypoints import COCO_17

INPUT_HW = (256, 192)
HEATMAP_HW = (64, 48)
CODEC = UDPHeatmap(INPUT_HW, HEATMAP_HW, sigma=2.0)
NUM_KEYPOINTS = COCO_17.num_keypoints
FLIP_INDEX = COCO_17.flip_index
encode = CODEC.encode


def flip_heatmaps(maps):
    return CODEC.flip(maps, COCO_17)


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
    maps = np.stack([encode(k)[0] for k in kpts])
    coords, scores = dark_udp(maps)
    expected = kpts[..., :2] * np.array([47 / 191, 63 / 255])  # UDP: (w-1)/(W-1), not w/W
    assert coords.shape == (8, 17, 2) and coords.dtype == np.float32
    assert np.abs(coords - expected).max() < 0.05
    assert np.all(scores > np.exp(-1 / 8)) and np.all(scores <= 1.0)
    # Back to crop pixels with the (size-1) strides.
    assert np.abs(CODEC.heatmap_to_crop(coords) - kpts[..., :2]).max() < 0.05 * 4.1


def test_encode_values_and_weights():
    kpts = np.zeros((NUM_KEYPOINTS, 3), dtype=np.float32)
    stride_x, stride_y = 191 / 47, 255 / 63  # UDP strides
    kpts[0] = (20.3 * stride_x, 30.6 * stride_y, 2)  # mu = (20.3, 30.6) in heatmap pixels
    kpts[1] = (100, 100, 0)  # not labelled
    kpts[2] = (-100, 100, 2)  # far left of the crop
    kpts[3] = (100, 400, 1)  # far below the crop
    kpts[4] = (-2, 100, 1)  # just outside: part of its Gaussian window is inside
    maps, weight = encode(kpts)
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
    maps, _ = encode(kpts)
    maps_mirrored, _ = encode(mirrored)
    # Exact under UDP (no half-pixel shift), up to float rounding.
    np.testing.assert_allclose(flip_heatmaps(maps), maps_mirrored, atol=1e-6)
    np.testing.assert_allclose(flip_heatmaps(torch.from_numpy(maps)).numpy(), maps_mirrored, atol=1e-6)


def test_heatmap_to_crop_corners():
    pts = np.array([[0.0, 0.0], [47.0, 63.0], [23.5, 31.5]])
    np.testing.assert_allclose(CODEC.heatmap_to_crop(pts),
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
    coords, scores = dark_udp(maps)
    np.testing.assert_allclose(coords, _reference_decode(maps), atol=1e-3)
    np.testing.assert_array_equal(scores, maps.reshape(2, NUM_KEYPOINTS, -1).max(-1))
    np.testing.assert_allclose(dark_udp(torch.from_numpy(maps))[0], coords)


def test_decode_marks_non_positive_maps():
    maps = np.full((1, NUM_KEYPOINTS, 64, 48), -0.5, dtype=np.float32)
    maps[0, 3, 10, 12] = 1.0
    coords, scores = dark_udp(maps)
    assert scores[0, 0] == pytest.approx(-0.5)
    np.testing.assert_array_equal(coords[0, 0], [-1, -1])
    # A single-pixel peak is symmetric: DARK leaves it on the pixel.
    np.testing.assert_allclose(coords[0, 3], [12, 10], atol=1e-4)


def test_codec_decodes_its_own_targets_back_to_crop_pixels():
    """encode -> decode through the codec object is the identity on crop pixels, at any input size (joints
    7 heatmap pixels or more from the border, where the blurred maps are not cut)."""
    rng = np.random.default_rng(5)
    for input_hw in ((256, 192), (128, 96), (384, 288)):
        codec = UDPHeatmap.for_input(input_hw)
        assert codec.heatmap_hw == (input_hw[0] // 4, input_hw[1] // 4) and codec.sigma == 2.0
        kpts = np.stack([rng.uniform(28, input_hw[1] - 29, 17), rng.uniform(28, input_hw[0] - 29, 17),
                         np.full(17, 2.0)], axis=1).astype(np.float32)
        xy, scores = codec.decode(codec.encode(kpts)[0][None])
        assert xy.shape == (1, 17, 2) and np.abs(xy[0] - kpts[:, :2]).max() < 0.25
        assert np.all(scores > 0.8)


def test_codec_record_round_trip_and_unknown_codec():
    codec = UDPHeatmap((128, 96), (32, 24), sigma=3.0)
    record = codec.to_record()
    assert record == {"name": "udp-heatmap", "input_hw": [128, 96], "heatmap_hw": [32, 24], "sigma": 3.0}
    assert codec_from_record(record) == codec
    from kdcache.errors import UserError
    with pytest.raises(UserError, match="codec 'classic-dark'"):
        codec_from_record({**record, "name": "classic-dark"})


def test_crop_affine_maps_the_box_region_onto_the_udp_grid():
    """The region's corners land on pixel centres 0 and W-1 / H-1 (UDP), its centre on the crop's."""
    codec = UDPHeatmap.for_input((256, 192))
    center, scale_wh = np.array([100.0, 80.0]), np.array([90.0, 120.0])
    affine = codec.crop_affine(center, scale_wh, 0.0)
    corners = np.array([[55.0, 20.0], [145.0, 140.0], [100.0, 80.0]])
    mapped = corners @ affine[:, :2].T + affine[:, 2]
    np.testing.assert_allclose(mapped, [[0, 0], [191, 255], [95.5, 127.5]], atol=1e-9)
