"""A kd source's members: which samples of its shards it visits, numbered block after block.

Every sample of the shards (D1, D2): member m is sample m of the split, and block k is shard k. A selection (D3,
`distill.select`): the selected samples' indices (sorted, unique) and where each one's copies end in the member
sequence (an image repeated r times is r consecutive members); block k is the k-th shard holding any selected
image. Numbering members this way, block after block and copies together, is what a built kd set's block files
and view seeds are keyed by.

Cost at ImageNet size: all-samples members hold the shard starts, O(shards) (8 KB for 1,000 shards). A selection
holds two int64 arrays of one entry per *selected image*, memory-mapped from `.npy` files and opened again (not
copied) in every process that unpickles it, so every rank and loader worker shares one copy through the page cache:
16 bytes an image (20 MB for 1.28M extra images), whatever `per_class` makes the member count (the default
130,000 a class x 1000 classes = 130M members, never materialised). Lookups are vectorised binary searches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


class Members:
    """The members of one source over `shards` ((path, samples) of its split, in order); `selection`: the
    (images, ends) of a selection, as `.npy` files (memory-mapped) or arrays (small, in memory), or None for every
    sample."""

    def __init__(self, shards: Sequence[tuple[str | Path, int]],
                 selection: tuple[Path, Path] | tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.paths = tuple(str(p) for p, _ in shards)
        self.shard_starts = np.concatenate([[0], np.cumsum([int(n) for _, n in shards], dtype=np.int64)])
        if selection is not None and not isinstance(selection[0], np.ndarray):
            selection = (Path(selection[0]), Path(selection[1]))
        self.selection = selection
        self._open()

    def _open(self) -> None:
        if self.selection is None:
            self.images = self.ends = None
            per_shard = np.diff(self.shard_starts)
        else:
            self.images, self.ends = (np.load(a, mmap_mode="r", allow_pickle=False) if isinstance(a, Path)
                                      else np.asarray(a, dtype=np.int64) for a in self.selection)
            if len(self.images) != len(self.ends):
                raise ValueError(f"selection files {self.selection} disagree in length")
            # Members before each shard's first selected image: O(shards) binary searches into the memory map.
            first_image = np.searchsorted(self.images, self.shard_starts)
            before = np.where(first_image > 0, np.asarray(self.ends[np.maximum(first_image - 1, 0)]), 0)
            per_shard = np.diff(before.astype(np.int64))
        # Every shard is a block of an all-samples source; a selection's blocks are the shards it selects from.
        self.block_shards = np.arange(len(per_shard)) if self.images is None else np.flatnonzero(per_shard > 0)
        self.block_starts = np.concatenate([[0], np.cumsum(per_shard[self.block_shards], dtype=np.int64)])

    def __reduce__(self):
        # Pickled (to loader workers, spawned processes) as paths: the memory maps are opened again, not copied.
        shards = [(p, int(n)) for p, n in zip(self.paths, np.diff(self.shard_starts))]
        return Members, (shards, self.selection)

    @property
    def count(self) -> int:
        return int(self.block_starts[-1])

    @property
    def num_blocks(self) -> int:
        return len(self.block_shards)

    @property
    def repeats(self) -> bool:
        """Whether some sample is more than one member (a selection that repeats images of rare classes)."""
        return self.images is not None and self.count > len(self.images)

    def block_range(self, block: int) -> tuple[int, int]:
        """Members [first, end) of a block."""
        return int(self.block_starts[block]), int(self.block_starts[block + 1])

    def block_size(self, block: int) -> int:
        first, end = self.block_range(block)
        return end - first

    def block_path(self, block: int) -> str:
        return self.paths[int(self.block_shards[block])]

    def block_of(self, member: int) -> tuple[int, int]:
        """(block, offset in the block) of a member."""
        block = int(np.searchsorted(self.block_starts, member, side="right") - 1)
        return block, member - int(self.block_starts[block])

    def samples(self, members: np.ndarray | Sequence[int]) -> np.ndarray:
        """The split's sample index of each member."""
        m = np.asarray(members, dtype=np.int64)
        if self.images is None:
            return m
        return np.asarray(self.images[np.searchsorted(self.ends, m, side="right")], dtype=np.int64)

    def locate(self, members: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(shard, sample index in the shard) of each member."""
        g = self.samples(members)
        shard = np.searchsorted(self.shard_starts, g, side="right") - 1
        return shard, g - self.shard_starts[shard]


def selection_arrays(images: np.ndarray, repeats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(images, ends) of a selection from its images (sorted, unique) and each one's number of copies."""
    images = np.asarray(images, dtype=np.int64)
    if len(images) and (np.diff(images) <= 0).any():
        raise ValueError("selected images must be sorted and unique")
    return images, np.cumsum(np.asarray(repeats, dtype=np.int64))
