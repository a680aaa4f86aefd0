"""A cache as a whole: verification finds damage; the contract, writer and reader need no torch."""

import subprocess
import sys

from kdcache.cache import verify_cache


def test_verify_names_truncated_corrupt_and_missing_shards(tmp_path, make_cache):
    make_cache(tmp_path, n_per_shard=(5, 3, 2))
    assert verify_cache(tmp_path) == []
    shard = tmp_path / "shard-00001.h5"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncate
    data = bytearray((tmp_path / "shard-00002.h5").read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    (tmp_path / "shard-00002.h5").write_bytes(bytes(data))
    problems = verify_cache(tmp_path)
    assert len(problems) == 2
    assert "shard-00001.h5" in problems[0] and "truncated" in problems[0]
    assert "shard-00002.h5" in problems[1] and "checksum" in problems[1]
    (tmp_path / "shard-00000.h5").unlink()
    assert any("shard-00000.h5: missing" in p for p in verify_cache(tmp_path))


def test_contract_and_reader_import_without_torch():
    """README: h5py, numpy and OpenCV alone read a cache; kdcache's contract, writer and reader must not pull in
    torch either (crop replay included: it warps with OpenCV)."""
    code = ("import sys, kdcache.cache, kdcache.cache_format, kdcache.cache_reader, kdcache.cache_writer, "
            "kdcache.heatmap_storage, kdcache.transforms; sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
