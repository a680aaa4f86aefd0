"""Contact sheets: the tile grid, heat where the peaks are, left and right drawn apart."""

import cv2
import numpy as np
import pytest

from kdcache.codec import UDPHeatmap
from kdcache.keypoints import COCO_17
from kdcache.viz import CENTER_RGB, GT_RGB, LEFT_RGB, PRED_RGB, RIGHT_RGB, contact_sheet, draw_pose, draw_predictions

INPUT_HW, HEATMAP_HW = (64, 48), (16, 12)
CODEC = UDPHeatmap(INPUT_HW, HEATMAP_HW, sigma=1.0)
KEYPOINT_NAMES = COCO_17.names
GREY = 128


def _gaussians(points_xy, k=17):
    """Heatmaps [k, 16, 12] with UDP Gaussians at crop pixels `points_xy` (first joints), others empty."""
    kpts = np.zeros((k, 3), np.float32)
    kpts[: len(points_xy), :2] = points_xy
    kpts[: len(points_xy), 2] = 2
    return CODEC.encode(kpts)[0]


@pytest.mark.parametrize("n, cols, grid", [(5, 3, (2, 3)), (2, 8, (1, 2)), (4, 4, (1, 4))])
def test_sheet_size_is_rows_by_cols_tiles(tmp_path, n, cols, grid):
    crops = np.full((n, *INPUT_HW, 3), GREY, np.uint8)
    heatmaps = np.stack([_gaussians([(20.0, 30.0)])] * n)
    path = contact_sheet(crops, heatmaps, tmp_path / "sub" / "sheet.png", CODEC, COCO_17, cols=cols,
                         titles=[f"#{i}" for i in range(n)])
    image = cv2.imread(str(path))
    assert image.shape == (grid[0] * INPUT_HW[0], grid[1] * INPUT_HW[1], 3)


def test_tile_shows_heat_at_the_peak_and_the_crop_elsewhere(tmp_path):
    crops = np.full((2, *INPUT_HW, 3), GREY, np.uint8)
    peak_xy = (30.0, 12.0)  # crop pixels, top right of the 48x64 tile
    heatmaps = np.stack([_gaussians([peak_xy]), np.zeros((17, *HEATMAP_HW), np.float32)])
    sheet = contact_sheet(crops, heatmaps, tmp_path / "s.png", CODEC, COCO_17, cols=2)
    sheet = cv2.cvtColor(cv2.imread(str(sheet)), cv2.COLOR_BGR2RGB)
    tile, empty = sheet[:, :48].astype(int), sheet[:, 48:].astype(int)
    x, y = int(peak_xy[0]), int(peak_xy[1])
    ring = tile[y - 3:y + 4, x - 3:x + 4].reshape(-1, 3)
    assert np.abs(ring - GREY).max() > 60  # overlay or skeleton colour, not the grey crop
    assert (tile[50:, :10] == GREY).all()  # far from the peak: the crop untouched
    assert (empty == GREY).all()  # no heat, no keypoint above threshold: nothing drawn


def test_draw_pose_colours_left_and_right_apart():
    image = np.zeros((200, 200, 3), np.uint8)  # lines 2 px wide: their centre pixels carry the full colour
    xy = np.full((17, 2), 100.0)
    ls, le, rs, re = (KEYPOINT_NAMES.index(n) for n in ("left_shoulder", "left_elbow", "right_shoulder", "right_elbow"))
    xy[ls], xy[le] = (140, 40), (140, 160)  # vertical left upper arm at x=140 (the person faces us)
    xy[rs], xy[re] = (60, 40), (60, 160)  # vertical right upper arm at x=60
    scores = np.zeros(17)
    scores[[ls, le, rs, re]] = 1.0
    out = draw_pose(image, xy, scores, COCO_17)
    assert tuple(out[100, 140]) == LEFT_RGB and tuple(out[100, 60]) == RIGHT_RGB
    assert tuple(out[40, 100]) == CENTER_RGB  # the shoulder bar joins both sides
    assert (image == 0).all()  # drew on a copy
    scores[le] = 0.1  # below threshold: the left arm disappears
    assert tuple(draw_pose(image, xy, scores, COCO_17)[100, 140]) == (0, 0, 0)


