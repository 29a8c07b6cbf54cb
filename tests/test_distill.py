"""Distillation (the MNv4 recipe): replayable views, exact source mixing, built kd sets, and distill=true runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CPU_RUN, compose_run
from omegaconf import OmegaConf
from preemption import PreemptAt, Preemption
from safetensors.torch import load_file

from data_pipes.image.decode import open_image
from data_pipes.image.views import ViewRecipe, blend, checksum
from data_pipes.shards.make import make_shards
from data_pipes.shards.metadata import read_info
from data_pipes.stream.members import Members
from data_pipes.stream.mixture import (
    MixtureStream,
    Rendered,
    SourceReader,
    batch_counts,
    integer_weights,
)
from distill.build import build as build_sets
from distill.kdset import KDSetError, dequantize, read_block
from distill.objectives import dense_targets
from distill.reader import KDSets
from distill.render import BlockWriter
from distill.select import Selection, balance, missing_scores, score
from distill.sources import build_teacher, source_configs
from distill.teacher import load_teacher, resolve_device
from train.builders import labels_only
from train.features import KnowledgeDistillation
from train.run import train

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
              pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
              pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined"),
              pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")]


def aug(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "aug" / f"{name}.yaml"))


@pytest.fixture(scope="module")
def teacher(trained_teacher) -> Path:
    return trained_teacher


def kd_overrides(shards: Path, teacher: Path, sets: Path | None, *extra: str) -> list[str]:
    return ["data.num_workers=2", f"data.root={shards}", f"kd.teacher={teacher}", f"kd.sets={sets or 'null'}",
            "kd.sources.d1.replicas=2", "kd.sources.d2.replicas=3", "kd.build.num_workers=1", "kd.build.batch_size=40",
            "kd.view_size=48", *extra]


def build(shards, teacher, sets, *extra, **kw) -> Path:
    return build_sets(compose_run(*kd_overrides(shards, teacher, sets, *extra)), **kw)


# ------------------------------------------------------------------------------------------------ views


@pytest.mark.parametrize("recipe", ["kd_d1_randaug_l2m9", "kd_d2_extreme_mixup", "kd_d3_randaug_l2m5"])
def test_a_view_rendered_again_from_its_record_has_the_same_pixels(recipe, imagenette_root):
    files = sorted((imagenette_root / "train").glob("*/*.JPEG"))[:12]
    data = [f.read_bytes() for f in files]
    views = ViewRecipe.from_config(96, aug(recipe), jpeg_quality=95, mixup_fold=True)
    rng = np.random.default_rng(0)
    seen = set()
    for i, d in enumerate(data):
        partner = (i + 1) % len(data)
        a, b = open_image(d), open_image(data[partner])
        record = views.draw(rng, (a.width, a.height), partner, (b.width, b.height))
        stored = np.frombuffer(record.tobytes(), dtype=views.dtype)[0]  # through bytes, as the sets keep it
        first, second = views.render(record, d, data[partner]), views.render(stored, d, data[partner])
        assert first.shape == (96, 96, 3) and np.array_equal(first, second)
        seen.add(checksum(first))
    assert len(seen) == len(data)  # views differ from image to image
    assert views.dtype.itemsize <= 40  # parameters of a view: tens of bytes, not kilobytes


def test_mixup_blend_is_the_float32_formula_for_every_pixel_pair_and_refuses_ratios_outside_0_1():
    # every (a, b) pair of uint8 values, against the formula written out in numpy (clipped and rounded)
    a = np.repeat(np.arange(256, dtype=np.uint8), 256).reshape(256, 256, 1).repeat(3, axis=2)
    b = np.tile(np.arange(256, dtype=np.uint8), 256).reshape(256, 256, 1).repeat(3, axis=2)
    ratios = [0.0, 1.0, 0.5, 0.25, 1 / 3, *np.random.default_rng(0).random(40)]
    for lam in map(np.float32, ratios):
        expected = np.clip(np.rint(a.astype(np.float32) * lam + b.astype(np.float32) * (np.float32(1) - lam)), 0, 255)
        assert np.array_equal(blend(a, b, lam), expected.astype(np.uint8)), lam
    with pytest.raises(ValueError, match="mixup ratio"):
        blend(a, b, np.float32(1.5))


def test_recipes_that_cannot_be_replayed_are_refused():
    with pytest.raises(ValueError, match="replayable"):
        ViewRecipe.from_config(64, aug("mnv3_timm"), jpeg_quality=95, mixup_fold=True)


# ------------------------------------------------------------------------------------------------ mixing


def test_batches_hold_exactly_b_w_over_sum_w_of_each_source_and_the_long_run_ratio_is_exact():
    assert integer_weights([1, 1, 2]) == (1, 1, 2) and integer_weights([0.25, 0.75]) == (1, 3)
    for g in range(50):
        assert batch_counts((1, 1, 2), 64, g) == [16, 16, 32]
    # B = 10 cannot split 1:1:2 evenly: counts differ by at most one, and the remainders are carried.
    counts = np.array([batch_counts((1, 1, 2), 10, g) for g in range(400)])
    assert (counts.sum(axis=1) == 10).all() and np.ptp(counts, axis=0).max() <= 1
    assert counts.sum(axis=0).tolist() == [1000, 1000, 2000]


class _Labels:
    """A ViewSource stand-in that returns each member's index as its 'view', to count who was sampled."""

    labelled = True

    def __init__(self, n: int) -> None:
        self.reader = SourceReader(Members([("unused", n)]))

    def render(self, items):
        return [Rendered(np.full((4, 4, 3), it.member % 256, np.uint8), it.member, f"{it.source}:{it.member}")
                for it in items]


