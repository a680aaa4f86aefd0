"""Student augmentation: photometric changes keep geometry, jitter moves crop, heatmaps and keypoints as one."""

import numpy as np
import pytest

from kdcache.augment import StudentAugConfig, jitter, occlude, photometric
from kdcache.codec import UDPHeatmap
from kdcache.heatmap_decode import dark_udp

INPUT_HW, HEATMAP_HW = (128, 96), (32, 24)
CODEC = UDPHeatmap(INPUT_HW, HEATMAP_HW, sigma=2.0)


def _crop(seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(*INPUT_HW, 3), dtype=np.uint8)


def test_photometric_off_is_identity_and_each_change_changes_pixels_only():
    crop = _crop()
    assert photometric(crop, np.random.default_rng(0), StudentAugConfig()) is crop
    for field in ("color_prob", "blur_prob", "noise_prob", "gray_prob", "occlusion_prob"):
        out = photometric(crop, np.random.default_rng(1), StudentAugConfig(**{field: 1.0}))
        assert out.shape == crop.shape and out.dtype == np.uint8, field
        assert np.abs(out.astype(int) - crop).mean() > 1.0, field
    gray = photometric(crop, np.random.default_rng(1), StudentAugConfig(gray_prob=1.0))
    assert np.abs(gray[..., 0].astype(int) - gray[..., 2]).max() <= 1
    # The same generator state gives the same result (views are reproducible).
    cfg = StudentAugConfig(color_prob=0.5, noise_prob=0.5, occlusion_prob=0.5)
    np.testing.assert_array_equal(photometric(crop, np.random.default_rng(7), cfg),
                                  photometric(crop, np.random.default_rng(7), cfg))


def test_occlusion_covers_a_tenth_to_most_of_the_crop():
    crop = np.zeros((*INPUT_HW, 3), np.float32)
    covered = [(occlude(crop, np.random.default_rng(s)).max(axis=2) > 0).mean() for s in range(20)]
    assert 0.009 < min(covered) and max(covered) < 0.5


@pytest.mark.parametrize("seed", range(5))
def test_jitter_keeps_keypoints_on_their_heatmap_peaks(seed):
    rng = np.random.default_rng(100 + seed)
    keypoints = np.zeros((17, 3), np.float32)
    keypoints[:, 0] = rng.uniform(30, 66, 17)
    keypoints[:, 1] = rng.uniform(40, 88, 17)
    keypoints[:, 2] = 2
    heat, _ = CODEC.encode(keypoints)
    cfg = StudentAugConfig(jitter_prob=1.0, jitter_rot=15, jitter_scale=0.15, jitter_shift=0.05)
    crop, warped, moved = jitter(_crop(seed), heat, keypoints, np.random.default_rng(seed), cfg, CODEC)
    assert crop.shape == (*INPUT_HW, 3) and warped.shape == heat.shape
    assert np.abs(moved[:, :2] - keypoints[:, :2]).max() > 1.0  # it did move
    decoded, _ = dark_udp(warped[None])
    stride = np.array([(INPUT_HW[1] - 1) / (HEATMAP_HW[1] - 1), (INPUT_HW[0] - 1) / (HEATMAP_HW[0] - 1)])
    err = np.linalg.norm(decoded[0] * stride - moved[:, :2], axis=1)  # crop pixels
    assert err.max() < 0.5


def test_jitter_drops_joints_pushed_outside():
    keypoints = np.array([[1.0, 1.0, 2.0]] * 17, np.float32)
    heat = np.zeros((17, *HEATMAP_HW), np.float32)
    cfg = StudentAugConfig(jitter_prob=1.0, jitter_rot=0, jitter_scale=0, jitter_shift=0.05)
    for seed in range(10):
        _, _, moved = jitter(_crop(), heat, keypoints, np.random.default_rng(seed), cfg, CODEC)
        inside = (moved[:, 0] >= 0) & (moved[:, 1] >= 0)
        assert ((moved[:, 2] > 0) == inside).all()
