"""Reading the images annotation files name: raw pixels as stored, RGB, checked against the annotated size."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from kdcache.errors import UserError


def read_image(path: Path, expect_wh: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image as uint8 [H, W, 3] RGB, its pixels as stored (EXIF orientation not applied).

    COCO annotations are in the raw pixel coordinates of the file (the COCO tools never rotate), but
    OpenCV's default decode turns a JPEG by its EXIF Orientation tag: crops would then come silently from
    the wrong place. Decoded from the file's bytes (also works with non-ASCII paths), then BGR -> RGB, as
    mmpose's LoadImageFromFile with channel_order='rgb'.

    Args:
        expect_wh: (width, height) the annotation file gives the image; a decoded image of another size
            is refused (wrong --images folder, or annotations made on rotated/resized copies).

    Raises:
        UserError: naming the file, when it is missing, not a readable image, or not `expect_wh` in size.
    """
    path = Path(path)
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise UserError(f"cannot read image {path} ({exc.strerror or exc}); check --images") from exc
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imdecode(data, flags) if data.size else None
    if image is None:
        raise UserError(f"cannot decode image {path}: not a readable image file; check --images")
    check_image_size(image, path, expect_wh)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def check_image_size(image: np.ndarray, path: Path, expect_wh: tuple[int, int] | None) -> None:
    """Refuse a decoded image [H, W, ...] whose size is not the annotation file's (width, height) `expect_wh`."""
    if expect_wh is None or (image.shape[1], image.shape[0]) == tuple(expect_wh):
        return
    raise UserError(
        f"image {path} is {image.shape[1]}x{image.shape[0]} pixels (width x height, as stored, EXIF orientation "
        f"ignored) but the annotation file says {expect_wh[0]}x{expect_wh[1]}, so its annotations do not match "
        "the pixels: pass the --images folder the annotation file was made for, or fix width/height there")


class ImageMemo:
    """`read_image` of files under one folder, keeping the last decoded image: views and cache rows are
    ordered by image, so neighbours share it."""

    def __init__(self, images_dir: Path):
        self.images_dir = Path(images_dir)
        self._name: str | None = None
        self._image: np.ndarray | None = None

    def __call__(self, file_name: str, expect_wh: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 [H, W, 3] RGB of `file_name`; `expect_wh` (width, height) as in `read_image`."""
        if file_name != self._name:
            self._image = read_image(self.images_dir / file_name)
            self._name = file_name
        check_image_size(self._image, self.images_dir / file_name, expect_wh)
        return self._image