def stream(rank: int, world: int, batches: int = 30) -> MixtureStream:
    return MixtureStream([_Labels(50), _Labels(70), _Labels(90)], names=["d1", "d2", "d3"], weights=[1, 1, 2],
                         batch_size=8, batches_per_epoch=batches, seed=1, shuffle_window=16, rank=rank,
                         world_size=world, student_size=4, student_interpolation="bilinear", hflip=0.5)


def test_mixed_stream_sees_each_member_once_per_pass_and_ranks_get_disjoint_shares():
    keys = {r: [k for b in range(30) for k in stream(r, 2).build_batch(0, b)["key"]] for r in (0, 1)}
    for r in (0, 1):
        batches = [stream(r, 2).build_batch(0, b) for b in range(30)]
        assert all((b["source"] == 0).sum() == 2 and (b["source"] == 2).sum() == 4 for b in batches)
    d1 = {r: [k for k in keys[r] if k.startswith("0:")] for r in (0, 1)}
    # 60 d1 samples per rank over 25-member passes: every member of the rank's share once per pass.
    assert len(set(d1[0][:25])) == 25 and not set(d1[0][:25]) & set(d1[1][:25])


def test_mixed_stream_resumed_mid_epoch_continues_with_the_same_batches():
    full = [b["key"] for b in iter_stream(stream(0, 1), 0, 0)]
    resumed = [b["key"] for b in iter_stream(stream(0, 1), 0, 11)]
    assert resumed == full[11:]
    # Epoch 1 continues each source where epoch 0 left it (a pass is not restarted each epoch).
    assert [b["key"] for b in iter_stream(stream(0, 1, batches=60), 0, 30)] == \
        [b["key"] for b in iter_stream(stream(0, 1, batches=30), 1, 0)]


def iter_stream(s: MixtureStream, epoch: int, start: int):
    s.set_position(epoch, start)
    return list(iter(s))


