"""Crop geometry: box -> center/scale, UDP affine, mirror, view sampling and warps."""

import numpy as np

from kdcache.codec import UDPHeatmap, udp_affine
from kdcache.keypoints import COCO_17
from kdcache.transforms import (AugmentConfig, ViewSampler, apply_affine, bbox_to_center_scale, crop_to_image,
                                flip_crop, keypoints_to_crop, mirror_affine, warp_crop)

INPUT_HW = (256, 192)
H, W = INPUT_HW
BBOX = np.array([120.0, 60.0, 90.0, 200.0], dtype=np.float32)
NUM_KEYPOINTS = COCO_17.num_keypoints


def sample_view(bbox, kpts, seed, ann_id, view, aug=AugmentConfig(), input_hw=INPUT_HW):
    """View `view` of an instance through a COCO-17 `ViewSampler` with the UDP codec of `input_hw`."""
    return ViewSampler(aug, UDPHeatmap.for_input(input_hw), COCO_17, seed).geometry(bbox, kpts, ann_id, view)


def _person(rng, labelled=NUM_KEYPOINTS):
    """Keypoints inside BBOX; the first `labelled` joints have v=2, the rest v=0."""
    kpts = np.zeros((NUM_KEYPOINTS, 3), dtype=np.float32)
    kpts[:, 0] = rng.uniform(BBOX[0], BBOX[0] + BBOX[2], NUM_KEYPOINTS)
    kpts[:, 1] = np.sort(rng.uniform(BBOX[1], BBOX[1] + BBOX[3], NUM_KEYPOINTS))
    kpts[:labelled, 2] = 2
    return kpts


def test_bbox_to_center_scale_fixes_aspect_and_pads():
    center, scale = bbox_to_center_scale([10, 20, 30, 80], aspect_wh=0.75, padding=1.25)
    np.testing.assert_allclose(center, [25, 60])
    np.testing.assert_allclose(scale, [60 * 1.25, 80 * 1.25])  # narrow box: width enlarged
    _, scale = bbox_to_center_scale([0, 0, 120, 30])
    np.testing.assert_allclose(scale, [120 * 1.25, 160 * 1.25])  # wide box: height enlarged


def test_udp_affine_maps_region_onto_pixel_grid():
    center, scale = np.array([300.5, 211.25]), np.array([150.0, 200.0])
    a = udp_affine(center, scale, 0.0, INPUT_HW)
    assert a.shape == (2, 3) and a.dtype == np.float64
    pts = center + np.array([[0, 0], [scale[0] / 2, 0], [-scale[0] / 2, -scale[1] / 2], [0, scale[1] / 2]])
    np.testing.assert_allclose(apply_affine(pts, a),
                               [[(W - 1) / 2, (H - 1) / 2], [W - 1, (H - 1) / 2], [0, 0], [(W - 1) / 2, H - 1]],
                               atol=1e-9)
    # mmpose's rotation sign: +90 degrees turns image +x into crop +y.
    a90 = udp_affine(center, scale, 90.0, INPUT_HW)
    np.testing.assert_allclose(apply_affine(center + [scale[1] / 2, 0], a90), [(W - 1) / 2, H - 1], atol=1e-9)


def test_mirror_affine():
    a = udp_affine(np.array([100.0, 80.0]), np.array([60.0, 80.0]), 17.0, INPUT_HW)
    m = mirror_affine(a, INPUT_HW)
    pts = np.random.default_rng(0).uniform(0, 200, (10, 2))
    plain, mirrored = apply_affine(pts, a), apply_affine(pts, m)
    np.testing.assert_allclose(mirrored[:, 0], W - 1 - plain[:, 0], atol=1e-9)
    np.testing.assert_allclose(mirrored[:, 1], plain[:, 1], atol=1e-9)
    np.testing.assert_allclose(mirror_affine(m, INPUT_HW), a, atol=1e-12)


def _flipped_rotated_view(kpts):
    for view in range(1, 100):
        g = sample_view(BBOX, kpts, seed=0, ann_id=5, view=view, input_hw=INPUT_HW)
        if g.flip and abs(g.rot_deg) > 10:
            return g
    raise AssertionError("no flipped, rotated view in 100 draws")


