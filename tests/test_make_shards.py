"""make_shards: ImageNet-layout folders -> WebDataset shards + `_info.json`, checked by reading the tars back
with the standard library (and once with timm's own reader), never with the code under test."""

from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipes.shards.make import _init_worker, make_shards
from data_pipes.shards.metadata import DatasetError, read_info
from data_pipes.shards.plan import PROGRESS_FILE, exclusive, parse_size
from data_pipes.shards.val_labels import ShardSourceError

REPO = Path(__file__).resolve().parents[1]
QUIET = {"progress": False, "log": lambda line: None}


def read_split(out: Path, split: str) -> list[dict]:
    """Every sample of a split, in shard order: key, cls (int), jpg bytes, shard name."""
    samples = []
    for shard in sorted(out.glob(f"{split}-*.tar")):
        by_key: dict[str, dict] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                key, field = member.name.split(".", 1)
                by_key.setdefault(key, {"key": key, "shard": shard.name})[field] = tar.extractfile(member).read()
        for sample in by_key.values():
            sample["cls"] = int(sample["cls"].decode("ascii"))
            samples.append(sample)
    return samples


def source_files(root: Path, split: str) -> dict[str, tuple[str, Path]]:
    """file stem -> (class folder, path) of an ImageFolder split."""
    return {p.stem: (p.parent.name, p) for p in (root / split).glob("*/*") if p.is_file()}