def test_stored_top_k_becomes_a_distribution_with_the_missing_mass_spread_or_renormalised():
    ids = torch.tensor([[3, 1]])
    probs = torch.tensor([[0.5, 0.3]])
    uniform = dense_targets(ids, probs, 5, "uniform")
    assert torch.allclose(uniform, torch.tensor([[0.2 / 3, 0.3, 0.2 / 3, 0.5, 0.2 / 3]]))
    assert torch.allclose(dense_targets(ids, probs, 5, "renormalize").sum(), torch.tensor(1.0))


# ------------------------------------------------------------------------------------------------ built sets


@pytest.fixture(scope="module")
def built(tmp_path_factory, synthetic_shards, teacher) -> Path:
    return build(synthetic_shards, teacher, tmp_path_factory.mktemp("kd") / "sets")


def test_built_sets_hold_every_view_with_integer_ids_and_probabilities_summing_to_at_most_one(built,
                                                                                              synthetic_shards):
    manifest = json.loads((built / "manifest.json").read_text())
    n = read_info(synthetic_shards).split("train").num_samples
    assert manifest["counts"]["d1"]["views"] == 2 * n and manifest["counts"]["d2"]["views"] == 3 * n
    assert manifest["counts"]["d1"]["bytes_per_view"] < 100
    for name, replicas in (("d1", 2), ("d2", 3)):
        blocks = [read_block(built / name, k) for k in range(len(read_info(synthetic_shards).shards("train")))]
        assert all(b.shape[0] == replicas for b in blocks) and sum(b.shape[1] for b in blocks) == n
        records = np.concatenate([b.reshape(-1) for b in blocks])
        assert records["ids"].dtype.kind in "ui"
        total = dequantize(records["probs"]).sum(axis=1)
        assert (total <= 1.0 + 1e-6).all() and (total > 0.5).all()
    d2 = np.concatenate([read_block(built / "d2", k).reshape(-1) for k in range(2)])
    lam = d2["view"]["lam"]
    assert lam.min() >= 0.5 and lam.max() <= 1.0 and 0.65 < lam.mean() < 0.85  # U(0.5, 1): folded Beta(1, 1)


def test_a_killed_build_resumes_and_ends_identical_to_an_uninterrupted_one(tmp_path, synthetic_shards, teacher,
                                                                         built):
    sets = tmp_path / "sets"
    build(synthetic_shards, teacher, sets, stop_after=3)
    assert not (sets / "manifest.json").exists()
    with pytest.raises(KDSetError, match="partly built"):
        cfg = compose_run(*kd_overrides(synthetic_shards, teacher, sets))
        kd = OmegaConf.to_container(cfg.kd, resolve=True)
        info = read_info(synthetic_shards)
        KDSets.open(sets, kd=kd, sources=source_configs(kd, 48), teacher=build_teacher(kd, info),
                    label_names=info.label_names)
    build(synthetic_shards, teacher, sets)
    for name in ("d1", "d2"):
        for path in sorted((built / name).glob("block-*.npy")):
            assert np.array_equal(np.load(path), np.load(sets / name / path.name)), path


def test_a_build_killed_inside_a_block_resumes_there_and_ends_identical(tmp_path, synthetic_shards, teacher, built,
                                                                         monkeypatch):
    monkeypatch.setattr("distill.render.FLUSH_VIEWS", 40)  # durable every 40 views (a chunk is 40 here)
    finish = BlockWriter._finish
    finished = []

    def killed_in_the_second_block(self):
        if finished:
            raise KeyboardInterrupt  # the process dies with the block's last views written but not its files
        finished.append(self.block)
        finish(self)

    monkeypatch.setattr(BlockWriter, "_finish", killed_in_the_second_block)
    sets = tmp_path / "sets"
    with pytest.raises(KeyboardInterrupt):
        build(synthetic_shards, teacher, sets)
    partial = [p for p in sets.rglob("block-*.progress.json")]
    assert len(partial) == 1 and json.loads(partial[0].read_text())["views"] > 0
    monkeypatch.setattr(BlockWriter, "_finish", finish)
    build(synthetic_shards, teacher, sets)
    assert not list(sets.rglob("*.partial")) and not list(sets.rglob("*.progress.json"))
    for name in ("d1", "d2"):
        for path in sorted((built / name).glob("block-*.npy")):
            assert np.array_equal(np.load(path), np.load(sets / name / path.name)), path


