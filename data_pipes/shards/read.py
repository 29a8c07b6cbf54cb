"""Reading a run of samples from the middle of a shard: find where each sample starts, seek there, read.

Sample boundaries follow webdataset's own grouping (`tariterators.base_plus_ext`: a sample is a run of members
sharing the name before the first dot; `__meta__` members are skipped; suffixes lower-cased), so the samples read
here are the ones `tar_file_expander` + `group_by_keys` would yield from the same offset.

Plain ustar shards (what webdataset's TarWriter, GNU tar and Python's tarfile write for short names: every shard
`data_pipes.shards.make` writes) are walked by reading each 512-byte header directly, and each sample is then one
read of its bytes, parsed in memory: ~10x less Python per sample than tarfile's member objects, which matters
because a loader worker does it for every image of every epoch. A shard with pax or GNU long-name headers is
read through webdataset's own tar iterator instead.
"""

from __future__ import annotations

import os
import re
import tarfile
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

# The same members webdataset's tar_file_iterator skips, so both agree on what a sample is.
_SKIP_META = re.compile(r"__[^/]*__($|/)")
_BLOCK = 512
_EMPTY_BLOCK = bytes(_BLOCK)
_REGULAR = (b"0", b"\x00", b"7")  # regular file type flags (7: contiguous file, read as regular by tarfile)
_EXTENDED = (b"L", b"K", b"x", b"g")  # GNU long names/links, pax headers: left to tarfile


@dataclass(frozen=True)
class ShardIndex:
    """Byte offset of each sample's first tar header; `error` says why the scan stopped early, if it did.

    `end` is where the last indexed sample's bytes end, and `plain` says whether the shard holds plain ustar
    headers only (samples are then read with one read each); -1 and False for shards read through tarfile.
    """

    offsets: array
    error: str | None = None
    end: int = -1
    plain: bool = False


class _NotPlain(Exception):
    """The shard has headers that only a full tar parser reads correctly."""


def _is_sample_member(name: str) -> str | None:
    if _SKIP_META.match(name) or (name.startswith("__") and name.endswith("__")):
        return None
    prefix, _ = base_plus_ext(name)
    return prefix


def _header(block: bytes, at: int, verify: bool = True) -> tuple[str, bytes, int]:
    """(name, type flag, data size) of the ustar header in `block`; raises ValueError if it is damaged."""
    if verify:
        _verify_checksum(block, at)
    typeflag = block[156:157]
    if typeflag in _EXTENDED:
        raise _NotPlain
    name = block[:100].split(b"\x00", 1)[0]
    if block[257:262] == b"ustar" and block[345] != 0:
        name = block[345:500].split(b"\x00", 1)[0] + b"/" + name
    field = block[124:136]
    # GNU base-256 sizes (members over 8 GiB) have the top bit set.
    size = int.from_bytes(field[1:], "big") if field[0] & 0x80 else _octal(field, at)
    return name.decode("utf-8", "surrogateescape"), typeflag, size


