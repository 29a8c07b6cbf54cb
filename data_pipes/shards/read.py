"""Reading a run of samples from the middle of a shard: find where each sample starts, seek there, read.

Sample boundaries follow webdataset's own grouping (`tariterators.base_plus_ext`: a sample is a run of members
sharing the name before the first dot; `__meta__` members are skipped; suffixes lower-cased), so the samples read
here are the ones `tar_file_expander` + `group_by_keys` would yield from the same offset.

Plain ustar shards (what webdataset's TarWriter, GNU tar and Python's tarfile write for short names: every shard
`data_pipes.shards.make` writes) are walked by reading each 512-byte header directly, and each sample is then one
read of its bytes, parsed in memory: ~10x less Python per sample than tarfile's member objects, which matters
because a loader worker does it for every image of every epoch. A shard with pax or GNU long-name headers is
read through webdataset's own tar iterator instead.

The offsets are stored beside each shard (`<shard>.tar.idx`: written by `make`, else by the first reader that
can), so a loader worker loads 10 KB per shard instead of walking its headers, and `ShardFiles` keeps a bounded
set of shards open, one descriptor each, however many runs are read from them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tarfile
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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

    offsets: array | np.ndarray  # scanned: an array; stored: a memory map of the index file
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


INDEX_SUFFIX = ".idx"
_INDEX_MAGIC = 0x5744_5349_4458_0001  # "WDSIDX" v1
_INDEX_HEADER = 5  # magic, tar size, fingerprint, end of the last sample, plain
_FINGERPRINT_BYTES = 1 << 12
_MAP_INDEX_BYTES = 1 << 20


def index_path(path: str | Path) -> Path:
    """Where a shard's index is stored: beside it, `<shard>.tar.idx`."""
    return Path(f"{path}{INDEX_SUFFIX}")


def _fingerprint(f, size: int) -> int:
    """The tar's size plus a hash of its first and last 4 KB: an index belongs to a shard only while these agree
    (a copy keeps it valid; a shard written again, even at the same size, almost surely does not)."""
    head = os.pread(f.fileno(), _FINGERPRINT_BYTES, 0)
    tail = os.pread(f.fileno(), _FINGERPRINT_BYTES, max(0, size - _FINGERPRINT_BYTES))
    return int.from_bytes(hashlib.blake2b(head + tail, digest_size=7).digest(), "little")