def test_training_refuses_sets_built_for_another_recipe_or_with_other_pixels(tmp_path, built, synthetic_shards,
                                                                            teacher):
    with pytest.raises(KDSetError, match="recipe"):
        train(compose_run(*kd_overrides(synthetic_shards, teacher, built, "kd.jpeg_quality=80", "distill=true",
                                        f"run_dir={tmp_path / 'a'}")))
    tampered = tmp_path / "sets"

    shutil.copytree(built, tampered)
    check = tampered / "d1" / "block-000000.check.json"
    sums = json.loads(check.read_text())
    check.write_text(json.dumps({k: "0" * 16 for k in sums}))
    with pytest.raises(KDSetError, match="other pixels"):
        train(compose_run(*kd_overrides(synthetic_shards, teacher, tampered, "distill=true",
                                        f"run_dir={tmp_path / 'b'}")))


def test_replay_reproduces_the_pixels_the_teacher_labelled(built, synthetic_shards, teacher):
    cfg = compose_run(*kd_overrides(synthetic_shards, teacher, built))
    kd = OmegaConf.to_container(cfg.kd, resolve=True)
    info = read_info(synthetic_shards)
    sets = KDSets.open(built, kd=kd, sources=source_configs(kd, 48), teacher=build_teacher(kd, info),
                       label_names=info.label_names, check=False)
    sets.check_pixels(source_configs(kd, 48))  # raises on any difference
    assert sources_blocks_cover(info)


def sources_blocks_cover(info) -> bool:
    members = Members(info.shards("train"))
    return sum(members.block_size(k) for k in range(members.num_blocks)) == info.split("train").num_samples


# ------------------------------------------------------------------------------------------------ runs


