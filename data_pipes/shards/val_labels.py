"""Labels for ImageNet's flat validation folder (`SRC/val/ILSVRC2012_val_00000001.JPEG`, no class folders).

Label files, told apart by their content:
- Kaggle's `LOC_val_solution.csv`: `ImageId,PredictionString`; the first token of PredictionString is the wnid.
- Text lines `<image> <wnid>` (image name with or without extension).
- The devkit's `ILSVRC2012_validation_ground_truth.txt`: one ILSVRC2012_ID (1..1000) per line, line i for image
  ILSVRC2012_val_{i:08d}. These IDs number the synsets in the devkit's own order, which is NOT the sorted-wnid
  class index, so they are turned into wnids through the devkit's `data/meta.mat` (or a text file listing the
  wnids in ILSVRC2012_ID order). Labels are always matched by wnid, never by a bare number.
"""

from __future__ import annotations

import csv
from pathlib import Path

from scipy.io import loadmat

from data_pipes.errors import UserError

KAGGLE_CSV = "LOC_val_solution.csv"
DEVKIT_GT = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
LABEL_HELP = (
    f"pass --val-labels with Kaggle's {KAGGLE_CSV}, a text file of '<image> <wnid>' lines, or the devkit's "
    f"{DEVKIT_GT} together with --devkit-meta {DEVKIT_DIR}/data/{DEVKIT_META}"
)


class ShardSourceError(UserError, ValueError):
    """The source folder, a label file or an option cannot be used; the message says how to fix it."""


def find_val_labels(src: Path) -> Path | None:
    """The label file of a flat val folder, where ImageNet downloads put it: Kaggle's CSV in or next to SRC
    (or at the top of the Kaggle tree when SRC is its ILSVRC/Data/CLS-LOC), else the devkit's ground truth."""
    src = Path(src)
    places = [src, src / "val", src.parent]
    if src.parts[-3:] == ("ILSVRC", "Data", "CLS-LOC"):
        places.append(src.parents[2])
    for place in places:
        if (place / KAGGLE_CSV).is_file():
            return place / KAGGLE_CSV
    for place in (src, src.parent):
        gt = place / DEVKIT_DIR / "data" / DEVKIT_GT
        if gt.is_file():
            return gt
    return None