def write_index(path: str | Path, index: ShardIndex | None = None) -> ShardIndex:
    """Scan a shard (unless `index` is given) and store its index beside it, atomically; an index of a damaged
    shard is not stored (every reader then meets the damage itself and reports it)."""
    index = index if index is not None else scan_shard(path)
    if index.error is None:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header = [_INDEX_MAGIC, size, _fingerprint(f, size), index.end, int(index.plain)]
        target = index_path(path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as out:
            np.save(out, np.concatenate([np.asarray(header, dtype=np.int64),
                                         np.frombuffer(index.offsets, dtype=np.int64)]), allow_pickle=False)
        os.replace(tmp, target)
    return index


def load_index(path: str | Path, f=None) -> ShardIndex | None:
    """The stored index of a shard, or None where there is none or it belongs to another version of the file."""
    try:
        where = index_path(path)
        # A shard's index (10 KB for 1,250 samples) is read into memory; a kd set's pixel tar (10 MB for 1.28M views)
        # is memory-mapped, shared through the page cache (a map holds a descriptor of its own).
        stored = np.load(where, mmap_mode="r" if where.stat().st_size > _MAP_INDEX_BYTES else None,
                         allow_pickle=False)
        with contextlib.nullcontext(f) if f is not None else open(path, "rb") as own:
            size = os.fstat(own.fileno()).st_size
            if (len(stored) < _INDEX_HEADER or int(stored[0]) != _INDEX_MAGIC or int(stored[1]) != size
                    or int(stored[2]) != _fingerprint(own, size)):
                return None
    except (OSError, ValueError):
        return None
    return ShardIndex(stored[_INDEX_HEADER:], None, int(stored[3]), plain=bool(stored[4]))


class ShardFiles:
    """The shards one process reads from: each one's index (stored beside it: loaded, else scanned once and stored
    there when the directory is writable) for the `indexes` most recently used shards, and an open file for the
    `capacity` most recently used.

    Bounded whatever the dataset: through ImageNet's 1,000 shards of ~1,250 samples a worker holds 64 descriptors
    and at most 1,024 x 10 KB of offsets (an index over 1 MB, a kd set's pixel tar, is memory-mapped instead and
    counts as an open file: one descriptor more); a window of 1,024 samples reads ~16 shards, so the offsets of every
    shard stay at hand and re-opening a dropped file costs an open(), not an index load or a scan.
    """

    def __init__(self, capacity: int = 64, indexes: int = 1024) -> None:
        self.capacity, self.indexes = capacity, indexes
        self._index: OrderedDict[str, ShardIndex] = OrderedDict()
        self._open: OrderedDict[str, object | None] = OrderedDict()

    def _entry(self, path: str) -> tuple[ShardIndex, object | None]:
        if path in self._open:
            self._open.move_to_end(path)
            f = self._open[path]
        else:
            try:
                f = open(path, "rb", buffering=0)  # noqa: SIM115 - kept open across runs, closed when dropped
            except OSError:
                f = None
            while len(self._open) >= self.capacity:
                old = self._open.popitem(last=False)[1]
                if old is not None:
                    old.close()
            self._open[path] = f
        if path in self._index:
            self._index.move_to_end(path)
            return self._index[path], f
        index = load_index(path, f) if f is not None else None
        if index is None:
            index = scan_shard(path)
            if f is not None and index.error is None:
                with contextlib.suppress(OSError):  # a read-only dataset: every process scans (as before)
                    write_index(path, index)
        mapped = isinstance(index.offsets, np.memmap)
        limit = self.capacity if mapped else self.indexes
        while len(self._index) >= limit:
            self._index.popitem(last=False)
        self._index[path] = index
        return index, f

    def get(self, path: str) -> ShardIndex:
        return self._entry(path)[0]

    def read_run(self, path: str, first: int, end: int) -> Iterator[tuple[int, dict | str]]:
        """`read_run` on the shard's kept file."""
        index, f = self._entry(path)
        return read_run(path, index, first, end, f)

    def __len__(self) -> int:
        return len(self._open)

    def close(self) -> None:
        for f in self._open.values():
            if f is not None:
                f.close()
        self._open.clear()
        self._index.clear()

    def __getstate__(self) -> dict:  # open files stay in their process; a copy starts empty
        return {"capacity": self.capacity, "indexes": self.indexes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["capacity"], state["indexes"])


_SHARED: dict[int, ShardFiles] = {}


def shared_files() -> ShardFiles:
    """This process's pool, shared by its readers (D1 and D2 read the same shards): one descriptor a shard."""
    pid = os.getpid()  # a forked worker gets a pool of its own, not its parent's open files
    if pid not in _SHARED:
        _SHARED.clear()
        _SHARED[pid] = ShardFiles()
    return _SHARED[pid]


# The name the readers used before shards had stored indexes; the pool is a drop-in.
ShardIndexCache = ShardFiles


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


def read_run(path: str, index: ShardIndex, first: int, end: int, f=None) -> Iterator[tuple[int, dict | str]]:
    """Samples `first..end-1` of a shard: (sample index, webdataset sample dict), or (index, reason) for each
    sample the shard cannot deliver (unreadable file, tar cut short, damaged member). `f`: the shard already open
    (unbuffered, as `ShardFiles` keeps it); None opens it for this run."""
    available = min(end, len(index.offsets))
    reason = index.error or f"the tar holds only {len(index.offsets)} samples"
    delivered = first
    if first < available:
        reader = _read_plain if index.plain else _read_tarfile
        for i, sample in reader(path, index, first, available, f):
            if isinstance(sample, str):  # the reader stops at its first failure
                reason = sample
                break
            yield i, sample
            delivered = i + 1
    yield from ((j, f"cut off ({reason})") for j in range(delivered, end))


def _read_plain(path: str, index: ShardIndex, first: int, end: int, f=None) -> Iterator[tuple[int, dict | str]]:
    offsets = index.offsets
    with contextlib.nullcontext(f) if f is not None else open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        for i in range(first, end):
            # A sample's span runs to the next sample's first header: its padding and any skipped member included.
            # pread: no file position, so runs of one kept file never disturb each other.
            at = int(offsets[i])
            size = (int(offsets[i + 1]) if i + 1 < len(offsets) else index.end) - at
            buf = os.pread(fd, size, at)
            if len(buf) < size:
                yield i, f"the tar ends inside sample {i} (it changed since it was scanned)"
                return
            try:
                yield i, _parse_sample(buf, path)
            except (ValueError, _NotPlain) as e:
                yield i, f"{type(e).__name__}: {e}"
                return


def _read_tarfile(path: str, index: ShardIndex, first: int, end: int, _f=None) -> Iterator[tuple[int, dict | str]]:
    errors: list[Exception] = []

    def stop(exn: Exception) -> bool:
        errors.append(exn)
        return False

    i = first
    with open(path, "rb") as f:
        f.seek(int(index.offsets[first]))
        samples = group_by_keys(tar_file_expander([{"url": path, "stream": f}], handler=stop), handler=stop)
        # Ask for exactly the samples wanted: group_by_keys reads ahead only to the next sample's first member.
        while i < end and (sample := next(samples, None)) is not None:
            yield i, sample
            i += 1
    if i < end:
        yield i, repr(errors[0]) if errors else (index.error or f"the tar ends after sample {i - 1}")