def _octal(field: bytes, at: int) -> int:
    try:
        return int(field.split(b"\x00", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise ValueError(f"damaged tar header at byte {at} (bad number {field!r})") from None


def _verify_checksum(block: bytes, at: int) -> None:
    # The checksum field itself counts as eight spaces; old tars summed signed bytes, which tarfile accepts too.
    stored = _octal(block[148:156], at)
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if stored != unsigned and stored != unsigned - 256 * sum(b >= 128 for b in block[:148] + block[156:]):
        raise ValueError(f"damaged tar header at byte {at} (checksum mismatch)")


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _scan_plain(path: str | Path) -> ShardIndex:
    offsets = array("q")
    previous, end, error = None, 0, None
    with open(path, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        pos = 0
        while True:
            f.seek(pos)
            block = f.read(_BLOCK)
            if len(block) < _BLOCK or block == _EMPTY_BLOCK:
                if 0 < len(block) < _BLOCK:
                    error = f"the tar ends inside a header at byte {pos}"
                break
            try:
                name, typeflag, size = _header(block, pos)
            except ValueError as e:
                error = str(e)
                break
            data_end = pos + _BLOCK + size
            prefix = _is_sample_member(name) if typeflag in _REGULAR else None
            if data_end > total:
                error = f"the tar ends inside member {name!r} ({total - pos - _BLOCK} of {size} bytes)"
                if prefix is not None and prefix == previous:
                    offsets.pop()  # that sample is incomplete
                break
            if prefix is not None:
                if prefix != previous:
                    offsets.append(pos)
                    previous = prefix
                end = data_end
            pos += _BLOCK + _padded(size)
    return ShardIndex(offsets, error, end, plain=True)


def _scan_tarfile(path: str | Path) -> ShardIndex:
    offsets = array("q")
    previous = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            while (info := tar.next()) is not None:
                prefix = _is_sample_member(info.name) if info.isreg() else None
                if prefix is not None and prefix != previous:
                    offsets.append(info.offset)
                    previous = prefix
    except (OSError, tarfile.TarError, EOFError) as e:
        return ShardIndex(offsets, f"{type(e).__name__}: {e}")
    return ShardIndex(offsets)


def scan_shard(path: str | Path) -> ShardIndex:
    """Offsets of every sample of a tar shard, from its headers alone (the member data is seeked over)."""
    try:
        return _scan_plain(path)
    except _NotPlain:
        return _scan_tarfile(path)
    except OSError as e:
        return ShardIndex(array("q"), f"{type(e).__name__}: {e}")


class ShardIndexCache:
    """Scanned shard indexes of one process (a loader worker keeps its cache across epochs when persistent)."""

    def __init__(self) -> None:
        self._indexes: dict[str, ShardIndex] = {}

    def get(self, path: str) -> ShardIndex:
        if path not in self._indexes:
            self._indexes[path] = scan_shard(path)
        return self._indexes[path]


def _parse_sample(buf: bytes, url: str) -> dict:
    """The webdataset sample dict of one sample's members (headers and data, as the plain scan found them)."""
    sample: dict = {"__url__": url}
    pos = 0
    while pos + _BLOCK <= len(buf):
        # The scan verified every header's checksum; only their fields are needed here.
        name, typeflag, size = _header(buf[pos: pos + _BLOCK], pos, verify=False)
        start = pos + _BLOCK
        pos = start + _padded(size)
        prefix = _is_sample_member(name) if typeflag in _REGULAR else None
        if prefix is None:
            continue
        _, suffix = base_plus_ext(name)
        suffix = suffix.lower()
        if sample.setdefault("__key__", prefix) != prefix or suffix in sample:
            raise ValueError(f"{url}: member {name!r} does not belong to sample {sample['__key__']!r}")
        sample[suffix] = buf[start: start + size]
    return sample


def read_run(path: str, index: ShardIndex, first: int, end: int) -> Iterator[tuple[int, dict | str]]:
    """Samples `first..end-1` of a shard: (sample index, webdataset sample dict), or (index, reason) for each
    sample the shard cannot deliver (unreadable file, tar cut short, damaged member)."""
    available = min(end, len(index.offsets))
    reason = index.error or f"the tar holds only {len(index.offsets)} samples"
    delivered = first
    if first < available:
        reader = _read_plain if index.plain else _read_tarfile
        for i, sample in reader(path, index, first, available):
            if isinstance(sample, str):  # the reader stops at its first failure
                reason = sample
                break
            yield i, sample
            delivered = i + 1
    yield from ((j, f"cut off ({reason})") for j in range(delivered, end))


def _read_plain(path: str, index: ShardIndex, first: int, end: int) -> Iterator[tuple[int, dict | str]]:
    offsets = index.offsets
    with open(path, "rb") as f:
        f.seek(offsets[first])
        for i in range(first, end):
            # A sample's span runs to the next sample's first header: its padding and any skipped member included.
            size = (offsets[i + 1] if i + 1 < len(offsets) else index.end) - offsets[i]
            buf = f.read(size)
            if len(buf) < size:
                yield i, f"the tar ends inside sample {i} (it changed since it was scanned)"
                return
            try:
                yield i, _parse_sample(buf, path)
            except (ValueError, _NotPlain) as e:
                yield i, f"{type(e).__name__}: {e}"
                return


def _read_tarfile(path: str, index: ShardIndex, first: int, end: int) -> Iterator[tuple[int, dict | str]]:
    errors: list[Exception] = []

    def stop(exn: Exception) -> bool:
        errors.append(exn)
        return False

    i = first
    with open(path, "rb") as f:
        f.seek(index.offsets[first])
        samples = group_by_keys(tar_file_expander([{"url": path, "stream": f}], handler=stop), handler=stop)
        # Ask for exactly the samples wanted: group_by_keys reads ahead only to the next sample's first member.
        while i < end and (sample := next(samples, None)) is not None:
            yield i, sample
            i += 1
    if i < end:
        yield i, repr(errors[0]) if errors else (index.error or f"the tar ends after sample {i - 1}")
