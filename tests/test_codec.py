"""The keypoint codecs (UDP for ViTPose, TokenPose's): crop affine, encode, decode, flips, the heatmap -> crop
mapping and the cache record, against references written from the teachers' code."""

import cv2
import numpy as np
import pytest
import torch

from kdcache.codec import TokenPoseHeatmap, UDPHeatmap, codec_from_record, udp_affine
from kdcache.errors import UserError
from kdcache.heatmap_decode import dark_udp
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
    affine = CODEC.heatmap_affine
    np.testing.assert_allclose(pts @ affine[:, :2].T + affine[:, 2], CODEC.heatmap_to_crop(pts), atol=1e-12)


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
    with pytest.raises(UserError, match="codec 'classic-dark'") as raised:
        codec_from_record({**record, "name": "classic-dark"})
    message = str(raised.value)
    assert "\n" not in message and "udp-heatmap, tokenpose-heatmap" in message


def test_crop_affine_maps_the_box_region_onto_the_udp_grid():
    """The region's corners land on pixel centres 0 and W-1 / H-1 (UDP), its centre on the crop's."""
    codec = UDPHeatmap.for_input((256, 192))
    center, scale_wh = np.array([100.0, 80.0]), np.array([90.0, 120.0])
    affine = codec.crop_affine(center, scale_wh, 0.0)
    corners = np.array([[55.0, 20.0], [145.0, 140.0], [100.0, 80.0]])
    mapped = corners @ affine[:, :2].T + affine[:, 2]
    np.testing.assert_allclose(mapped, [[0, 0], [191, 255], [95.5, 127.5]], atol=1e-9)


# TokenPose's codec. References are written from TokenPose's lib/utils/transforms.py (get_affine_transform),
# lib/dataset/JointsDataset.py (generate_target, adjust_target_weight) and lib/core/function.py (flip test).

TP_CODEC = TokenPoseHeatmap(INPUT_HW, HEATMAP_HW, sigma=2.0)


def _three_point_affine(center, src_w, rot_deg, out_wh):
    """TokenPose's get_affine_transform: three float32 points, cv2.getAffineTransform."""
    def rotate(point, rad):
        sn, cs = np.sin(rad), np.cos(rad)
        return np.array([point[0] * cs - point[1] * sn, point[0] * sn + point[1] * cs])

    def third(a, b):
        d = a - b
        return b + np.array([-d[1], d[0]])

    dst_w, dst_h = out_wh
    src = np.zeros((3, 2), np.float32)
    dst = np.zeros((3, 2), np.float32)
    src[0] = center
    src[1] = center + rotate([0, (src_w - 1) * -0.5], np.pi * rot_deg / 180)
    dst[0] = [(dst_w - 1) * 0.5, (dst_h - 1) * 0.5]
    dst[1] = dst[0] + np.array([0, (dst_w - 1) * -0.5])
    src[2] = third(src[0], src[1])
    dst[2] = third(dst[0], dst[1])
    return cv2.getAffineTransform(src, dst)


def _apply(affine, pts):
    return pts @ affine[:, :2].T + affine[:, 2]


def _random_region(rng):
    center = rng.uniform(100, 500, 2)
    width = rng.uniform(40, 300)
    return center, np.array([width, width / 0.75])


@pytest.mark.parametrize("rot_deg", [0.0, 25.0, -140.0])
def test_tokenpose_crop_affine_is_the_three_point_construction(rot_deg):
    rng = np.random.default_rng(10)
    for _ in range(5):
        center, scale_wh = _random_region(rng)
        affine = TP_CODEC.crop_affine(center, scale_wh, rot_deg)
        assert affine.shape == (2, 3) and affine.dtype == np.float64
        reference = _three_point_affine(center, scale_wh[0], rot_deg, (192, 256))
        pts = center + rng.uniform(-1, 1, (20, 2)) * scale_wh
        np.testing.assert_allclose(_apply(affine, pts), _apply(reference, pts), atol=2e-3)  # float32 points


def test_tokenpose_rotation_turns_the_other_way_from_udp():
    center, scale_wh = np.array([300.0, 200.0]), np.array([120.0, 160.0])
    right = center + [10.0, 0.0]
    tp = _apply(TP_CODEC.crop_affine(center, scale_wh, 30.0), right[None])[0] - (95.5, 127.5)
    udp = _apply(udp_affine(center, scale_wh, 30.0, INPUT_HW), right[None])[0] - (95.5, 127.5)
    assert tp[0] > 0 and tp[1] < 0  # image +x turns towards crop -y
    assert udp[0] > 0 and udp[1] > 0
    # Both axes take the width's scale, (W-1)/(src_w-1); the region's height is not used.
    assert np.allclose(np.linalg.svd(TP_CODEC.crop_affine(center, scale_wh, 30.0)[:, :2])[1], 191 / 119)


