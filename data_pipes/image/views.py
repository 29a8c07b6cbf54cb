"""Replayable augmented views: draw a view's parameters, store them in ~100 bytes, render the same pixels later.

The distillation sets (`distill.build`) keep, for every view of every source image, the parameters that made it
rather than its pixels, as Apple's dataset reinforcement does (apple/ml-dr): the Inception-crop box in source
pixels, the flip, each RandAugment layer's op, level, sign, fill-centre and filter, the mixup partner with its own
crop and flip, the mixing ratio and the JPEG quality. `ViewRecipe.draw` makes such a record and `ViewRecipe.render`
turns (source bytes, record) into the uint8 view, so the build (which labels the pixels with the teacher) and the
training loader (which replays them for the student) run the same code on the same decoder. A changed decoder or
recipe renders other pixels; the build stores checksums of sampled views so that training can tell.

Every random draw is quantised to what the record stores before it is used (levels as float32, fill centres as
uint16 fractions), so a rendered view never depends on more than its record.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import simplejpeg

from data_pipes.image.augment.policies import RandAugmentConfig, randaugment_ops, randaugment_style
from data_pipes.image.augment.policy_ops import RANDOM_INTERPOLATIONS, PolicyOp, cv2_interpolation, sample_magnitude
from data_pipes.image.decode import Box, crop_resize, open_image, random_resized_box

NO_OP = 255  # a RandAugment layer that applied nothing (its apply-probability missed, or TF's identity branch)
_CENTRE_SCALE = 65535  # Cutout centres are stored as uint16 fractions of the image side


@dataclass(frozen=True)
class ViewRecipe:
    """How the views of one distillation source are made (`kd.sources.<name>.aug` + the view size).

    Supported: Inception crop (scale, ratio, interpolation), horizontal flip, RandAugment (TF or timm flavour) and
    mixup with a partner image of the same source (`mixup_alpha` > 0: ratio ~ Beta(alpha, alpha), alpha 1 being the
    "extreme", uniform mixup of Patient Teacher; `mixup_fold` takes max(ratio, 1 - ratio) as big_vision does), then a
    JPEG round-trip at `jpeg_quality` (None: none). Other augmentations are not replayable and are refused.
    """

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    interpolation: str
    hflip: float
    randaugment: RandAugmentConfig | None
    mixup_alpha: float
    mixup_fold: bool
    jpeg_quality: int | None

    @classmethod
    def from_config(cls, size: int, aug: Mapping[str, Any], *, jpeg_quality: int | None,
                    mixup_fold: bool) -> ViewRecipe:
        """From a `conf/aug` recipe (`train:` and `mixup:`), as the kd sources name them."""
        train, mixup = dict(aug["train"]), dict(aug.get("mixup") or {})
        unsupported = [k for k in ("autoaugment", "color_jitter", "random_erasing") if train.get(k) is not None]
        if float(mixup.get("cutmix_alpha", 0) or 0) > 0:
            unsupported.append("mixup.cutmix_alpha")
        if train.get("interpolation") == "random":
            unsupported.append("interpolation: random")
        if unsupported:
            raise ValueError(f"a distillation source's views must be replayable from stored parameters; "
                             f"{', '.join(unsupported)} is not (supported: Inception crop, flip, RandAugment, mixup "
                             f"with a partner). Remove it from the source's aug recipe.")
        ra = train.get("randaugment")
        ra_cfg = None if ra is None else RandAugmentConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                                for k, v in dict(ra).items()})
        if ra_cfg is not None and ra_cfg.num_ops == 0:
            ra_cfg = None
        alpha = float(mixup.get("mixup_alpha", 0) or 0) if float(mixup.get("prob", 1.0)) > 0 else 0.0
        if alpha > 0 and float(mixup.get("prob", 1.0)) != 1.0:
            raise ValueError("a distillation source mixes every view or none: set its mixup.prob to 1.0 or 0")
        if jpeg_quality is not None and not 1 <= int(jpeg_quality) <= 100:
            raise ValueError(f"kd.jpeg_quality must be in 1..100 or null, got {jpeg_quality}")
        return cls(size=int(size), scale=tuple(map(float, train["scale"])), ratio=tuple(map(float, train["ratio"])),
                   interpolation=str(train["interpolation"]), hflip=float(train["hflip"]), randaugment=ra_cfg,
                   mixup_alpha=alpha, mixup_fold=bool(mixup_fold),
                   jpeg_quality=None if jpeg_quality is None else int(jpeg_quality))

    @property
    def layers(self) -> int:
        return 0 if self.randaugment is None else self.randaugment.num_ops

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0

    @property
    def dtype(self) -> np.dtype:
        """The record of one view (about 40 bytes, 80 with a partner; the labels are stored beside it)."""
        image = [("box", "<u2", (4,)), ("flip", "u1")]
        if self.layers:
            image += [("op", "u1", (self.layers,)), ("level", "<f4", (self.layers,)), ("sign", "i1", (self.layers,)),
                      ("centre", "<u2", (self.layers, 2)), ("resample", "u1", (self.layers,))]
        fields: list[tuple] = [("a", np.dtype(image))]
        if self.mixes:
            fields += [("partner", "<i4"), ("b", np.dtype(image)), ("lam", "<f4")]
        fields.append(("quality", "u1"))
        return np.dtype(fields)

    def ops(self) -> tuple[PolicyOp, ...]:
        return _policy_ops(self.randaugment, self.interpolation)

    # ------------------------------------------------------------------------------------------------ drawing

    def draw(self, rng: np.random.Generator, geometry: tuple[int, int], partner: int = -1,
             partner_geometry: tuple[int, int] | None = None) -> np.void:
        """One view's record for a source image of `geometry` (width, height); with mixup, `partner` is the
        member index of the image it is mixed with and `partner_geometry` its size."""
        record = np.zeros((), dtype=self.dtype)
        ops = self.ops()
        self._draw_image(record["a"], rng, geometry, ops)
        if self.mixes:
            if partner < 0 or partner_geometry is None:
                raise ValueError("a mixup view needs its partner's member index and geometry")
            record["partner"] = partner
            self._draw_image(record["b"], rng, partner_geometry, ops)
            lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
            record["lam"] = max(lam, 1.0 - lam) if self.mixup_fold else lam
        record["quality"] = self.jpeg_quality or 0
        return record[()]

    def _draw_image(self, rec: np.ndarray, rng: np.random.Generator, geometry: tuple[int, int],
                    ops: tuple[PolicyOp, ...]) -> None:
        width, height = geometry
        if max(width, height) > np.iinfo(np.uint16).max:
            raise ValueError(f"source image of {width}x{height} is larger than a view record can address (65535)")
        box = random_resized_box(width, height, self.scale, self.ratio, rng)
        rec["box"] = (int(box.left), int(box.top), int(box.width), int(box.height))
        rec["flip"] = rng.random() < self.hflip
        if not ops:
            return
        cfg = self.randaugment
        choices = len(ops) + (1 if cfg.flavor == "tf" else 0)  # TF's switch_case has an identity branch
        for layer in range(cfg.num_ops):
            applies = rng.random() < cfg.prob
            choice = int(rng.integers(choices))
            op = ops[choice] if applies and choice < len(ops) else None
            rec["op"][layer] = NO_OP if op is None else choice
            if op is None:
                continue
            rec["level"][layer] = np.float32(sample_magnitude(op, rng) / op.style.full_scale)
            rec["sign"][layer] = 1 if rng.random() < 0.5 else -1
            rec["centre"][layer] = np.floor(rng.random(2) * _CENTRE_SCALE)
            rec["resample"][layer] = int(rng.integers(2)) if op.style.interpolation == "random" else 0

    # ---------------------------------------------------------------------------------------------- rendering

    def render(self, record: np.void, data: bytes, partner_data: bytes | None = None) -> np.ndarray:
        """The view's pixels: uint8 [size, size, 3] RGB, exactly as the record describes them."""
        return self.render_encoded(record, data, partner_data)[0]

    def render_encoded(self, record: np.void, data: bytes,
                       partner_data: bytes | None = None) -> tuple[np.ndarray, bytes | None]:
        """The view and, when it is JPEG round-tripped, the JPEG bytes it decodes from (what `pixels` storage
        keeps: storing the view re-encoded would change its pixels once more)."""
        ops = self.ops()
        view = self._render_image(record["a"], data, ops)
        if self.mixes:
            if partner_data is None:
                raise ValueError("a mixup view needs its partner's bytes")
            other = self._render_image(record["b"], partner_data, ops)
            view = blend(view, other, np.float32(record["lam"]))
        quality = int(record["quality"])
        if not quality:
            return view, None
        encoded = jpeg_encode(view, quality)
        return simplejpeg.decode_jpeg(encoded, "RGB"), encoded

    def _render_image(self, rec: np.void, data: bytes, ops: tuple[PolicyOp, ...]) -> np.ndarray:
        left, top, width, height = (int(v) for v in rec["box"])
        img = crop_resize(open_image(data), Box(left, top, width, height), self.size, self.interpolation)
        if rec["flip"]:
            img = cv2.flip(img, 1)  # the same pixels as img[:, ::-1], without a strided copy
        return self.augment(img, rec, ops)

    def augment(self, img: np.ndarray, rec: np.void, ops: tuple[PolicyOp, ...] | None = None) -> np.ndarray:
        """The RandAugment layers of one image's record (`rec`: record["a"] or ["b"]) applied to its crop."""
        ops = self.ops() if ops is None else ops
        for layer in range(self.layers):
            choice = int(rec["op"][layer])
            if choice == NO_OP:
                continue
            op = ops[choice]
            resample = RANDOM_INTERPOLATIONS[int(rec["resample"][layer])] if op.style.interpolation == "random" \
                else op.style.interpolation
            img = op.apply(img, level=float(rec["level"][layer]), sign=float(rec["sign"][layer]),
                           resample=cv2_interpolation(resample),
                           center=tuple(float(c) / _CENTRE_SCALE for c in rec["centre"][layer]))
        return np.ascontiguousarray(img)