def teacher_state(export: Path) -> dict[str, torch.Tensor]:

    return load_file(str(export / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["offline", "online", "logit", "offline_d3", "online_d3"])
def test_distill_true_trains_exports_and_keeps_the_teacher_out_of_checkpoints(mode, tmp_path, request,
                                                                              synthetic_shards, teacher):
    d3 = [f"kd.extra_root={synthetic_shards}", *D3]
    extra = {"offline": [], "online": [], "logit": ["kd=logit"], "offline_d3": d3, "online_d3": d3}[mode]
    sets = {"offline": "built", "offline_d3": "built_d3"}.get(mode)
    sets = request.getfixturevalue(sets) if sets else None
    run_dir = tmp_path / mode
    before = {k: v.clone() for k, v in teacher_state(teacher).items()}
    metrics = train(compose_run(*kd_overrides(synthetic_shards, teacher, sets, "distill=true", *extra,
                                              f"run_dir={run_dir}", "data.batch_size=20", "trainer.max_epochs=1",
                                              "trainer.log_every_n_steps=1")))
    assert "val/teacher_agree" in metrics and "val/teacher_acc1" in metrics and metrics["export/top1"] >= 0
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(k.startswith("model.") or k.startswith("val_acc") for k in ckpt["state_dict"])
    assert len([k for k in ckpt["state_dict"] if k.startswith("model.")]) == len(before)  # the student's only
    logged = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/teacher_agree" in logged
    if mode in ("offline", "online"):
        assert "train/loss_d1" in logged and "train/loss_d2" in logged
    if mode.endswith("d3"):
        assert "train/loss_d1" in logged and "train/loss_d3" in logged
    if mode == "online_d3":  # the selection was made before training and kept with the run
        assert (run_dir / "kd_selection" / "selection" / "ends.npy").is_file()
    # The teacher was not trained, nor were its BatchNorm statistics moved by being run in train mode.

    reloaded = load_teacher(str(teacher))
    assert all(torch.equal(v, reloaded.model.state_dict()[k]) for k, v in before.items())


# ------------------------------------------------------------------------------------------------ D3


def test_class_balancing_keeps_the_most_confident_and_repeats_rare_classes_up_to_per_class():
    rng = np.random.default_rng(0)
    # Deliberately unbalanced: class 0 has 60 confident images, class 1 three, class 2 only unconfident ones,
    # class 3 none at all; one image could not be read (confidence -1).
    top = np.array([0] * 60 + [1] * 3 + [2] * 20 + [1], np.int32)
    conf = np.concatenate([rng.uniform(0.4, 1.0, 60), [0.9, 0.5, 0.31], rng.uniform(0.0, 0.29, 20), [-1.0]])
    images, repeats, image_classes, counts = balance(top, conf, num_classes=4, threshold=0.3, per_class=10)
    members, classes = np.repeat(images, repeats), np.repeat(image_classes, repeats)
    assert counts["passed"] == [60, 3, 0, 0] and counts["kept"] == [10, 3, 0, 0]
    assert counts["after"] == [10, 10, 0, 0] and counts["assigned"] == [60, 3, 20, 0]
    assert len(members) == 20 and np.all(np.diff(images) > 0)
    assert set(members[classes == 0]) == set(np.argsort(-conf[:60])[:10])  # the ten most confident of class 0
    repeats = np.bincount(members[classes == 1], minlength=64)[60:63]
    assert sorted(repeats.tolist()) == [3, 3, 4] and repeats[0] == 4  # the most confident is repeated once more


@pytest.fixture(scope="module")
def built_d3(tmp_path_factory, synthetic_shards, teacher) -> Path:
    sets = tmp_path_factory.mktemp("kd3") / "sets"
    return build(synthetic_shards, teacher, sets, f"kd.extra_root={synthetic_shards}", *D3)


D3 = ("kd.sources.d1.replicas=1", "kd.sources.d2.weight=0", "kd.sources.d3.replicas=2",
      "kd.sources.d3.per_class=8", "kd.sources.d3.threshold=0.0")


def test_d3_build_balances_the_extra_data_and_reports_counts_before_and_after(built_d3, synthetic_shards):
    d3 = built_d3 / "d3"
    manifest = json.loads((built_d3 / "manifest.json").read_text())
    report = manifest["d3_classes"]
    assert report["images"] == read_info(synthetic_shards).split("train").num_samples
    assert all(a == (8 if k else 0) for a, k in zip(report["after"], report["kept"]))
    assert (d3 / "class_counts.png").stat().st_size > 1000 and (d3 / "class_counts.json").is_file()
    selection = Selection.load(d3)
    members = np.repeat(np.load(d3 / "selection" / "images.npy"), np.diff(np.load(d3 / "selection" / "ends.npy"),
                                                                           prepend=0))
    assert np.array_equal(selection.members(read_info(synthetic_shards).shards("train")).samples(
        np.arange(len(members))), members)
    assert len(members) == sum(report["after"]) == manifest["counts"]["d3"]["members"]
    assert manifest["counts"]["d3"]["views"] == 2 * len(members)
    records = np.concatenate([read_block(d3, k) for k in range(manifest["counts"]["d3"]["blocks"])], axis=1)
    assert records.shape == (2, len(members))
    # A repeated image is its own member: its copies are other views with their own teacher labels.
    repeated = [i for i in range(1, len(members)) if members[i] == members[i - 1]]
    if repeated:
        i = repeated[0]
        assert records[0, i]["view"].tobytes() != records[0, i - 1]["view"].tobytes()


def test_d3_refuses_an_extra_source_where_no_image_passes_the_threshold(tmp_path, synthetic_shards, teacher):
    with pytest.raises(KDSetError, match=r"best top-class confidence is 0\.\d+"):
        build(synthetic_shards, teacher, tmp_path / "sets", f"kd.extra_root={synthetic_shards}", *D3[:-1],
              "kd.sources.d3.threshold=1.0")


def test_d3_refuses_an_empty_extra_source(tmp_path, synthetic_shards, teacher, synthetic_folder):


    empty = tmp_path / "extra"
    shutil.copytree(synthetic_folder / "val", empty / "val")  # shards with a val split but no train images
    make_shards(empty, tmp_path / "extra-shards", samples_per_shard=64, workers=1)
    with pytest.raises(KDSetError, match="no train samples"):
        build(synthetic_shards, teacher, tmp_path / "sets", *D3, f"kd.extra_root={tmp_path / 'extra-shards'}")


# ------------------------------------------------------------------------------------------------ ranks and resume


@pytest.mark.ddp
@pytest.mark.slow
def test_two_ranks_distil_on_equal_batch_counts_disjoint_samples_and_exact_source_mixes(tmp_path, built,
                                                                                        synthetic_shards, teacher):
    out, run_dir = tmp_path / "ranks", tmp_path / "run"
    overrides = [*CPU_RUN, *kd_overrides(synthetic_shards, teacher, built, "distill=true", f"run_dir={run_dir}",
                             "trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=8", "data.num_workers=1",
                             "trainer.max_epochs=1", "kd.sources.d2.weight=3")]
    done = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "ddp_train_run.py"), str(out),
                           *overrides], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    n = read_info(synthetic_shards).split("train").num_samples
    assert [len(r["batches"]) for r in ranks] == [n // 16] * 2  # an epoch is the labelled split: 200 / (2 x 8)
    for r in ranks:
        for b in r["batches"]:
            assert sorted(np.bincount(b["source"], minlength=2).tolist()) == [2, 6]  # 8 x 1/4 and 8 x 3/4
    for source in (0, 1):  # within each source, the ranks read disjoint samples
        seen = [{k for b in r["batches"] for k, s in zip(b["keys"], b["source"]) if s == source} for r in ranks]
        assert seen[0] and not seen[0] & seen[1]
    # Each rank draws its own dropout masks (seed + rank), from the same weights, which DDP keeps equal.
    assert all(a["rng"][0] != b["rng"][0] and a["rng"][1] != b["rng"][1]
               for a, b in zip(ranks[0]["batches"], ranks[1]["batches"]))
    assert ranks[0]["state"] == ranks[1]["state"]
    assert (run_dir / "export" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["offline", "online"])
def test_a_distill_run_killed_mid_epoch_resumes_to_the_uninterrupted_runs_weights(mode, tmp_path, built,
                                                                                   synthetic_shards, teacher):
    def run(run_dir: Path, *extra: str, callbacks=()):
        # No dropout: the RNG state is not in checkpoints yet (issue 9), and dropout masks would then differ.
        cfg = compose_run(*kd_overrides(synthetic_shards, teacher, built if mode == "offline" else None,
                                        "distill=true", f"run_dir={run_dir}", "data.batch_size=20",
                                        "trainer.max_epochs=2", "kd.drop_rate=0.0", "ema.decay=0.9",
                                        "callbacks.checkpoint.every_n_train_steps=1", "export=false", *extra))
        return train(cfg, callbacks=callbacks)

    uninterrupted = run(tmp_path / "a")
    with pytest.raises(Preemption):
        run(tmp_path / "b", callbacks=[PreemptAt(4)])
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0 and 0 < ckpt["global_step"] < 10  # mid-epoch (10 steps an epoch)
    resumed = run(tmp_path / "b", f"ckpt_path={last}")
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(last, map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 20
    for key in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], msg=lambda m, k=key: f"{k}: {m}")
    assert resumed["val/acc1"] == pytest.approx(uninterrupted["val/acc1"])