def test_tokenpose_heatmap_grid_is_the_affine_at_heatmap_size():
    """transform_preds (the inverse affine at heatmap size) followed by the crop affine is `heatmap_to_crop`."""
    rng = np.random.default_rng(11)
    for rot_deg in (0.0, 30.0):
        center, scale_wh = _random_region(rng)
        to_heatmap = _three_point_affine(center, scale_wh[0], rot_deg, (48, 64))
        pts = center + rng.uniform(-0.5, 0.5, (20, 2)) * scale_wh
        np.testing.assert_allclose(TP_CODEC.heatmap_to_crop(_apply(to_heatmap, pts)),
                                   _apply(TP_CODEC.crop_affine(center, scale_wh, rot_deg), pts), atol=2e-3)
    # x: heatmap * (W-1)/(w-1); y: the same stride, and row 0 lies half a crop pixel above the crop.
    stride = 191 / 47
    assert TP_CODEC.stride == (stride, stride)
    corners = TP_CODEC.heatmap_to_crop(np.array([[0.0, 0.0], [47.0, 63.0], [23.5, 31.5]]))
    offset_y = 127.5 - stride * 31.5
    np.testing.assert_allclose(corners, [[0, offset_y], [191, 63 * stride + offset_y], [95.5, 127.5]], atol=1e-12)
    assert offset_y == pytest.approx(-0.5106, abs=1e-4)
    pts = rng.uniform(0, 60, (5, 2))
    np.testing.assert_allclose(_apply(TP_CODEC.heatmap_affine, pts), TP_CODEC.heatmap_to_crop(pts), atol=1e-12)


def _generate_target_reference(joints_heatmap, vis, heatmap_wh, sigma):
    """Per joint, as JointsDataset.generate_target under numpy 1.x (float32 grid, mu cast to float32)."""
    w, h = heatmap_wh
    target = np.zeros((len(joints_heatmap), h, w), np.float32)
    weight = np.minimum(vis, 1).astype(np.float32)
    for j, (mu_x, mu_y) in enumerate(joints_heatmap):
        ul = [int(mu_x - 3 * sigma), int(mu_y - 3 * sigma)]
        br = [int(mu_x + 3 * sigma + 1), int(mu_y + 3 * sigma + 1)]
        if ul[0] >= w or ul[1] >= h or br[0] < 0 or br[1] < 0:
            weight[j] = 0
        if weight[j] > 0.5:
            x = np.arange(0, w, 1, np.float32)
            y = np.arange(0, h, 1, np.float32)[:, None]
            target[j] = np.exp(-((x - np.float32(mu_x)) ** 2 + (y - np.float32(mu_y)) ** 2) / (2 * sigma ** 2))
    return target, weight


def test_tokenpose_encode_matches_generate_target():
    """Image keypoints -> crop (codec) -> targets equal TokenPose's image -> heatmap affine -> generate_target."""
    rng = np.random.default_rng(12)
    for sigma, input_hw in ((2.0, (256, 192)), (3.0, (384, 288))):
        codec = TokenPoseHeatmap.for_input(input_hw, sigma)
        h, w = codec.heatmap_hw
        center, scale_wh = _random_region(rng)
        image_kpts = center + rng.uniform(-0.9, 0.9, (NUM_KEYPOINTS, 2)) * scale_wh  # some outside the crop
        vis = rng.integers(0, 3, NUM_KEYPOINTS)
        crop_kpts = np.concatenate([_apply(codec.crop_affine(center, scale_wh, 20.0), image_kpts),
                                    vis[:, None]], axis=1)
        maps, weight = codec.encode(crop_kpts)
        assert maps.shape == (NUM_KEYPOINTS, h, w) and maps.dtype == np.float32 and weight.dtype == np.float32
        joints_heatmap = _apply(_three_point_affine(center, scale_wh[0], 20.0, (w, h)), image_kpts)
        ref_maps, ref_weight = _generate_target_reference(joints_heatmap, vis, (w, h), sigma)
        np.testing.assert_array_equal(weight, ref_weight)
        assert 0 < weight.sum() < (vis > 0).sum()  # the random draw has joints both kept and dropped
        np.testing.assert_allclose(maps, ref_maps, atol=2e-5)  # mu differs by the reference's float32 points


