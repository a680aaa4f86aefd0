"""The cache contract: the row schema, crop formats, and what a cache's codec must match."""

import numpy as np
import pytest

from kdcache.cache_format import (REPLAY_COLUMNS, ROW_COLUMNS, check_compatible, decode_crop, encode_crop,
                                  manifest_codec, parse_crop_format)
from kdcache.codec import UDPHeatmap
from kdcache.errors import UserError


def test_check_compatible_names_each_mismatch():
    manifest = {"input_hw": [256, 192], "heatmap_hw": [64, 48], "sigma": 2.0}  # schema 2: no codec record
    assert check_compatible(manifest, UDPHeatmap((256, 192), (64, 48), 2.0)) == []
    problems = check_compatible(manifest, UDPHeatmap((128, 96), (32, 24), 3.0))
    assert [p.split()[0] for p in problems] == ["input_hw", "heatmap_hw", "sigma"]


def test_a_schema_3_cache_is_compared_by_its_codec_record():
    codec = UDPHeatmap((128, 96), (32, 24), 2.0)
    manifest = {"codec": {**codec.to_record(), "sigma": 1.5}, "input_hw": [128, 96], "heatmap_hw": [32, 24],
                "sigma": 1.5}
    assert manifest_codec(manifest) == UDPHeatmap((128, 96), (32, 24), 1.5)
    assert check_compatible(manifest, codec) == ["sigma 1.5 (student: 2.0)"]


def test_row_columns_stack_to_their_dtype_and_shape_and_empty_to_zero_rows():
    keypoints = next(c for c in ROW_COLUMNS if c.name == "keypoints")
    assert keypoints.row_shape(17) == (17, 3)
    stacked = keypoints.stack([np.zeros((2, 17, 3)), np.ones((1, 17, 3))], 17)
    assert stacked.dtype == np.float32 and stacked.shape == (3, 17, 3)
    for column in ROW_COLUMNS + REPLAY_COLUMNS:
        empty = column.stack([], 133)
        assert empty.dtype == column.dtype and empty.shape == (0, *column.row_shape(133))


def test_crop_formats():
    assert parse_crop_format("jpeg90") == ("jpeg", 90) and parse_crop_format("none") == ("none", 0)
    for bad in ("jpeg", "jpeg0", "jpeg101", "webp"):
        with pytest.raises(UserError, match="unknown crop format"):
            parse_crop_format(bad)
    crop = np.random.default_rng(0).integers(0, 256, (16, 12, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_crop(encode_crop(crop, "png")), crop)  # RGB in, RGB out, lossless
