"""data_pipes.shards.read: the sample index of a tar shard and reading runs of samples from its middle."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_pipes.shards.read import read_run, scan_shard

# (member name, data): dotted suffixes, an upper-case suffix, a path-like key, webdataset's meta members.
MEMBERS = [
    ("a.jpg", b"A" * 700), ("a.cls", b"3"),
    ("__meta__", b"skipped"),
    ("b.JPG", b"B" * 1), ("b.cls", b"1"),
    ("c.seg.png", b"C" * 1024), ("c.cls", b"0"),
    ("dir/d.jpg", b""), ("dir/d.cls", b"2"),
    ("e.jpg", b"E" * 513), ("e.cls", b"4"),
]


def _write(path: Path, members=MEMBERS, fmt=tarfile.USTAR_FORMAT, directory: bool = True) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        if directory:
            info = tarfile.TarInfo("dir")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _webdataset_samples(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        return list(group_by_keys(tar_file_expander([{"url": str(path), "stream": f}])))


def _ours(path: Path, first: int = 0, end: int | None = None) -> list:
    index = scan_shard(path)
    return [s for _, s in read_run(str(path), index, first, len(index.offsets) if end is None else end)]


def _comparable(samples: list) -> list[dict]:
    return [{k: bytes(v) if isinstance(v, (bytes, memoryview)) else v for k, v in s.items()} for s in samples]


def test_plain_shards_are_read_without_tarfile_and_yield_what_webdataset_yields(tmp_path):
    path = _write(tmp_path / "s.tar")
    index = scan_shard(path)
    assert index.plain and index.error is None and len(index.offsets) == 5
    ours = _comparable(_ours(path))
    assert ours == _comparable(_webdataset_samples(path))
    assert [s["__key__"] for s in ours] == ["a", "b", "c", "dir/d", "e"]
    assert ours[1]["jpg"] == b"B" and ours[2]["seg.png"] == b"C" * 1024 and ours[3]["jpg"] == b""


def test_a_run_from_the_middle_of_a_shard_is_the_same_samples(tmp_path):
    path = _write(tmp_path / "s.tar")
    assert _comparable(_ours(path, 2, 4)) == _comparable(_webdataset_samples(path))[2:4]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_long_member_names_fall_back_to_webdatasets_reader(tmp_path, fmt):
    long_key = "n" * 130
    members = [*MEMBERS[:2], (f"{long_key}.jpg", b"L" * 600), (f"{long_key}.cls", b"9"), *MEMBERS[9:]]
    path = _write(tmp_path / "long.tar", members, fmt)
    index = scan_shard(path)
    assert not index.plain and len(index.offsets) == 3
    ours = _comparable(_ours(path))
    assert ours == _comparable(_webdataset_samples(path))
    assert ours[1]["__key__"] == long_key


def test_a_tar_cut_inside_a_member_indexes_only_the_complete_samples(tmp_path):
    path = _write(tmp_path / "s.tar")
    with tarfile.open(path) as tar:
        victim = tar.getmember("c.seg.png")
    with open(path, "r+b") as f:
        f.truncate(victim.offset_data + 100)
    index = scan_shard(path)
    assert len(index.offsets) == 2
    assert "ends inside member 'c.seg.png'" in index.error
    assert [key for _, key in read_run(str(path), index, 1, 4)][1:] == [
        f"cut off ({index.error})", f"cut off ({index.error})"]


def test_a_damaged_header_stops_the_scan_where_it_is(tmp_path):
    path = _write(tmp_path / "s.tar", directory=False)
    with tarfile.open(path) as tar:
        victim = tar.getmember("b.JPG")
    data = bytearray(path.read_bytes())
    data[victim.offset + 10] ^= 0x55  # a flipped byte in the name field
    path.write_bytes(bytes(data))
    index = scan_shard(path)
    assert len(index.offsets) == 1
    assert index.error == f"damaged tar header at byte {victim.offset} (checksum mismatch)"


def test_bytes_that_are_not_a_tar_give_an_empty_index_with_the_reason(tmp_path):
    path = tmp_path / "page.tar"
    path.write_bytes(b"<html>404 not found</html>" * 40)
    index = scan_shard(path)
    assert len(index.offsets) == 0 and "damaged tar header at byte 0" in index.error


def test_a_missing_shard_gives_an_empty_index_with_the_reason(tmp_path):
    index = scan_shard(tmp_path / "gone.tar")
    assert len(index.offsets) == 0 and "FileNotFoundError" in index.error
