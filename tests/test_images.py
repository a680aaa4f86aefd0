"""Reading images: RGB, raw pixels despite EXIF orientation, errors that name the file, the annotated size."""

import struct

import cv2
import numpy as np
import pytest

from kdcache.coco import Instance
from kdcache.errors import UserError
from kdcache.images import ImageMemo, read_image


def test_read_image_returns_rgb(tmp_path):
    bgr = np.zeros((6, 8, 3), dtype=np.uint8)
    bgr[2, 3] = (255, 10, 0)  # blue in OpenCV's BGR order
    path = tmp_path / "img.png"
    assert cv2.imwrite(str(path), bgr)
    rgb = read_image(path)
    assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[2, 3], (0, 10, 255))


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="missing.jpg"):
        read_image(tmp_path / "missing.jpg")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    with pytest.raises(UserError, match="junk.jpg"):
        read_image(junk)


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """`jpeg` with an APP1 Exif segment after SOI whose only tag is Orientation (0x0112, SHORT)."""
    entry = struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff = b"II*\x00" + struct.pack("<IH", 8, 1) + entry + struct.pack("<I", 0)  # little-endian, one IFD entry
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def test_read_image_decodes_raw_pixels_despite_exif_orientation(tmp_path):
    bgr = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high, as an annotation file would say
    bgr[:, :10] = (0, 0, 255)  # red left band: a rotation would move it to the top or bottom
    plain = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
    path = tmp_path / "rotated.jpg"
    path.write_bytes(_with_exif_orientation(plain, 6))  # 6: "rotate 90 degrees clockwise to display"
    assert cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_COLOR).shape == (40, 20, 3)  # OpenCV's default
    rgb = read_image(path, expect_wh=(40, 20))
    raw = cv2.imdecode(np.frombuffer(plain, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    np.testing.assert_array_equal(rgb, raw)
    assert rgb[10, 2, 0] > 200 and rgb[10, 30, 0] < 50  # red on the left, where the annotations put it


def test_image_of_another_size_than_annotated_is_refused(tmp_path):
    from kdcache.codec import UDPHeatmap
    from kdcache.data import ViewDataset
    from kdcache.keypoints import COCO_17
    from kdcache.transforms import AugmentConfig, ViewSampler

    assert cv2.imwrite(str(tmp_path / "a.png"), np.zeros((80, 100, 3), np.uint8))  # 100 wide, 80 high
    assert read_image(tmp_path / "a.png", expect_wh=(100, 80)).shape == (80, 100, 3)
    message = r"a\.png is 100x80 pixels .* the annotation file says 80x100.*--images"
    with pytest.raises(UserError, match=message):
        read_image(tmp_path / "a.png", expect_wh=(80, 100))
    memo = ImageMemo(tmp_path)
    assert memo("a.png").shape == (80, 100, 3)  # no size given (the cache reader's replay): as before
    with pytest.raises(UserError, match=message):
        memo("a.png", (80, 100))  # also when the image is already memoised
    kpts = np.zeros((17, 3), np.float32)
    kpts[0] = (30, 30, 2)
    inst = Instance(1, 5, "a.png", (80, 100), np.array([10, 10, 40, 50], np.float32), kpts, 2000.0)
    sampler = ViewSampler(AugmentConfig(), UDPHeatmap.for_input((64, 48)), COCO_17, seed=0)
    views = ViewDataset([inst], tmp_path, sampler, items=[(0, 0)])
    with pytest.raises(UserError, match=message):
        views[0]  # the dump and ground-truth training read images here
