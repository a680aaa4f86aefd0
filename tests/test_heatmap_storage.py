"""Heatmap storages: each one's error as documented, and the chunk bytes HDF5's own filters read back."""

import h5py
import numpy as np
import pytest

from kdcache.heatmap_storage import HEATMAP_STORAGES, encode_rows, heatmap_storage, inflate_row, peak_window
from kdcache.errors import UserError

K, H, W = 17, 32, 24


def _rel_l2(a, b, axis=None):
    return np.linalg.norm(a - b, axis=axis) / np.linalg.norm(b, axis=axis)


def test_int16_step_error_is_the_budget_per_joint(make_heatmaps):
    rng = np.random.default_rng(3)
    heat = make_heatmaps(64, rng)
    storage = heatmap_storage("int16-step")
    chunks, step = encode_rows(heat, storage, 0.005, 2)
    stored = np.stack([inflate_row(c, np.dtype(np.uint16), (K, H, W), True, True) for c in chunks])
    back = storage.decode(stored, step)
    live = np.ones(K, bool)
    live[3] = False  # the all-zero map
    rel = _rel_l2(back[:, live].reshape(64, K - 1, -1), heat[:, live].reshape(64, K - 1, -1), axis=-1)
    assert np.all(rel < 0.005 * 1.2) and np.median(rel) > 0.005 * 0.8
    assert not back[:, 3].any()


@pytest.mark.parametrize("name", list(HEATMAP_STORAGES))
def test_chunks_are_what_hdf5s_shuffle_and_deflate_filters_read(tmp_path, name, make_heatmaps):
    """`encode_rows` writes the bytes HDF5 would: h5py reads them back through its own filters."""
    heat = make_heatmaps(3, np.random.default_rng(1))
    storage = heatmap_storage(name)
    chunks, side = encode_rows(heat, storage, 0.01, 4)
    with h5py.File(tmp_path / "h.h5", "w") as f:
        ds = f.create_dataset("heatmaps", shape=(3, K, H, W), dtype=storage.dtype, chunks=(1, K, H, W),
                              compression="gzip", compression_opts=4, shuffle=np.dtype(storage.dtype).itemsize > 1)
        for i, chunk in enumerate(chunks):
            ds.id.write_direct_chunk((i, 0, 0, 0), chunk)
        stored = f["heatmaps"][()]
    np.testing.assert_array_equal(stored, storage.encode(heat, 0.01, 2.0)[0])
    decoded = storage.decode(stored, side)
    kept = np.where(peak_window(heat), heat, 0) if name.endswith("-window") else heat
    assert decoded.dtype == np.float32 and _rel_l2(decoded, kept) < 0.03


def test_window_storage_keeps_each_peaks_window_within_the_budget_and_zeros_elsewhere():
    from kdcache.heatmap_decode import dark_udp

    rng = np.random.default_rng(5)
    h, w = 64, 48  # ViTPose's maps: the window is 13 x 13
    ys, xs = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(4, h - 4, (16, K)), rng.uniform(4, w - 4, (16, K))
    heat = (rng.uniform(0.3, 1.0, (16, K))[..., None, None] * np.exp(
        -((ys - cy[..., None, None]) ** 2 + (xs - cx[..., None, None]) ** 2) / 8)
        + rng.normal(0, 0.006, (16, K, h, w))).astype(np.float32)  # a teacher's background noise
    storage = heatmap_storage("int16-step-window")
    chunks, step = encode_rows(heat, storage, 0.005, 2)
    back = storage.decode(np.stack([inflate_row(c, np.dtype(np.uint16), (K, h, w), True, True) for c in chunks]),
                          step)
    for n, k in ((0, 0), (5, 7), (15, 16)):
        y, x = np.unravel_index(heat[n, k].argmax(), (h, w))
        inside = np.zeros((h, w), bool)
        inside[max(0, y - 6):y + 7, max(0, x - 6):x + 7] = True
        assert not back[n, k][~inside].any()
        assert _rel_l2(back[n, k], np.where(inside, heat[n, k], 0)) < 0.005 * 1.5
    # Decoding (argmax + DARK, whose blur reaches 5 pixels) hardly notices the missing background...
    assert np.linalg.norm(dark_udp(back)[0] - dark_udp(heat)[0], axis=-1).max() < 0.02
    # ... which int16-step spends most of its bytes on.
    plain, _ = encode_rows(heat, heatmap_storage("int16-step"), 0.005, 2)
    assert sum(map(len, chunks)) < 0.25 * sum(map(len, plain))


def test_unknown_storage_is_named():
    with pytest.raises(UserError, match="unknown heatmap encoding 'int4'; known: int16-step"):
        heatmap_storage("int4")