def image_id(name: str) -> str:
    """How label files name an image: its file name without directory and extension."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name


def read_val_labels(path: Path, devkit_meta: Path | None = None) -> dict[str, str]:
    """image id -> wnid, from any of the label files in the module docstring."""
    path = Path(path)
    if not path.is_file():
        raise ShardSourceError(f"--val-labels {path} does not exist; {LABEL_HELP}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if not lines:
        raise ShardSourceError(f"val label file {path} is empty; {LABEL_HELP}")
    first = lines[0].split(",")[0].split()
    if lines[0].lower().startswith("imageid,"):
        return _read_kaggle_csv(path)
    if len(first) == 1 and first[0].isdigit():
        return _read_devkit_ground_truth(path, lines, _devkit_meta_path(path, devkit_meta))
    return _read_pairs(path, lines)


def _read_kaggle_csv(path: Path) -> dict[str, str]:
    labels = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
            raise ShardSourceError(f"{path}: expected Kaggle's header 'ImageId,PredictionString', "
                                   f"found {reader.fieldnames}; {LABEL_HELP}")
        for row in reader:
            tokens = (row["PredictionString"] or "").split()
            if not tokens:
                raise ShardSourceError(f"{path}: row for {row['ImageId']} has an empty PredictionString")
            labels[image_id(row["ImageId"])] = tokens[0]
    return labels


def _read_pairs(path: Path, lines: list[str]) -> dict[str, str]:
    labels = {}
    for n, line in enumerate(lines, 1):
        tokens = line.replace(",", " ").split()
        if len(tokens) < 2:
            raise ShardSourceError(f"{path}:{n}: expected '<image> <wnid>', got {line!r}; {LABEL_HELP}")
        if tokens[1].lstrip("-").isdigit():
            raise ShardSourceError(
                f"{path}:{n}: '{line}' gives the class as a number. Numbered val labels exist in several orders "
                f"(Caffe's val.txt: sorted wnids from 0; the devkit: ILSVRC2012_IDs from 1), so a number cannot be "
                f"trusted to mean our class index. Use a file that names the wnid; {LABEL_HELP}"
            )
        labels[image_id(tokens[0])] = tokens[1]
    return labels


def _devkit_meta_path(gt: Path, devkit_meta: Path | None) -> Path:
    if devkit_meta is not None:
        return Path(devkit_meta)
    beside = gt.parent / DEVKIT_META
    if beside.is_file():
        return beside
    raise ShardSourceError(
        f"{gt} numbers classes by ILSVRC2012_ID (the devkit's synset order, not the sorted-wnid order of the "
        f"class folders), so it needs the devkit's ID -> wnid table: pass --devkit-meta {DEVKIT_DIR}/data/"
        f"{DEVKIT_META} (or a text file with the wnids in ILSVRC2012_ID order, one per line). Without it every "
        f"val image would be mislabelled. Alternatively use Kaggle's {KAGGLE_CSV}."
    )


def _read_devkit_ground_truth(path: Path, lines: list[str], meta: Path) -> dict[str, str]:
    id_to_wnid = read_devkit_ids(meta)
    labels = {}
    for n, line in enumerate(lines, 1):
        if not line.isdigit():
            raise ShardSourceError(f"{path}:{n}: expected one ILSVRC2012_ID per line, got {line!r}")
        if int(line) not in id_to_wnid:
            raise ShardSourceError(f"{path}:{n}: ILSVRC2012_ID {line} is not in {meta} (it has IDs "
                                   f"{min(id_to_wnid)}..{max(id_to_wnid)}); is this the matching devkit?")
        labels[f"ILSVRC2012_val_{n:08d}"] = id_to_wnid[int(line)]
    return labels


def read_devkit_ids(path: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid of the 1000 leaf classes, from the devkit's meta.mat or a text table."""
    path = Path(path)
    if not path.is_file():
        raise ShardSourceError(f"--devkit-meta {path} does not exist; it is {DEVKIT_DIR}/data/{DEVKIT_META} "
                               f"in the ImageNet devkit (ILSVRC2012_devkit_t12.tar.gz)")
    ids = _read_meta_mat(path) if path.suffix == ".mat" else _read_id_table(path)
    _refuse_sorted_order(path, ids)
    return ids


def _read_meta_mat(path: Path) -> dict[int, str]:
    synsets = loadmat(str(path), squeeze_me=True)["synsets"]
    leaves = [s for s in synsets if int(s["num_children"]) == 0]  # the 1000 classes; the rest are WordNet parents
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}


def _read_id_table(path: Path) -> dict[int, str]:
    """Lines `<wnid> ...` (line i = ID i) or `<id> <wnid> ...`."""
    ids = {}
    lines = [ln.split() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    for n, tokens in enumerate(lines, 1):
        if tokens[0].isdigit() and len(tokens) > 1:
            ids[int(tokens[0])] = tokens[1]
        else:
            ids[n] = tokens[0]
    return ids


def _refuse_sorted_order(path: Path, ids: dict[int, str]) -> None:
    """The devkit's ID order is not sorted (ID 1 is n02119789, kit fox). A sorted table is almost surely
    LOC_synset_mapping.txt / synsets.txt, the class-index order; using it would mislabel nearly every image."""
    ordered = [ids[i] for i in sorted(ids)]
    if len(ordered) > 2 and ordered == sorted(ordered):
        raise ShardSourceError(
            f"--devkit-meta {path} lists the wnids in sorted order, which is the class-index order (like "
            f"LOC_synset_mapping.txt), not the devkit's ILSVRC2012_ID order that {DEVKIT_GT} uses. Pass the "
            f"devkit's {DEVKIT_DIR}/data/{DEVKIT_META} instead."
        )