def test_warp_crop_puts_a_dot_where_keypoints_to_crop_says():
    rng = np.random.default_rng(1)
    kpts = _person(rng)
    g = _flipped_rotated_view(kpts)
    yy, xx = np.mgrid[0:400, 0:400]
    dot = (kpts[9, 0], kpts[9, 1])  # left wrist
    blob = 255 * np.exp(-((xx - dot[0]) ** 2 + (yy - dot[1]) ** 2) / (2 * 3.0 ** 2))
    image = np.repeat(blob[..., None], 3, axis=2).astype(np.uint8)
    crop = warp_crop(image, g.affine, INPUT_HW)
    assert crop.shape == (H, W, 3) and crop.dtype == np.uint8
    weight = crop[..., 0].astype(np.float64)
    cy, cx = np.mgrid[0:H, 0:W]
    centroid = np.array([(weight * cx).sum(), (weight * cy).sum()]) / weight.sum()
    crop_kpts = keypoints_to_crop(kpts, g.affine, g.flip, COCO_17.flip_index)
    # The view is mirrored: the physical left wrist is now labelled right wrist (row 10).
    np.testing.assert_allclose(crop_kpts[10, :2], centroid, atol=0.25)  # a half-pixel slip fails


def test_crop_to_image_inverts_keypoints_to_crop():
    rng = np.random.default_rng(2)
    kpts = _person(rng)
    g = _flipped_rotated_view(kpts)
    crop_kpts = keypoints_to_crop(kpts, g.affine, False, COCO_17.flip_index)
    np.testing.assert_allclose(crop_to_image(crop_kpts[:, :2], g.affine), kpts[:, :2], atol=1e-3)
    pts = rng.uniform(0, 200, (3, 4, 2))  # any leading shape
    np.testing.assert_allclose(apply_affine(crop_to_image(pts, g.affine), g.affine), pts, atol=1e-9)


def test_keypoints_to_crop_flip_swaps_left_and_right():
    kpts = np.zeros((NUM_KEYPOINTS, 3), dtype=np.float32)
    kpts[:, :2] = BBOX[:2] + BBOX[2:] / 2
    kpts[9] = (140, 150, 1)  # left wrist: image left
    kpts[10] = (190, 160, 2)  # right wrist: image right
    center, scale = bbox_to_center_scale(BBOX)
    a = udp_affine(center, scale, 0.0, INPUT_HW)
    plain = keypoints_to_crop(kpts, a, False, COCO_17.flip_index)
    flipped = keypoints_to_crop(kpts, mirror_affine(a, INPUT_HW), True, COCO_17.flip_index)
    assert flipped.dtype == np.float32
    assert plain[9, 0] < (W - 1) / 2 < plain[10, 0]
    # The physical left wrist is on the crop's right and is now the right wrist, visibility with it.
    np.testing.assert_allclose(flipped[10], [W - 1 - plain[9, 0], plain[9, 1], 1], atol=1e-4)
    np.testing.assert_allclose(flipped[9], [W - 1 - plain[10, 0], plain[10, 1], 2], atol=1e-4)
    assert flipped[9, 0] < (W - 1) / 2 < flipped[10, 0]


def test_sample_view_is_deterministic_and_view0_is_plain():
    kpts = _person(np.random.default_rng(3))
    a = sample_view(BBOX, kpts, seed=7, ann_id=123456789012, view=3, input_hw=INPUT_HW)
    b = sample_view(BBOX, kpts, seed=7, ann_id=123456789012, view=3, input_hw=INPUT_HW)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert (a.rot_deg, a.flip) == (b.rot_deg, b.flip)
    others = [sample_view(BBOX, kpts, seed=s, ann_id=i, view=v, input_hw=INPUT_HW).affine
              for s, i, v in [(7, 123456789012, 4), (8, 123456789012, 3), (7, 123456789013, 3)]]
    assert all(not np.allclose(o, a.affine) for o in others)
    v0 = sample_view(BBOX, kpts, seed=7, ann_id=123456789012, view=0, input_hw=INPUT_HW)
    center, scale = bbox_to_center_scale(BBOX, 0.75, 1.25)
    assert v0.rot_deg == 0.0 and not v0.flip
    np.testing.assert_array_equal(v0.center, center)
    np.testing.assert_array_equal(v0.scale_wh, scale)
    np.testing.assert_array_equal(v0.affine, udp_affine(center, scale, 0.0, INPUT_HW))