@functools.lru_cache(maxsize=32)
def _policy_ops(randaugment: RandAugmentConfig | None, interpolation: str) -> tuple[PolicyOp, ...]:
    """The RandAugment ops of a recipe, built once per process (building albumentations transforms costs more
    than applying them); their randomness is unused here: every argument comes from the view's record."""
    if randaugment is None:
        return ()
    style, upper = randaugment_style(randaugment, interpolation)
    return tuple(PolicyOp(op, randaugment.magnitude, style, randaugment.magnitude_std, upper)
                 for op in randaugment_ops(randaugment))


def blend(view: np.ndarray, other: np.ndarray, lam: np.float32) -> np.ndarray:
    """rint(view * lam + other * (1 - lam)) in float32, as uint8: the mixup of two views.

    Plain IEEE float32 products and sums (numpy's ufuncs never fuse them into an FMA), so every machine renders the
    same pixels; OpenCV's addWeighted would be faster but rounds differently where its SIMD path fuses. No clip: a
    convex combination of values in [0, 255] rounds into [0, 255]."""
    if not 0 <= lam <= 1:
        raise ValueError(f"a mixup ratio must be in [0, 1], got {lam} (a damaged view record?)")
    mixed = view.astype(np.float32)
    mixed *= lam
    scaled = other.astype(np.float32)
    scaled *= np.float32(1) - lam
    mixed += scaled
    return np.rint(mixed, out=mixed).astype(np.uint8)


def jpeg_encode(view: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a view (libjpeg-turbo, 4:2:0): the MNv4 recipe's round-trip before the teacher sees it."""
    return simplejpeg.encode_jpeg(np.ascontiguousarray(view), quality=quality, colorspace="RGB",
                                  colorsubsampling="420")


def checksum(view: np.ndarray) -> str:
    """A short fingerprint of a view's pixels (and shape)."""
    digest = hashlib.blake2b(np.ascontiguousarray(view).tobytes(), digest_size=8)
    digest.update(repr(view.shape).encode())
    return digest.hexdigest()
