"""Contact sheets: the tile grid, heat where the peaks are, left and right drawn apart."""

import cv2
import numpy as np
import pytest

from kdcache.heatmaps import encode
from kdcache.keypoints import KEYPOINT_NAMES
from kdcache.viz import CENTER_RGB, LEFT_RGB, RIGHT_RGB, contact_sheet, draw_pose

INPUT_HW, HEATMAP_HW = (64, 48), (16, 12)
GREY = 128


def _gaussians(points_xy, k=17):
    """Heatmaps [k, 16, 12] with UDP Gaussians at crop pixels `points_xy` (first joints), others empty."""
    kpts = np.zeros((k, 3), np.float32)
    kpts[: len(points_xy), :2] = points_xy
    kpts[: len(points_xy), 2] = 2
    return encode(kpts, INPUT_HW, HEATMAP_HW, sigma=1.0)[0]


@pytest.mark.parametrize("n, cols, grid", [(5, 3, (2, 3)), (2, 8, (1, 2)), (4, 4, (1, 4))])
def test_sheet_size_is_rows_by_cols_tiles(tmp_path, n, cols, grid):
    crops = np.full((n, *INPUT_HW, 3), GREY, np.uint8)
    heatmaps = np.stack([_gaussians([(20.0, 30.0)])] * n)
    path = contact_sheet(crops, heatmaps, tmp_path / "sub" / "sheet.png", cols=cols, titles=[f"#{i}" for i in range(n)])
    image = cv2.imread(str(path))
    assert image.shape == (grid[0] * INPUT_HW[0], grid[1] * INPUT_HW[1], 3)


def test_tile_shows_heat_at_the_peak_and_the_crop_elsewhere(tmp_path):
    crops = np.full((2, *INPUT_HW, 3), GREY, np.uint8)
    peak_xy = (30.0, 12.0)  # crop pixels, top right of the 48x64 tile
    heatmaps = np.stack([_gaussians([peak_xy]), np.zeros((17, *HEATMAP_HW), np.float32)])
    sheet = cv2.cvtColor(cv2.imread(str(contact_sheet(crops, heatmaps, tmp_path / "s.png", cols=2))), cv2.COLOR_BGR2RGB)
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
    out = draw_pose(image, xy, scores)
    assert tuple(out[100, 140]) == LEFT_RGB and tuple(out[100, 60]) == RIGHT_RGB
    assert tuple(out[40, 100]) == CENTER_RGB  # the shoulder bar joins both sides
    assert (image == 0).all()  # drew on a copy
    scores[le] = 0.1  # below threshold: the left arm disappears
    assert tuple(draw_pose(image, xy, scores)[100, 140]) == (0, 0, 0)


def test_skeleton_lands_on_the_decoded_peak(tmp_path):
    """Heatmap -> crop mapping is UDP: a peak at crop (x, y) is drawn at (x, y), not shifted by a stride."""
    input_hw, heatmap_hw = (128, 96), (32, 24)  # the real 4x ratio and sigma, where DARK decoding is exact
    kpts = np.zeros((17, 3), np.float32)
    kpts[0] = (80.0, 100.0, 2)  # far from the origin, where a plain stride-4 mapping is ~2.5 px off
    heatmaps = encode(kpts, input_hw, heatmap_hw, sigma=2.0)[0]
    sheet = contact_sheet(np.zeros((1, *input_hw, 3), np.uint8), heatmaps[None], tmp_path / "p.png")
    image = cv2.cvtColor(cv2.imread(str(sheet)), cv2.COLOR_BGR2RGB)
    assert tuple(image[100, 80]) == CENTER_RGB  # joint 0 (nose) is a centre joint; its dot has radius 2 px
    assert tuple(image[100, 77]) != CENTER_RGB