def test_d3_scores_made_by_another_selector_are_refused_before_any_is_reused(tmp_path, synthetic_shards, teacher):
    shards = read_info(synthetic_shards).shards("train")
    args = {"batch_size": 32, "num_workers": 0, "device": torch.device("cpu"), "autocast": False}
    first = load_teacher(str(teacher))
    score(first, shards, tmp_path, share=(0, 2), **args)  # half the extra shards, as a killed selection leaves them
    assert 0 < len(missing_scores(tmp_path, shards)) < len(shards)
    other = load_teacher(str(teacher.parent / "checkpoints" / "last.ckpt"))  # another selector (file and hash)
    with pytest.raises(KDSetError, match="holds D3 scores made with another selector"):
        score(other, shards, tmp_path, share=(0, 1), **args)
    score(first, shards, tmp_path, share=(0, 1), **args)  # the same selector resumes
    assert missing_scores(tmp_path, shards) == []


SRUN_TASK_1_OF_2 = {"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
                    "SLURM_LOCALID": "1", "SLURM_STEP_NUM_NODES": "1"}


def test_each_process_of_a_build_launch_labels_only_its_share_of_the_blocks(tmp_path, synthetic_shards, teacher,
                                                                           monkeypatch):
    for key, value in SRUN_TASK_1_OF_2.items():  # the second of two srun tasks (torchrun workers alike)
        monkeypatch.setenv(key, value)
    sets = build(synthetic_shards, teacher, tmp_path / "sets")
    blocks = len(read_info(synthetic_shards).shards("train"))
    built = {s: sorted(int(p.stem.split("-")[1]) for p in (sets / s).glob("block-*.npy")) for s in ("d1", "d2")}
    # block n of the list d1 + d2 belongs to share n mod 2
    assert built == {"d1": [k for k in range(blocks) if k % 2 == 1],
                     "d2": [k for k in range(blocks) if (blocks + k) % 2 == 1]}
    assert not (sets / "manifest.json").exists()  # the other share's blocks are still to come