def test_tokenpose_weights_truncate_toward_zero_and_maps_cover_the_whole_heatmap():
    stride, offset_y = 191 / 47, 127.5 - 191 / 47 * 31.5
    mu = np.array([[-7.8, 30], [-8.2, 30], [53.8, 30], [54.2, 30],  # x: br = int(mu + 7), ul = int(mu - 6)
                   [20, -7.8], [20, -8.2], [20, 69.8], [20, 70.2],  # y, through the grid's offset
                   [20.3, 30.6], [10, 10]])
    kpts = np.stack([mu[:, 0] * stride, mu[:, 1] * stride + offset_y, np.full(len(mu), 2.0)], axis=1)
    kpts[9, 2] = 0
    maps, weight = TP_CODEC.encode(kpts)
    # int(-0.8) = 0 is not < 0, so -7.8 is kept where floor would drop it; int(47.8) = 47 < 48 is kept.
    np.testing.assert_array_equal(weight, [1, 0, 1, 0, 1, 0, 1, 0, 1, 0])
    assert not maps[weight == 0].any() and maps[0, 30, 0] > 0 and maps[6, 63, 20] > 0
    # Sub-pixel mu, no 3-sigma window: 12 pixels from the peak is still exp(-d^2 / 8).
    np.testing.assert_allclose(maps[8, 31, 20], np.exp(-(0.3 ** 2 + 0.4 ** 2) / 8), rtol=1e-6)
    np.testing.assert_allclose(maps[8, 31, 32], np.exp(-(11.7 ** 2 + 0.4 ** 2) / 8), rtol=1e-5)
    assert maps[8, 31, 32] > 0


def test_tokenpose_flip_of_targets_equals_targets_of_the_mirrored_crop():
    rng = np.random.default_rng(13)
    kpts = _random_keypoints(rng, margin=2.0)
    mirrored = kpts.copy()
    mirrored[:, 0] = INPUT_HW[1] - 1 - kpts[:, 0]  # what flipping the crop's width does to a keypoint
    mirrored = mirrored[list(FLIP_INDEX)]
    maps, weight = TP_CODEC.encode(kpts)
    maps_mirrored, weight_mirrored = TP_CODEC.encode(mirrored)
    np.testing.assert_array_equal(weight[list(FLIP_INDEX)], weight_mirrored)
    flipped = TP_CODEC.flip(maps, COCO_17)
    np.testing.assert_allclose(flipped, maps_mirrored, atol=1e-6)  # no one-pixel shift
    np.testing.assert_allclose(TP_CODEC.flip(torch.from_numpy(maps), COCO_17).numpy(), maps_mirrored, atol=1e-6)
    np.testing.assert_array_equal(TP_CODEC.flip(flipped, COCO_17), maps)
    np.testing.assert_array_equal(flipped[5], maps[6, :, ::-1])  # left shoulder <- right shoulder, mirrored


@pytest.mark.parametrize("input_hw, sigma", [((256, 192), 2.0), ((384, 288), 3.0), ((128, 96), 2.0)])
def test_tokenpose_decodes_its_own_targets_back_to_crop_pixels(input_hw, sigma):
    """encode -> decode recovers sub-pixel keypoints, joints 7 heatmap pixels or more from the border."""
    codec = TokenPoseHeatmap.for_input(input_hw, sigma)
    assert codec.heatmap_hw == (input_hw[0] // 4, input_hw[1] // 4)
    rng = np.random.default_rng(14)
    kpts = np.stack([rng.uniform(28, input_hw[1] - 29, (4, 17)), rng.uniform(28, input_hw[0] - 29, (4, 17)),
                     np.full((4, 17), 2.0)], axis=-1)
    xy, scores = codec.decode(np.stack([codec.encode(k)[0] for k in kpts]))
    assert xy.shape == (4, 17, 2) and xy.dtype == np.float64 and scores.dtype == np.float32
    stride = codec.stride[0]
    assert np.abs(xy - kpts[..., :2]).max() < 0.05 * stride  # 0.05 heatmap pixels
    assert np.all(scores > np.exp(-1 / (4 * sigma ** 2)))


def test_tokenpose_record_round_trip():
    codec = TokenPoseHeatmap((384, 288), (96, 72), sigma=3.0)
    record = codec.to_record()
    assert record == {"name": "tokenpose-heatmap", "input_hw": [384, 288], "heatmap_hw": [96, 72], "sigma": 3.0}
    rebuilt = codec_from_record(record)
    assert type(rebuilt) is TokenPoseHeatmap and rebuilt == codec
    udp = codec_from_record({**record, "name": "udp-heatmap"})
    assert type(udp) is UDPHeatmap and udp != codec