def test_sample_view_distribution_follows_vitpose():
    kpts = _person(np.random.default_rng(4), labelled=8)  # 8 joints: half-body never applies
    center0, scale0 = bbox_to_center_scale(BBOX)
    views = [sample_view(BBOX, kpts, seed=0, ann_id=1, view=v, input_hw=INPUT_HW) for v in range(1, 3001)]
    flips = np.array([g.flip for g in views])
    rots = np.array([g.rot_deg for g in views])
    factors = np.array([g.scale_wh / scale0 for g in views])
    shifts = np.array([g.center - center0 for g in views])
    assert abs(flips.mean() - 0.5) < 0.04
    assert np.abs(rots).max() == 80.0 and abs((rots != 0).mean() - 0.6) < 0.04
    np.testing.assert_allclose(factors[:, 0], factors[:, 1])  # aspect kept
    assert factors.min() == 0.5 and factors.max() == 1.5 and abs(np.median(factors) - 1.0) < 0.05
    shifted = np.abs(shifts).max(axis=1) > 0
    assert abs(shifted.mean() - 0.3) < 0.04
    assert np.all(np.abs(shifts) <= 0.16 * scale0 + 1e-9)


def test_half_body_crops_around_one_half():
    kpts = _person(np.random.default_rng(5))  # 17 labelled joints: half-body applies with p=0.3
    aug = AugmentConfig(half_body_prob=1.0, scale_factor=0.0, rot_prob=0.0, shift_prob=0.0)
    upper, lower = kpts[:11, :2].astype(np.float64), kpts[11:, :2].astype(np.float64)
    centers = {tuple(np.round(sample_view(BBOX, kpts, 0, 1, v, aug, INPUT_HW).center, 6)) for v in range(1, 50)}
    assert centers == {tuple(np.round(upper.mean(0), 6)), tuple(np.round(lower.mean(0), 6))}
    g = next(sample_view(BBOX, kpts, 0, 1, v, aug, INPUT_HW) for v in range(1, 50)
             if np.allclose(sample_view(BBOX, kpts, 0, 1, v, aug, INPUT_HW).center, lower.mean(0)))
    w, h = lower.max(0) - lower.min(0)
    expected = np.array([max(w, 0.75 * h), max(h, w / 0.75)]) * 1.5
    np.testing.assert_allclose(g.scale_wh, expected, rtol=1e-5)
    # Default rates: half-body in 30% of views, the upper body chosen when randn() < 0.5 (69%).
    views = [sample_view(BBOX, kpts, 0, 1, v, AugmentConfig(), INPUT_HW) for v in range(1, 3001)]
    centers = np.array([g.center for g in views])
    is_upper = np.abs(centers - upper.mean(0)).max(axis=1) < 1e-4
    is_lower = np.abs(centers - lower.mean(0)).max(axis=1) < 1e-4
    assert abs((is_upper | is_lower).mean() - 0.3) < 0.04
    assert abs(is_upper.sum() / (is_upper | is_lower).sum() - 0.691) < 0.06


def test_warp_crop_with_mirror_equals_flipped_crop():
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
    a = udp_affine(np.array([150.0, 140.0]), np.array([120.0, 160.0]), 25.0, INPUT_HW)
    mirrored = warp_crop(image, mirror_affine(a, INPUT_HW), INPUT_HW).astype(np.int32)
    flipped = flip_crop(warp_crop(image, a, INPUT_HW)).astype(np.int32)
    # Same geometry; OpenCV's fixed-point sampling may round a rare pixel differently.
    assert np.abs(mirrored - flipped).max() <= 1 and np.abs(mirrored - flipped).mean() < 0.05


def test_half_body_uses_the_sets_halves_and_ignores_joints_in_neither():
    """Whole-body: face and hands are in neither half (mmpose's types), so a crop of the lower body never moves
    towards the face, however many face points are labelled."""
    from kdcache.keypoints import COCO_WHOLEBODY_133 as wb
    from kdcache.transforms import half_body_center_scale

    kpts = np.zeros((wb.num_keypoints, 3), np.float32)
    lower = [i for i in wb.lower_body][:4]
    kpts[lower] = [[40, 150, 2], [60, 150, 2], [40, 200, 2], [60, 200, 2]]
    face = list(wb.part("face"))
    kpts[face, :2], kpts[face, 2] = (50, 20), 2
    assert not set(face) & (set(wb.upper_body) | set(wb.lower_body))
    center, _ = half_body_center_scale(kpts, (wb.upper_body, wb.lower_body), upper_first=True, aspect_wh=0.75)
    assert np.allclose(center, (50, 175))  # the upper half has no labelled joint: the lower one, face ignored