def test_online_d3_scores_this_processs_share_and_waits_for_the_others(tmp_path, synthetic_shards, teacher,
                                                                         monkeypatch):
    for key, value in SRUN_TASK_1_OF_2.items():
        monkeypatch.setenv(key, value)
    cfg = compose_run(*kd_overrides(synthetic_shards, teacher, None, f"kd.extra_root={synthetic_shards}", *D3,
                                    "distill=true", f"run_dir={tmp_path}", "kd.build.wait_minutes=0"))
    feature = KnowledgeDistillation.from_config(cfg)
    info = read_info(synthetic_shards)
    data_config = {"input_size": [3, 32, 32], "crop_pct": 0.875, "interpolation": "bilinear",
                   "mean": [0.5] * 3, "std": [0.25] * 3}
    with pytest.raises(KDSetError, match="needs the scores of .* extra shards that other shares have not finished"):
        feature.data(labels_only(cfg, info, data_config), info=info, data_config=data_config)
    scored = sorted(int(p.stem.split("-")[1]) for p in (tmp_path / "kd_selection" / "scores").glob("block-*.npy"))
    assert scored == [k for k in range(len(info.shards("train"))) if k % 2 == 1]  # its own share, once


def test_each_process_drives_its_own_gpu_for_building_and_scoring(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(str(device)))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    for key, value in {**SRUN_TASK_1_OF_2, "SLURM_LOCALID": "3"}.items():
        monkeypatch.setenv(key, value)
    assert str(resolve_device("auto")) == str(resolve_device("cuda")) == "cuda:3"
    assert str(resolve_device("cuda:5")) == "cuda:5"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # srun --gpus-per-task=1: a task sees its own only
    assert str(resolve_device("auto")) == "cuda:0"
    assert chosen == ["cuda:3", "cuda:3", "cuda:5", "cuda:0"]  # each made the current device