def test_skeleton_lands_on_the_decoded_peak(tmp_path):
    """Heatmap -> crop mapping is UDP: a peak at crop (x, y) is drawn at (x, y), not shifted by a stride."""
    input_hw, heatmap_hw = (128, 96), (32, 24)  # the real 4x ratio and sigma, where DARK decoding is exact
    kpts = np.zeros((17, 3), np.float32)
    kpts[0] = (80.0, 100.0, 2)  # far from the origin, where a plain stride-4 mapping is ~2.5 px off
    codec = UDPHeatmap(input_hw, heatmap_hw, sigma=2.0)
    heatmaps = codec.encode(kpts)[0]
    sheet = contact_sheet(np.zeros((1, *input_hw, 3), np.uint8), heatmaps[None], tmp_path / "p.png", codec, COCO_17)
    image = cv2.cvtColor(cv2.imread(str(sheet)), cv2.COLOR_BGR2RGB)
    assert tuple(image[100, 80]) == CENTER_RGB  # joint 0 (nose) is a centre joint; its dot has radius 2 px
    assert tuple(image[100, 77]) != CENTER_RGB


def test_predictions_over_ground_truth_in_two_colours_with_scores():
    image = np.full((240, 320, 3), GREY, np.uint8)
    ls, le = KEYPOINT_NAMES.index("left_shoulder"), KEYPOINT_NAMES.index("left_elbow")
    gt = np.zeros((1, 17, 3), np.float32)
    gt[0, [ls, le]] = [(60, 100, 2), (60, 180, 1)]  # labelled (v=1 counts too); the rest v=0, not drawn
    pred = np.zeros((2, 17, 3), np.float32)
    pred[0, [ls, le]] = [(220, 100, 0.9), (220, 180, 0.8)]
    pred[0, 0] = (250, 60, 0.29)  # below the 0.3 threshold: not drawn
    pred[1, ls] = (150, 200, 0.1)  # a prediction with nothing above threshold: no skeleton, no score
    out = draw_predictions(image, gt, pred, np.array([0.87, 0.05]), COCO_17, threshold=0.3)
    assert tuple(out[100, 60]) == GT_RGB and tuple(out[140, 60]) == GT_RGB  # joint and limb
    assert tuple(out[100, 220]) == PRED_RGB and tuple(out[140, 220]) == PRED_RGB
    assert tuple(out[60, 250]) == (GREY,) * 3 and tuple(out[200, 150]) == (GREY,) * 3
    assert (image == GREY).all()  # drew on a copy
    # The score is written just above the prediction's top-left joint, in the prediction colour.
    label = out[70:97, 215:260].reshape(-1, 3).astype(int)
    assert (np.abs(label - PRED_RGB).max(axis=1) < 40).sum() > 10  # text is anti-aliased (OpenCV 5 always)
    other = draw_predictions(image, gt, pred, np.array([0.12, 0.05]), COCO_17, threshold=0.3)
    assert not np.array_equal(other[70:97, 215:260], out[70:97, 215:260])
    assert np.array_equal(other[:, :200], out[:, :200])  # nothing else depends on the score


def test_dense_points_outside_the_body_halves_get_small_dots():
    """COCO-WholeBody's face and hand points are drawn small, so that 68 face points stay apart; body joints keep
    their dots."""
    from kdcache.keypoints import COCO_WHOLEBODY_133

    xy = np.full((133, 2), np.nan)
    scores = np.zeros(133)
    xy[0], xy[50] = (60.0, 60.0), (180.0, 180.0)  # the nose (body) and a face point, far apart
    scores[[0, 50]] = 1.0
    out = draw_pose(np.zeros((256, 256, 3), np.uint8), xy, scores, COCO_WHOLEBODY_133, color=(255, 255, 255))
    lit = out.max(axis=2) > 0
    body, face = lit[:120, :120].sum(), lit[120:, 120:].sum()
    assert face > 0 and body > 3 * face
