"""data_pipes.image.augment and conf/aug/*.yaml: every recipe builds and runs on real photos, policies behave as
configured, transforms pickle, and DataLoader workers draw different augmentations."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data_pipes.image.augment import (
    PolicyOp,
    RandAugmentConfig,
    TrainTransform,
    build_eval_transform,
    build_train_transform,
    policies,
    policy_ops,
    randaugment_ops,
)

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "conf" / "aug").glob("*.yaml"))
# conf/aug/inception.yaml's crop and flip, for tests that vary only the policies.
INCEPTION = {**{k: v for k, v in OmegaConf.load(REPO / "conf" / "aug" / "inception.yaml").train.items()
                if k in ("scale", "ratio", "hflip", "interpolation")}, "dct_reduce": True}


@pytest.fixture(scope="module")
def photos(imagenette_root) -> dict[str, bytes]:
    """One colour and one grayscale real JPEG."""
    files = sorted((imagenette_root / "train").glob("*/*.JPEG"))
    colour = files[0].read_bytes()
    gray = next(f.read_bytes() for f in files if _mode(f) == "L")
    return {"colour": colour, "gray": gray}


def _mode(path: Path) -> str:
    with Image.open(path) as img:
        return img.mode


def _jpeg(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    buf = io.BytesIO()
    coarse.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sample() -> bytes:
    return _jpeg(320, 240)


def test_every_recipe_file_says_where_it_comes_from_and_how_to_select_it():
    assert len(RECIPES) >= 13
    for path in RECIPES:
        header = path.read_text().split("\ntrain:")[0]
        assert header.startswith("# "), path.name
        assert f"python -m train aug={path.stem}" in header, path.name
        assert "Source" in header, path.name


@pytest.mark.imagenette
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_transforms_real_colour_and_grayscale_photos(recipe, photos):
    cfg = OmegaConf.load(recipe)
    transform = build_train_transform(img_size=224, **cfg.train, dct_reduce=True)
    torch.manual_seed(0)
    for data in photos.values():
        out = transform(data)
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8
        assert out.flags.writeable and out.flags.c_contiguous
        assert out.std() > 1.0  # an image, not a constant fill


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_mixup_keys_are_accepted_by_timm_mixup(recipe):
    cfg = OmegaConf.load(recipe)
    mixup = timm.data.Mixup(**cfg.mixup, label_smoothing=0.1, num_classes=10)
    if cfg.mixup.mixup_alpha == 0 and cfg.mixup.cutmix_alpha == 0:
        return  # the consumer leaves mixup off
    x, target = torch.rand(4, 3, 32, 32), torch.arange(4)
    mixed, soft = mixup(x.clone(), target)
    assert mixed.shape == x.shape and soft.shape == (4, 10)
    assert torch.allclose(soft.sum(1), torch.ones(4))


def test_mnv4_large_recipes_mix_30_percent_of_batches_as_in_the_paper():
    for name in ("mnv4_conv_l", "mnv4_hybrid_l"):
        mixup = OmegaConf.load(REPO / "conf" / "aug" / f"{name}.yaml").mixup
        assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.prob, mixup.switch_prob) == (0.8, 1.0, 0.3, 0.5)


def test_eval_transform_equals_pil_resize_then_center_crop(sample):
    big = Image.open(io.BytesIO(_jpeg(1999, 1333))).convert("RGB")
    for img in (Image.open(io.BytesIO(sample)).convert("RGB"), big):
        buf = io.BytesIO()
        img.save(buf, "PNG")  # lossless, so the reference decodes the same pixels
        out = build_eval_transform(224, crop_pct=0.875, interpolation="bilinear", dct_reduce=False)(buf.getvalue())
        w, h = img.size
        short = int(224 / 0.875)
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        left, top = int(round((size[0] - 224) / 2)), int(round((size[1] - 224) / 2))
        ref = np.asarray(img.resize(size, Image.BILINEAR).crop((left, top, left + 224, top + 224)), dtype=int)
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - ref).mean() < 0.5
        # A crop 8 px off centre would differ by far more than that.
        shifted = np.asarray(img.resize(size, Image.BILINEAR).crop((left + 8, top, left + 232, top + 224)), dtype=int)
        assert np.abs(out.astype(int) - shifted).mean() > 5 * np.abs(out.astype(int) - ref).mean() + 1


def test_eval_transform_with_dct_reduction_stays_close_to_the_full_decode():
    data = _jpeg(2400, 1800)
    reduced = build_eval_transform(224, 0.875, "bicubic", dct_reduce=True)(data).astype(int)
    full = build_eval_transform(224, 0.875, "bicubic", dct_reduce=False)(data).astype(int)
    assert np.abs(reduced - full).mean() < 1.5


def _no_crop(**kw) -> TrainTransform:
    return build_train_transform(224, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), hflip=0.0, interpolation="bilinear",
                                 **{"dct_reduce": True, **kw})


def test_randaugment_with_prob_zero_is_identity_after_crop(sample):
    plain = _no_crop()
    ra0 = _no_crop(randaugment={"num_ops": 3, "magnitude": 15, "prob": 0.0})
    for seed in range(5):
        torch.manual_seed(seed)
        expected = plain(sample)
        torch.manual_seed(seed)
        assert np.array_equal(ra0(sample), expected)


def test_randaugment_with_prob_one_changes_the_image(sample):
    base = _no_crop()(sample)
    ra1 = _no_crop(randaugment={"num_ops": 2, "magnitude": 9, "prob": 1.0, "exclude": ["Cutout"]})
    torch.manual_seed(0)
    changed = sum(not np.array_equal(ra1(sample), base) for _ in range(20))
    # TF RandAugment keeps an identity choice per layer (1/16 each), so a few draws may pass unchanged.
    assert changed >= 16


def test_excluded_randaugment_ops_are_never_chosen(sample, monkeypatch):
    chosen: list[str] = []
    original = PolicyOp.apply

    def recording_apply(self, img, **params):
        chosen.append(self.op)
        return original(self, img, **params)

    monkeypatch.setattr(PolicyOp, "apply", recording_apply)
    excluded = {"Cutout", "Invert", "Solarize", "Rotate"}
    transform = _no_crop(randaugment={"num_ops": 2, "magnitude": 9, "prob": 1.0, "exclude": sorted(excluded)})
    torch.manual_seed(0)
    for _ in range(150):
        transform(sample)
    allowed = set(policies.TF_RANDAUGMENT_OPS) - excluded
    assert set(chosen) <= allowed
    assert len(set(chosen)) >= len(allowed) - 1  # the rest are really drawn


def test_randaugment_layers_draw_their_ops_independently(sample, monkeypatch):
    # albumentations' Compose(seed=...) would give both layers identical generators, so they would always agree.
    per_call: list[str] = []
    original = PolicyOp.apply

    def recording_apply(self, img, **params):
        per_call.append(self.op)
        return original(self, img, **params)

    monkeypatch.setattr(PolicyOp, "apply", recording_apply)
    transform = _no_crop(randaugment={"num_ops": 2, "magnitude": 5, "prob": 1.0, "flavor": "timm"})
    torch.manual_seed(0)
    pairs = []
    for _ in range(60):
        per_call.clear()
        transform(sample)
        pairs.append(tuple(per_call))
    assert all(len(pair) == 2 for pair in pairs)  # timm flavour: no identity choice, prob 1
    assert sum(a != b for a, b in pairs) >= 45


def test_randaugment_config_rejects_unknown_ops_and_keys():
    with pytest.raises(ValueError, match="unknown ops"):
        build_train_transform(224, **INCEPTION, randaugment={"exclude": ["Cutuot"]})
    with pytest.raises(ValueError, match="unknown keys"):
        build_train_transform(224, **INCEPTION, randaugment={"num_layers": 2})
    with pytest.raises(ValueError, match="not both"):
        build_train_transform(224, **INCEPTION, randaugment={}, autoaugment="imagenet")


def test_tf_magnitude_15_extends_the_op_ranges_linearly():
    style = policy_ops.OpStyle("tf", 10.0, (128, 128, 128), "nearest", translate_const=10.0, cutout_const=40.0)
    args = {op: fn(1.5, 1.0, style, (256, 256), 0) for op, fn in policy_ops._ARGUMENTS.items()}
    assert args["Rotate"] == pytest.approx(45.0)
    assert args["ShearX"] == pytest.approx(0.45)
    assert args["TranslateX"] == pytest.approx(15.0)
    assert args["Color"] == pytest.approx(2.8)
    assert args["Posterize"] == 6 and args["Solarize"] == 384 and args["SolarizeAdd"] == 165


def test_timm_flavor_clips_magnitude_at_10_and_tf_does_not():
    tf_ra = policies.build_randaugment(RandAugmentConfig(magnitude=15, flavor="tf"), "bilinear")
    timm_ra = policies.build_randaugment(RandAugmentConfig(magnitude=15, flavor="timm"), "bilinear")
    tf_op = tf_ra.transforms[0].transforms[0]
    timm_op = timm_ra.transforms[0].transforms[0]
    assert tf_op._sample_magnitude() == 15.0
    assert timm_op._sample_magnitude() == 10.0


def test_randaugment_op_lists_follow_tf_and_timm():
    assert len(randaugment_ops(RandAugmentConfig(flavor="tf"))) == 16
    assert "Cutout" not in randaugment_ops(RandAugmentConfig(flavor="tf", exclude=("Cutout",)))
    assert len(randaugment_ops(RandAugmentConfig(flavor="timm"))) == 15


def test_autoaugment_policy_tables_match_torchvision_and_timm():
    from timm.data.auto_augment import auto_augment_policy_v0
    from torchvision.transforms import AutoAugment, AutoAugmentPolicy

    tv = AutoAugment(AutoAugmentPolicy.IMAGENET).policies
    assert [tuple(sub) for sub in tv] == [tuple(sub) for sub in policies._POLICY_IMAGENET]
    v0 = [[(op.name.replace("Rel", ""), op.prob, op.magnitude) for op in sub] for sub in auto_augment_policy_v0({})]
    assert v0 == [list(sub) for sub in policies._POLICY_V0]


def test_random_erasing_pixel_mode_fills_a_patch_with_noise(sample):
    base = _no_crop()(sample)
    erase = _no_crop(random_erasing={"prob": 1.0, "mode": "pixel"})
    torch.manual_seed(0)
    out = erase(sample)
    changed = np.any(out != base, axis=2)
    rows, cols = np.nonzero(changed)
    patch = out[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1].astype(float)
    area = patch.shape[0] * patch.shape[1] / (224 * 224)
    assert 0.02 * 0.9 <= area <= 1 / 3 * 1.1
    assert patch.std() > 30  # per-pixel noise, not a flat colour


def test_random_erasing_const_mode_fills_the_mean_colour(sample):
    erase = _no_crop(random_erasing={"prob": 1.0, "mode": "const"})
    torch.manual_seed(1)
    out = erase(sample)
    mean_colour = np.all(out == (124, 116, 104), axis=2)
    assert mean_colour.sum() >= 0.02 * 224 * 224 * 0.9


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_transforms_pickle_and_the_copy_draws_the_same_when_seeded(recipe, sample):
    transform = build_train_transform(img_size=96, **OmegaConf.load(recipe).train, dct_reduce=True)
    copy = pickle.loads(pickle.dumps(transform))
    torch.manual_seed(7)
    expected = [transform(sample) for _ in range(3)]
    torch.manual_seed(7)
    assert all(np.array_equal(copy(sample), e) for e in expected)
    evaluation = pickle.loads(pickle.dumps(build_eval_transform(96, 0.875, "bicubic", dct_reduce=True)))
    assert evaluation(sample).shape == (96, 96, 3)


def test_torch_seed_makes_augmentation_reproducible_as_the_stream_reseeds_per_batch(sample):
    transform = build_train_transform(128, **INCEPTION, randaugment={"magnitude": 9, "prob": 0.5})
    runs = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        runs.append([transform(sample) for _ in range(4)])
    assert all(np.array_equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(np.array_equal(a, b) for a, b in zip(runs[0], runs[2]))


class _SameBytes(Dataset):
    """Every item is the same image, so any difference between items comes from the augmentation RNG."""

    def __init__(self, data: bytes, transform):
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int):
        return torch.utils.data.get_worker_info().id, self.transform(self.data)


def _worker_outputs(transform, data: bytes) -> dict[int, list[np.ndarray]]:
    loader = DataLoader(_SameBytes(data, transform), batch_size=None, num_workers=2,
                        multiprocessing_context="fork")
    outputs: dict[int, list[np.ndarray]] = {0: [], 1: []}
    for worker, image in loader:
        outputs[worker].append(np.asarray(image))
    return outputs


def test_dataloader_workers_draw_different_crops_and_repeat_under_the_same_torch_seed(sample):
    transform = build_train_transform(128, **{**INCEPTION, "hflip": 0.0})
    transform(sample)  # used in the parent first: forked workers must still not continue its stream
    torch.manual_seed(1234)
    first = _worker_outputs(transform, sample)
    assert len(first[0]) == len(first[1]) == 4
    for a, b in zip(first[0], first[1]):
        assert not np.array_equal(a, b)
    torch.manual_seed(1234)
    again = _worker_outputs(transform, sample)
    for worker in (0, 1):
        assert all(np.array_equal(a, b) for a, b in zip(first[worker], again[worker]))


def test_policy_warps_give_albumentations_warp_affine_pixels_including_its_near_identity_shortcut():
    import cv2
    from albumentations.augmentations.geometric import functional as fgeometric

    from data_pipes.image.augment.policy_ops import _warp

    rng = np.random.default_rng(0)
    for i in range(60):
        img = rng.integers(0, 256, (int(rng.integers(16, 64)), int(rng.integers(16, 64)), 3), dtype=np.uint8)
        inverse = np.eye(3)
        kind = i % 4
        if kind == 0:
            inverse[:2] = cv2.getRotationMatrix2D((img.shape[1] / 2, img.shape[0] / 2), float(rng.normal() * 30), 1.0)
        elif kind == 1:
            inverse[0, 1] = rng.normal() * 0.3
            inverse[0, 2] = 0.5 * inverse[0, 1]
        elif kind == 2:
            inverse[1, 2] = rng.normal() * 10
        else:
            inverse[0, 1] = 1e-9  # inside np.allclose's tolerance: both return the image untouched
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        interp = (cv2.INTER_LINEAR, cv2.INTER_NEAREST, cv2.INTER_CUBIC)[i % 3]
        expected = fgeometric.warp_affine(img, inverse, interp | cv2.WARP_INVERSE_MAP, fill, cv2.BORDER_CONSTANT,
                                          img.shape[:2])
        got = _warp(img, inverse, fill, interp)
        assert np.array_equal(got, expected), (i, kind)
        assert (got is img) == (kind == 3)
