"""Reading a run of samples from the middle of a shard: find where each sample starts, seek there, stream.

Sample boundaries follow webdataset's own grouping (`tariterators.base_plus_ext`: a sample is a run of members
sharing the name before the first dot; `__meta__` members are skipped), so the offsets found by scanning tar
headers line up with the samples that `tar_file_expander` + `group_by_keys` yield from that offset.
"""

from __future__ import annotations

import re
import tarfile
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

# The same members webdataset's tar_file_iterator skips, so both agree on what a sample is.
_SKIP_META = re.compile(r"__[^/]*__($|/)")


@dataclass(frozen=True)
class ShardIndex:
    """Byte offset of each sample's first tar header; `error` says why the scan stopped early, if it did."""

    offsets: array
    error: str | None = None


def _is_sample_member(info: tarfile.TarInfo) -> str | None:
    name = info.name
    if not info.isreg() or _SKIP_META.match(name) or (name.startswith("__") and name.endswith("__")):
        return None
    prefix, _ = base_plus_ext(name)
    return prefix


def scan_shard(path: str | Path) -> ShardIndex:
    """Offsets of every sample of a tar shard, from its headers alone (tarfile seeks over the member data)."""
    offsets = array("q")
    previous = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            while (info := tar.next()) is not None:
                prefix = _is_sample_member(info)
                if prefix is not None and prefix != previous:
                    offsets.append(info.offset)
                    previous = prefix
    except (OSError, tarfile.TarError, EOFError) as e:
        return ShardIndex(offsets, f"{type(e).__name__}: {e}")
    return ShardIndex(offsets)


class ShardIndexCache:
    """Scanned shard indexes of one process (a loader worker keeps its cache across epochs when persistent)."""

    def __init__(self) -> None:
        self._indexes: dict[str, ShardIndex] = {}

    def get(self, path: str) -> ShardIndex:
        if path not in self._indexes:
            self._indexes[path] = scan_shard(path)
        return self._indexes[path]


def read_run(path: str, index: ShardIndex, first: int, end: int) -> Iterator[tuple[int, dict | str]]:
    """Samples `first..end-1` of a shard: (sample index, webdataset sample dict), or (index, reason) for each
    sample the shard cannot deliver (unreadable file, tar cut short, damaged member)."""
    available = min(end, len(index.offsets))
    if first >= available:
        reason = index.error or f"the tar holds only {len(index.offsets)} samples"
        yield from ((i, f"cut off ({reason})") for i in range(first, end))
        return
    errors: list[Exception] = []

    def stop(exn: Exception) -> bool:
        errors.append(exn)
        return False

    i = first
    with open(path, "rb") as f:
        f.seek(index.offsets[first])
        samples = group_by_keys(tar_file_expander([{"url": path, "stream": f}], handler=stop), handler=stop)
        # Ask for exactly the samples wanted: group_by_keys reads ahead only to the next sample's first member.
        while i < available and (sample := next(samples, None)) is not None:
            yield i, sample
            i += 1
    reason = repr(errors[0]) if errors else (index.error or "the tar ends early")
    yield from ((j, f"cut off ({reason})") for j in range(i, end))