def link_files(files: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        (dest / f.name).symlink_to(f)


@pytest.fixture(scope="module")
def synthetic_out(tmp_path_factory, synthetic_folder) -> Path:
    out = tmp_path_factory.mktemp("shards")
    make_shards(synthetic_folder, out, samples_per_shard=30, workers=2, **QUIET)
    return out


# --- round trips ---------------------------------------------------------------------------------------------


def test_round_trip_keeps_every_image_with_its_folder_label_and_exact_bytes(synthetic_folder, synthetic_out):
    info = json.loads((synthetic_out / "_info.json").read_text())
    classes = sorted(p.name for p in (synthetic_folder / "train").iterdir())
    assert info["label_names"] == classes
    for split, expected in (("train", 200), ("val", 50)):
        samples = read_split(synthetic_out, split)
        sources = source_files(synthetic_folder, split)
        assert len(samples) == info["splits"][split]["num_samples"] == expected
        assert sorted(s["key"] for s in samples) == sorted(sources)
        for s in samples:
            folder, path = sources[s["key"]]
            assert classes[s["cls"]] == folder, s["key"]
            assert s["jpg"] == path.read_bytes(), s["key"]


def test_shard_lengths_in_info_match_the_tars(synthetic_out):
    info = json.loads((synthetic_out / "_info.json").read_text())
    for split, meta in info["splits"].items():
        counts = {}
        for s in read_split(synthetic_out, split):
            counts[s["shard"]] = counts.get(s["shard"], 0) + 1
        assert meta["filenames"] == sorted(counts)
        assert meta["shard_lengths"] == [counts[f] for f in meta["filenames"]]


def test_every_shard_mixes_classes(synthetic_out):
    by_shard: dict[str, set[int]] = {}
    for s in read_split(synthetic_out, "train"):
        by_shard.setdefault(s["shard"], set()).add(s["cls"])
    assert len(by_shard) == math.ceil(200 / 30)
    # unshuffled, 30 consecutive images span 2 of the 10 classes; shuffled, every shard holds most of them
    assert all(len(classes) >= 5 for classes in by_shard.values()), by_shard


def test_same_command_makes_identical_shards_whatever_the_worker_count(synthetic_folder, synthetic_out, tmp_path):
    make_shards(synthetic_folder, tmp_path, samples_per_shard=30, workers=1, **QUIET)
    for shard in sorted(synthetic_out.glob("*.tar")):
        assert (tmp_path / shard.name).read_bytes() == shard.read_bytes(), shard.name


def test_a_different_seed_shuffles_differently(synthetic_folder, synthetic_out, tmp_path):
    make_shards(synthetic_folder, tmp_path, samples_per_shard=30, seed=1, workers=1, **QUIET)
    keys = [s["key"] for s in read_split(tmp_path, "train")]
    assert keys != [s["key"] for s in read_split(synthetic_out, "train")]
    assert sorted(keys) == sorted(s["key"] for s in read_split(synthetic_out, "train"))


@pytest.mark.imagenette
def first_grayscale(split_dir: Path) -> Path:
    """A grayscale photo (imagenette has 242); reading headers only is cheap."""
    for path in sorted(split_dir.glob("*/*.JPEG")):
        with Image.open(path) as im:
            if im.mode == "L":
                return path
    raise AssertionError(f"no grayscale image under {split_dir}")


@pytest.mark.imagenette
def test_imagenette_slice_round_trip_keeps_grayscale_photos_as_they_are(imagenette_root, tmp_path):
    src = tmp_path / "src"
    grayscale = first_grayscale(imagenette_root / "train")
    for wnid in sorted({grayscale.parent.name, "n01440764", "n03888257"}):
        files = sorted((imagenette_root / "train" / wnid).glob("*.JPEG"))[:8]
        link_files(files + ([grayscale] if grayscale.parent.name == wnid and grayscale not in files else []),
                   src / "train" / wnid)
        link_files(sorted((imagenette_root / "val" / wnid).glob("*.JPEG"))[:4], src / "val" / wnid)
    out = tmp_path / "out"
    info = make_shards(src, out, samples_per_shard=10, workers=2, **QUIET)
    for split in ("train", "val"):
        assert info.splits[split].num_samples == len(list((src / split).glob("*/*.JPEG")))
    assert list(info.label_names) == sorted(p.name for p in (src / "train").iterdir())
    for split in ("train", "val"):
        sources = source_files(src, split)
        for s in read_split(out, split):
            folder, path = sources[s["key"]]
            assert info.label_names[s["cls"]] == folder
            assert s["jpg"] == path.read_bytes()
    stored = {s["key"]: s["jpg"] for s in read_split(out, "train")}[grayscale.stem]
    assert Image.open(io.BytesIO(stored)).mode == "L"


# --- bad input -------------------------------------------------------------------------------------------------


def test_bad_files_are_reported_by_path_and_skipped_while_good_ones_are_written(synthetic_folder, tmp_path):
    src = tmp_path / "src"
    good = sorted((synthetic_folder / "train" / "cool_bars").glob("*.JPEG"))[:4]
    link_files(good[:2], src / "train" / "a")
    link_files(good[2:], src / "train" / "b")
    bad = {
        "unreadable": src / "train" / "a" / "dangling.JPEG",
        "empty": src / "train" / "a" / "empty.JPEG",
        "not-an-image": src / "train" / "a" / "notes.JPEG",
        "corrupt": src / "train" / "b" / "truncated.JPEG",
        "not-an-image-extension": src / "train" / "b" / "readme.txt",
    }
    bad["unreadable"].symlink_to(tmp_path / "gone.JPEG")
    bad["empty"].write_bytes(b"")
    bad["not-an-image"].write_text("an HTML error page, saved under an image name")
    bad["corrupt"].write_bytes(good[0].read_bytes()[: good[0].stat().st_size // 2])
    bad["not-an-image-extension"].write_text("not a picture")
    # odd but valid: kept, with their bytes as they came
    Image.new("RGB", (16, 16), (1, 2, 3)).save(src / "train" / "a" / "png_inside.JPEG", format="PNG")
    Image.new("CMYK", (16, 16), (0, 50, 50, 0)).save(src / "train" / "b" / "cmyk.JPEG")
    good += [src / "train" / "a" / "png_inside.JPEG", src / "train" / "b" / "cmyk.JPEG"]
    lines: list[str] = []
    info = make_shards(src, tmp_path / "out", workers=1, progress=False, log=lines.append)

    written = {s["key"]: s["jpg"] for s in read_split(tmp_path / "out", "train")}
    assert written == {p.stem: p.read_bytes() for p in good}
    assert dict(info.splits["train"].skipped) == {reason: 1 for reason in bad}
    listed = (tmp_path / "out" / "_skipped.txt").read_text().splitlines()[1:]
    assert sorted((ln.split("\t")[1], ln.split("\t")[2]) for ln in listed) == sorted(
        (reason, str(path)) for reason, path in bad.items())
    summary = "\n".join(lines)
    assert "skipped 5 files" in summary and all(str(path) in summary for path in bad.values())


def test_a_flat_val_folder_without_labels_is_refused_with_the_label_options(synthetic_folder, tmp_path):
    link_files(sorted((synthetic_folder / "train" / "cool_bars").glob("*.JPEG"))[:2], tmp_path / "train" / "a")
    link_files(sorted((synthetic_folder / "val" / "cool_bars").glob("*.JPEG"))[:2], tmp_path / "val")
    with pytest.raises(ShardSourceError, match="--val-labels.*LOC_val_solution.csv"):
        make_shards(tmp_path, tmp_path / "out", workers=1, **QUIET)


def test_dry_run_prints_the_plan_and_writes_nothing(synthetic_folder, tmp_path):
    lines: list[str] = []
    result = make_shards(synthetic_folder, tmp_path / "out", samples_per_shard=64, dry_run=True, progress=False,
                         log=lines.append)
    assert result is None and not (tmp_path / "out").exists()
    assert "train: 200 images -> 4 shards" in "\n".join(lines)


def test_quality_without_resize_is_refused_before_any_work(synthetic_folder, tmp_path):
    with pytest.raises(ShardSourceError, match="needs --resize"):
        make_shards(synthetic_folder, tmp_path, quality=80, **QUIET)
    assert not any(tmp_path.iterdir())


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "data_pipes.shards.make", "--src", str(tmp_path / "nowhere"),
                             "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "is not a directory" in result.stderr and "train/<class>" in result.stderr


def test_cli_writes_shards_and_info(synthetic_folder, tmp_path):
    result = subprocess.run([sys.executable, "-m", "data_pipes.shards.make", "--src", str(synthetic_folder),
                             "--out", str(tmp_path), "--samples-per-shard", "100", "--workers", "2",
                             "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    info = read_info(tmp_path)
    assert [len(info.split(s).filenames) for s in ("train", "val")] == [2, 1]
    assert "train: 200 samples in 2 shards" in result.stdout


# --- keys ------------------------------------------------------------------------------------------------------


def test_keys_are_unique_dot_free_and_named_after_the_file_when_stems_collide(synthetic_folder, tmp_path):
    jpeg = next((synthetic_folder / "train" / "cool_bars").glob("*.JPEG")).read_bytes()
    for cls in ("a", "b"):
        (tmp_path / "src" / "train" / cls).mkdir(parents=True)
        (tmp_path / "src" / "train" / cls / "img.v2.JPEG").write_bytes(jpeg)
        (tmp_path / "src" / "train" / cls / f"only_{cls}.JPEG").write_bytes(jpeg)
    make_shards(tmp_path / "src", tmp_path / "out", workers=1, **QUIET)
    samples = read_split(tmp_path / "out", "train")
    assert sorted((s["key"], s["cls"]) for s in samples) == [
        ("a_img_v2", 0), ("b_img_v2", 1), ("only_a", 0), ("only_b", 1)]


# --- shard sizes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("per_shard", "expected"), [(64, [4, 1]), (200, [1, 1]), (7, [29, 8])])
def test_samples_per_shard_gives_the_expected_shard_count(synthetic_folder, tmp_path, per_shard, expected):
    info = make_shards(synthetic_folder, tmp_path, samples_per_shard=per_shard, workers=1, **QUIET)
    assert [len(info.split(s).filenames) for s in ("train", "val")] == expected
    assert max(info.split("train").shard_lengths) == min(per_shard, 200)


@pytest.mark.parametrize("shard_bytes", ["150kB", "400000", "1e9"])
def test_shard_bytes_gives_ceil_of_tar_bytes_over_the_limit(synthetic_folder, tmp_path, shard_bytes):
    limit = parse_size(shard_bytes)
    files = [p for p in (synthetic_folder / "train").glob("*/*")]
    # per sample: a 512-byte header + data padded to 512 bytes (jpg), a header + one block (cls)
    total = sum(512 + math.ceil(p.stat().st_size / 512) * 512 + 1024 for p in files)
    info = make_shards(synthetic_folder, tmp_path, shard_bytes=shard_bytes, workers=1, **QUIET)
    shards = info.shards("train")
    assert len(shards) == math.ceil(total / limit)
    biggest_sample = max(p.stat().st_size for p in files) + 2048
    assert all(path.stat().st_size <= min(limit, total) + biggest_sample + 10240 for path, _ in shards)


@pytest.mark.parametrize(("text", "expected"), [
    ("1e9", 10**9), ("1GB", 10**9), ("500MB", 500 * 10**6), ("500mb", 500 * 10**6), ("1.5GiB", 3 * 2**29),
    ("4096", 4096), ("64 kB", 64000), ("2T", 2 * 10**12)])
def test_parse_size_reads_the_usual_spellings(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "1XB", "-5MB", "1GB2"])
def test_parse_size_rejects_nonsense_with_examples(text):
    with pytest.raises(ShardSourceError, match="1e9, 1GB"):
        parse_size(text)


def test_parse_size_rejects_zero():
    with pytest.raises(ShardSourceError, match="more than 0"):
        parse_size("0")


# --- ImageNet's flat validation folder -------------------------------------------------------------------------


def flat_imagenet(synthetic_folder: Path, root: Path) -> tuple[Path, dict[str, str]]:
    """train/<wnid>/ class folders and a flat val/ of ILSVRC2012_val_<n>.JPEG; returns (SRC, truth: stem -> wnid).
    The val images' order deliberately differs from the sorted wnid order."""
    wnids = ["n00000001", "n00000002", "n00000003"]
    src = root / "imagenet"
    for wnid, cls in zip(wnids, ("cool_bars", "cool_disc", "cool_ring")):
        link_files(sorted((synthetic_folder / "train" / cls).glob("*.JPEG"))[:3], src / "train" / wnid)
    truth = {}
    (src / "val").mkdir()
    for n in range(1, 10):
        wnid = wnids[(n * 2) % 3]
        stem = f"ILSVRC2012_val_{n:08d}"
        shutil.copy(next((synthetic_folder / "val").glob("*/*.JPEG")), src / "val" / f"{stem}.JPEG")
        truth[stem] = wnid
    return src, truth


def val_labels_by_key(out: Path, label_names) -> dict[str, str]:
    return {s["key"]: label_names[s["cls"]] for s in read_split(out, "val")}


def test_flat_val_is_labelled_from_a_loc_val_solution_csv_found_next_to_src(synthetic_folder, tmp_path):
    src, truth = flat_imagenet(synthetic_folder, tmp_path)
    rows = [f"{stem},{wnid} 10 20 30 40 {wnid} 1 2 3 4" for stem, wnid in truth.items() if stem[-1] != "9"]
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    info = make_shards(src, tmp_path / "out", workers=1, **QUIET)
    labelled = {k: v for k, v in truth.items() if k[-1] != "9"}
    assert val_labels_by_key(tmp_path / "out", info.label_names) == labelled
    assert dict(info.split("val").skipped) == {"no-label": 1}  # the image the CSV does not list


def test_devkit_ground_truth_maps_ids_through_meta_mat_not_sorted_order(synthetic_folder, tmp_path):
    import scipy.io as scipy_io  # a core dependency (the devkit's meta.mat): an import failure must fail the test
    src, truth = flat_imagenet(synthetic_folder, tmp_path)
    devkit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    # devkit order (ILSVRC2012_ID 1, 2, 3) is not the sorted order; a parent synset (children > 0) is no class
    order = ["n00000003", "n00000001", "n00000002"]
    rows = [(i + 1, w, w, 0) for i, w in enumerate(order)] + [(1001, "n09999999", "parent", 3)]
    synsets = np.array(rows, dtype=[(f, "O") for f in ("ILSVRC2012_ID", "WNID", "words", "num_children")])
    scipy_io.savemat(devkit / "meta.mat", {"synsets": synsets})
    gt = devkit / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("".join(f"{order.index(truth[stem]) + 1}\n" for stem in sorted(truth)))
    info = make_shards(src, tmp_path / "out", workers=1, **QUIET)  # both files found in the devkit next to SRC
    assert val_labels_by_key(tmp_path / "out", info.label_names) == truth

    sorted_table = tmp_path / "LOC_synset_mapping.txt"
    sorted_table.write_text("".join(f"{w} words\n" for w in sorted(order)))
    with pytest.raises(ShardSourceError, match="sorted order.*meta.mat"):
        make_shards(src, tmp_path / "out2", val_labels=gt, devkit_meta=sorted_table, workers=1, **QUIET)
    (devkit / "meta.mat").unlink()
    with pytest.raises(ShardSourceError, match="--devkit-meta"):
        make_shards(src, tmp_path / "out3", val_labels=gt, workers=1, **QUIET)


def test_numbered_val_labels_are_refused_as_ambiguous(synthetic_folder, tmp_path):
    src, truth = flat_imagenet(synthetic_folder, tmp_path)
    labels = tmp_path / "val.txt"
    labels.write_text("".join(f"{stem}.JPEG 1\n" for stem in truth))
    with pytest.raises(ShardSourceError, match="number"):
        make_shards(src, tmp_path / "out", val_labels=labels, workers=1, **QUIET)


# --- resume ----------------------------------------------------------------------------------------------------


def age_shards(out: Path) -> dict[str, int]:
    """Backdate every shard so that a rewrite shows in its mtime, however fast the rerun."""
    for tar in out.glob("*.tar"):
        os.utime(tar, ns=(10**18, 10**18))
    return {tar.name: tar.stat().st_mtime_ns for tar in out.glob("*.tar")}


def test_rerun_after_losing_a_shard_rewrites_only_that_shard(synthetic_folder, tmp_path):
    make_shards(synthetic_folder, tmp_path, samples_per_shard=40, workers=1, **QUIET)
    first = {t.name: t.read_bytes() for t in tmp_path.glob("*.tar")}
    mtimes = age_shards(tmp_path)
    (tmp_path / "train-000004.tar").unlink()
    (tmp_path / "_info.json").unlink()
    lines: list[str] = []
    make_shards(synthetic_folder, tmp_path, samples_per_shard=40, workers=2, progress=False, log=lines.append)
    rewritten = {t.name for t in tmp_path.glob("*.tar") if t.stat().st_mtime_ns != mtimes.get(t.name)}
    assert rewritten == {"train-000004.tar"}
    assert {t.name: t.read_bytes() for t in tmp_path.glob("*.tar")} == first
    assert any("resuming: 6 of 7 shards" in line for line in lines)
    assert read_info(tmp_path).split("train").num_samples == 200


def test_rerun_after_an_interruption_redoes_unrecorded_and_partial_shards(synthetic_folder, tmp_path):
    make_shards(synthetic_folder, tmp_path, samples_per_shard=40, workers=1, **QUIET)
    mtimes = age_shards(tmp_path)
    # as if killed while writing: the last two shards have no record, one half-written temp file, no _info.json
    progress = (tmp_path / PROGRESS_FILE).read_text().splitlines()
    unrecorded = {json.loads(line)["shard"] for line in progress[-2:]}
    (tmp_path / PROGRESS_FILE).write_text("\n".join(progress[:-2]) + '\n{"shard": "val-0000')
    (tmp_path / "train-000001.tar.partial").write_bytes(b"\0" * 1000)
    (tmp_path / "_info.json").unlink()
    make_shards(synthetic_folder, tmp_path, samples_per_shard=40, workers=1, **QUIET)
    rewritten = {t.name for t in tmp_path.glob("*.tar") if t.stat().st_mtime_ns != mtimes[t.name]}
    assert rewritten == unrecorded
    assert not list(tmp_path.glob("*.partial"))
    assert read_info(tmp_path).split("val").num_samples == 50


def test_killed_run_resumes_without_rewriting_the_shards_it_finished(synthetic_folder, tmp_path):
    cmd = [sys.executable, "-m", "data_pipes.shards.make", "--src", str(synthetic_folder), "--out", str(tmp_path),
           "--samples-per-shard", "5", "--workers", "1", "--no-progress"]
    progress = tmp_path / PROGRESS_FILE
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if progress.is_file() and progress.read_text().count("\n") >= 3:
            proc.kill()  # SIGKILL: no cleanup of any kind, as when a node dies
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    finished = {json.loads(line)["shard"] for line in progress.read_text().splitlines() if line.endswith("}")}
    mtimes = age_shards(tmp_path)
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    rewritten = {t.name for t in tmp_path.glob("*.tar") if t.stat().st_mtime_ns != mtimes.get(t.name)}
    assert finished and not finished & rewritten
    info = read_info(tmp_path)
    assert (info.split("train").num_samples, info.split("val").num_samples) == (200, 50)


def test_pool_workers_keep_the_default_sigterm_so_terminating_the_pool_cannot_hang():
    # the CLI traps SIGTERM to stop cleanly; a worker inheriting that trap could die holding the task queue's lock
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        with mp.Pool(1, initializer=_init_worker, initargs=(mp.Value("q", 0),)) as pool:
            assert pool.apply(signal.getsignal, (signal.SIGTERM,)) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(tmp_path):
    with exclusive(tmp_path), pytest.raises(ShardSourceError, match="another make_shards"), exclusive(tmp_path):
        pass


def test_rerun_with_different_options_is_refused_unless_overwrite(synthetic_folder, tmp_path):
    make_shards(synthetic_folder, tmp_path, samples_per_shard=40, workers=1, **QUIET)
    with pytest.raises(ShardSourceError, match=r"different plan \(seed: 0 -> 3\).*--overwrite"):
        make_shards(synthetic_folder, tmp_path, samples_per_shard=40, seed=3, workers=1, **QUIET)
    info = make_shards(synthetic_folder, tmp_path, samples_per_shard=100, seed=3, overwrite=True, workers=1, **QUIET)
    assert sorted(t.name for t in tmp_path.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    assert read_info(tmp_path).split("train").shard_lengths == info.split("train").shard_lengths == (100, 100)


def test_foreign_tars_in_out_are_refused_unless_overwrite(synthetic_folder, tmp_path):
    (tmp_path / "train-000000.tar").write_bytes(b"someone else's shard")
    with pytest.raises(ShardSourceError, match="not made by this plan"):
        make_shards(synthetic_folder, tmp_path, workers=1, **QUIET)


# --- resize ----------------------------------------------------------------------------------------------------


def test_resize_makes_jpegs_with_the_shorter_side_n_and_never_upscales(synthetic_folder, tmp_path):
    cls = tmp_path / "src" / "train" / "a"
    link_files(sorted((synthetic_folder / "train" / "cool_bars").glob("*.JPEG"))[:3], cls)  # 64x64
    Image.new("RGB", (80, 48), (200, 10, 10)).save(cls / "wide.png")
    Image.new("CMYK", (48, 96), (0, 50, 50, 0)).save(cls / "tall_cmyk.JPEG")
    Image.new("L", (20, 20), 128).save(cls / "tiny.JPEG")
    info = make_shards(tmp_path / "src", tmp_path / "out", resize=32, quality=85, shard_bytes="1MB", workers=1,
                       **QUIET)
    samples = {s["key"]: s["jpg"] for s in read_split(tmp_path / "out", "train")}
    assert info.split("train").num_samples == 6
    sizes = {k: Image.open(io.BytesIO(v)).size for k, v in samples.items()}
    assert sizes["wide"] == (53, 32) and sizes["tall_cmyk"] == (32, 64)
    assert all(min(size) == 32 for key, size in sizes.items() if key != "tiny")
    assert all(Image.open(io.BytesIO(v)).format == "JPEG" for v in samples.values())
    assert samples["tiny"] == (cls / "tiny.JPEG").read_bytes()  # already small: kept as it came


# --- readers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val"])
def test_timm_wds_reader_reads_our_shards_with_their_labels(synthetic_folder, synthetic_out, split):
    from timm.data import create_dataset

    dataset = create_dataset("wds/synthetic", root=str(synthetic_out), split=split, is_training=False)
    ours = read_split(synthetic_out, split)  # timm reads unshuffled shards in order when not training
    sources = source_files(synthetic_folder, split)
    classes = read_info(synthetic_out).label_names
    read = [(img, target) for img, target in dataset][:40]
    assert len(read) == min(40, len(ours))
    for (img, target), sample in zip(read, ours):
        assert target == sample["cls"] and classes[target] == sources[sample["key"]][0]
        assert img.mode == "RGB" and img.size == (64, 64)


def test_read_info_reads_our_output_and_detects_a_missing_shard(synthetic_out, tmp_path):
    info = read_info(synthetic_out)
    assert info.num_classes == 10 and info.split("train").num_samples == 200 and info.split("val").num_skipped == 0
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_out, copy)
    (copy / "val-000001.tar").unlink()
    with pytest.raises(DatasetError, match="val-000001.tar"):
        read_info(copy)
