"""Where a distillation sample's pixels come from: drawn on the fly, replayed from stored parameters, or stored.

All three draw a view's parameters the same way (`draw_view`: a generator seeded by the run seed, the source,
the replica or pass, and the member), so the online recipe and the built sets sample one distribution, and a
view that is drawn again is drawn identically.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import simplejpeg

from data_pipes.image.decode import open_image
from data_pipes.image.views import ViewRecipe
from data_pipes.shards.read import ShardFiles
from data_pipes.stream.mixture import Item, Rendered, SourceReader, ViewSource
from distill.kdset import dequantize, read_block

_VIEW_SALT = 0x5EED_0021


def view_rng(seed: int, source: int, replica: int, member: int) -> np.random.Generator:
    return np.random.default_rng([_VIEW_SALT, seed, source, replica, member])


def draw_view(recipe: ViewRecipe, reader: SourceReader, rng: np.random.Generator, member: int, data: bytes,
              partner_data: dict[int, bytes] | None = None) -> np.void:
    """The record of one view of `member` (whose bytes are `data`); with mixup, the partner is a random other
    member of the same block (the same shard: batch-local mixing, as big_vision mixes neighbours)."""
    src = open_image(data)
    if not recipe.mixes:
        return recipe.draw(rng, (src.width, src.height))
    partner = partner_of(reader, rng, member)
    other = open_image(partner_data[partner])
    return recipe.draw(rng, (src.width, src.height), partner, (other.width, other.height))


def partner_of(reader: SourceReader, rng: np.random.Generator, member: int) -> int:
    """The mixing partner drawn for `member` by this generator (consumes one draw first, so call it before any
    other draw on `rng`, as `draw_view` does through `peek_partner`)."""
    block, _ = reader.block_of(member)
    first, end = reader.members.block_range(block)
    if end - first < 2:
        return member
    choice = first + int(rng.integers(end - first - 1))
    return choice if choice < member else choice + 1


def peek_partner(reader: SourceReader, seed: int, source: int, replica: int, member: int) -> int:
    return partner_of(reader, view_rng(seed, source, replica, member), member)


def _sample_target(sample: dict, labelled: bool) -> int:
    return int(sample["cls"]) if labelled and "cls" in sample else -1


class OnlineViews(ViewSource):
    """Views drawn fresh for every pass (the online recipe: the teacher labels them on the device)."""

    def __init__(self, recipe: ViewRecipe, reader: SourceReader, *, source: int, seed: int, labelled: bool) -> None:
        self.recipe, self.reader, self.source, self.seed, self.labelled = recipe, reader, source, seed, labelled

    def render(self, items: Sequence[Item]) -> list[Rendered]:
        partners = {item.member: peek_partner(self.reader, self.seed, self.source, item.pass_, item.member)
                    for item in items} if self.recipe.mixes else {}
        raw = self.reader.read([item.member for item in items] + list(partners.values()))
        out = []
        for item in items:
            sample = raw[item.member]
            if isinstance(sample, str):
                out.append(Rendered(None, -1, f"#{item.member}", error=sample))
                continue
            key = sample.get("__key__", f"#{item.member}")
            try:
                data, extra = sample["jpg"], {}
                if self.recipe.mixes:
                    partner = raw[partners[item.member]]
                    if isinstance(partner, str):
                        raise ValueError(f"mixup partner unreadable: {partner}")
                    extra = {partners[item.member]: partner["jpg"]}
                rng = view_rng(self.seed, self.source, item.pass_, item.member)
                record = draw_view(self.recipe, self.reader, rng, item.member, data, extra)
                view = self.recipe.render(record, data, extra.get(int(record["partner"])) if extra else None)
                out.append(Rendered(view, _sample_target(sample, self.labelled), key))
            except Exception as e:  # noqa: BLE001 - a bad image is a bad sample, counted and replaced
                out.append(Rendered(None, -1, key, error=f"{type(e).__name__}: {e}"))
        return out


class StoredViews(ViewSource):
    """Views of a built kd set: pass q shows replica q mod R; `pixels` reads the stored JPEG, `params` renders the
    stored parameters from the source shards."""

    def __init__(self, recipe: ViewRecipe, reader: SourceReader, *, directory: Path, replicas: int, storage: str,
                 labelled: bool, missing: str = "uniform", open_blocks: int = 32) -> None:
        self.recipe, self.reader, self.directory = recipe, reader, Path(directory)
        self.replicas, self.storage, self.labelled = replicas, storage, labelled
        # The blocks' records are memory maps, the most recent `open_blocks` kept (a run touches every block each
        # epoch: 1,000+ maps otherwise); the pixel tars' indexes are stored memory maps too, through a bounded pool.
        self._blocks: OrderedDict[int, np.ndarray] = OrderedDict()
        self.open_blocks = open_blocks
        self._pixels = ShardFiles(capacity=open_blocks)

    def _records(self, block: int) -> np.ndarray:
        if block in self._blocks:
            self._blocks.move_to_end(block)
        else:
            while len(self._blocks) >= self.open_blocks:
                self._blocks.popitem(last=False)
            self._blocks[block] = read_block(self.directory, block)
        return self._blocks[block]

    def __getstate__(self) -> dict:  # a worker maps the blocks it reads itself
        return {**self.__dict__, "_blocks": OrderedDict()}

    def locate(self, item: Item) -> tuple[Item, int, int, int, np.void]:
        """(item, block, offset in the block, replica, stored record) of an item: pass q shows replica q mod R."""
        block, offset = self.reader.block_of(item.member)
        replica = item.pass_ % self.replicas
        return item, block, offset, replica, self._records(block)[replica, offset]

    def render(self, items: Sequence[Item]) -> list[Rendered]:
        located = [self.locate(item) for item in items]
        if self.storage == "pixels":
            return [self._from_pixels(*loc) for loc in located]
        return self._from_params(located)

    def _labels(self, record: np.void) -> tuple[np.ndarray, np.ndarray]:
        return record["ids"].astype(np.int64), dequantize(record["probs"])

    def _from_pixels(self, item: Item, block: int, offset: int, replica: int, record: np.void) -> Rendered:
        path = str(self.directory / f"block-{block:06d}.tar")
        position = replica * self.reader.members.block_size(block) + offset
        _, sample = next(self._pixels.read_run(path, position, position + 1))
        ids, probs = self._labels(record)
        if isinstance(sample, str):
            return Rendered(None, -1, f"{Path(path).name}#{position}", error=sample)
        target = int(sample["cls"]) if self.labelled else -1
        view = simplejpeg.decode_jpeg(sample["jpg"], "RGB") if simplejpeg.is_jpeg(sample["jpg"]) else \
            _decode_png(sample["jpg"])
        return Rendered(view, target, sample["__key__"], ids, probs)

    def _from_params(self, located: list) -> list[Rendered]:
        partners = [int(rec["view"]["partner"]) for *_, rec in located] if self.recipe.mixes else []
        raw = self.reader.read([item.member for item, *_ in located] + partners)
        out = []
        for item, _block, _offset, _replica, record in located:
            sample = raw[item.member]
            if isinstance(sample, str):
                out.append(Rendered(None, -1, f"#{item.member}", error=sample))
                continue
            key = sample.get("__key__", f"#{item.member}")
            ids, probs = self._labels(record)
            if not probs.any():
                out.append(Rendered(None, -1, key, error="the build could not make this view"))
                continue
            try:
                view_record = record["view"]
                partner = raw[int(view_record["partner"])] if self.recipe.mixes else None
                if isinstance(partner, str):
                    raise ValueError(f"mixup partner unreadable: {partner}")
                view = self.recipe.render(view_record, sample["jpg"], partner["jpg"] if partner else None)
                out.append(Rendered(view, _sample_target(sample, self.labelled), key, ids, probs))
            except Exception as e:  # noqa: BLE001 - counted and replaced like any bad sample
                out.append(Rendered(None, -1, key, error=f"{type(e).__name__}: {e}"))
        return out


def _decode_png(data: bytes) -> np.ndarray:
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(arr[:, :, ::-1])
