"""The eleven few-shot datasets of the CoOp / CLIP-LoRA protocol, from their standard splits.

``--data.root`` is either the dataset's own folder (e.g. ``.../oxford_pets``) or the data root
that holds all of them (the folder with ``oxford_pets/``, ``dtd/``, ...). Nine datasets ship a
split file ``split_zhou_<Name>.json`` — an object with "train", "val" and "test" lists of
``[image path relative to the image folder, integer label, class name]`` — and are rows of
``SPLIT_FILE_DATASETS``; adding one is adding a row. Two have their own files:

- ``fgvc-aircraft``: ``fgvc-aircraft-2013b/data/`` (or ``fgvc_aircraft/``) with ``variants.txt``
  (one class per line, in label order), ``images_variant_{train,val,test}.txt`` (lines
  ``<image id> <variant>``) and ``images/<image id>.jpg``.
- ``imagenet``: ``imagenet/`` with ``classnames.txt`` (lines ``<wnid> <readable name>``) and
  ``images/train/<wnid>/*`` and ``images/val/<wnid>/*``; the val folder is the test split and
  there is no val split (CoOp reuses test as val; cdfsl never selects on test).

Each dataset carries CoOp's prompt template (``template``), used when the recipe keeps the
generic one (see ``cdfsl.data.layout.prompt_template``). ``cdfsl eval`` draws episodes from the
test split unless ``--data.options '{"split": "train"}'`` says otherwise.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdfsl.data.layout import (
    DataReport,
    Layout,
    Listing,
    list_class_folders,
    load_package_names,
    missing_file_fix,
    report_absent,
    shown,
    sub_folders,
    walk_files,
)

__all__ = [
    "LAYOUTS",
    "SPLIT_FILE_DATASETS",
    "FGVCAircraft",
    "ImageNet",
    "SplitFileDataset",
    "SplitFileLayout",
]

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitFileDataset:
    """One row of the split-file table.

    name: the registered source; directory: the dataset folder under the data root; image_dir:
    the image folder inside it ("" is the folder itself); split_file: the JSON split in the
    dataset folder; template: CoOp's prompt; names_file: optional package file mapping class
    names of the split file to readable ones.
    """

    name: str
    directory: str
    image_dir: str
    split_file: str
    template: str
    names_file: str | None = None


SPLIT_FILE_DATASETS: tuple[SplitFileDataset, ...] = (
    SplitFileDataset(
        "caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
        "a photo of a {}.",
    ),
    SplitFileDataset(
        "oxford-pets", "oxford_pets", "images", "split_zhou_OxfordPets.json",
        "a photo of a {}, a type of pet.",
    ),
    SplitFileDataset(
        "stanford-cars", "stanford_cars", "", "split_zhou_StanfordCars.json", "a photo of a {}."
    ),
    SplitFileDataset(
        "flowers102", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
        "a photo of a {}, a type of flower.",
    ),
    SplitFileDataset(
        "food101", "food-101", "images", "split_zhou_Food101.json",
        "a photo of {}, a type of food.",
    ),
    SplitFileDataset("sun397", "sun397", "SUN397", "split_zhou_SUN397.json", "a photo of a {}."),
    SplitFileDataset(
        "dtd", "dtd", "images", "split_zhou_DescribableTextures.json", "{} texture."
    ),
    SplitFileDataset(
        "eurosat-fsl", "eurosat", "2750", "split_zhou_EuroSAT.json",
        "a centered satellite photo of {}.", names_file="eurosat.json",
    ),
    SplitFileDataset(
        "ucf101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
        "a photo of a person doing {}.",
    ),
)  # fmt: skip


def dataset_dir(root: Path, directory: str, marker: str) -> Path:
    """``root/directory`` or ``root`` itself: the first holding ``marker``, else the first that
    exists (so messages name the file where it belongs)."""
    for candidate in (root / directory, root):
        if (candidate / marker).exists():
            return candidate
    return root / directory if (root / directory).is_dir() else root


def _read_json(path: Path, report: DataReport, expected: str, fix: str) -> Any:
    if not path.is_file():
        report.add(path, "does not exist", expected, missing_file_fix(report.root, path, fix))
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = str(err).replace("\n", " ")
        report.add(path, f"is not valid JSON ({reason})", expected, "replace it with the original")
        return None


def _is_item(item: object) -> bool:
    """True for ``[path, label, class name]`` with a non-empty path and an int label >= 0."""
    return (
        isinstance(item, list)
        and len(item) == 3
        and isinstance(item[0], str)
        and bool(item[0])
        and isinstance(item[1], int)
        and not isinstance(item[1], bool)
        and item[1] >= 0
        and isinstance(item[2], str)
    )


def _read_text_lines(path: Path, report: DataReport, expected: str, fix: str) -> list[str] | None:
    """Non-empty stripped lines of a text file; a problem and None if missing or unreadable."""
    if not path.is_file():
        report.add(path, "does not exist", expected, missing_file_fix(report.root, path, fix))
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        report.add(path, f"cannot be read ({err})", expected, "replace it with the original")
        return None
    return [line.strip() for line in text.splitlines() if line.strip()]


class SplitFileLayout(Layout):
    """A dataset of ``SPLIT_FILE_DATASETS``: a CoOp split file and an image folder."""

    default_split = "test"
    required_splits = ("train", "test")

    def __init__(self, row: SplitFileDataset) -> None:
        self.row = row
        self.name = row.name
        self.template = row.template
        self.description = (
            f"{row.directory}/{row.split_file} and images under "
            f"{row.directory}/{row.image_dir or '.'}"
        )
        self.names = load_package_names(row.names_file) if row.names_file else {}

    def read(self, root: Path, report: DataReport, **options: Any) -> Listing | None:
        row = self.row
        folder = dataset_dir(root, row.directory, row.split_file)
        split_path = folder / row.split_file
        image_root = folder / row.image_dir if row.image_dir else folder
        expected = (
            'the CoOp split file: a JSON object with "train", "val" and "test" lists of '
            "[image path, integer label, class name]"
        )
        if not image_root.is_dir():
            report.add(
                image_root, "does not exist", f"the {row.name} images",
                "extract the dataset's image archive there",
            )  # fmt: skip
        split = _read_json(
            split_path, report, expected,
            f"download {row.split_file} (CoOp's DATASETS.md links it) into {folder}",
        )  # fmt: skip
        if split is None:
            return None
        if not isinstance(split, dict) or not all(isinstance(split.get(s), list) for s in SPLITS):
            found = f"keys {sorted(split)}" if isinstance(split, dict) else type(split).__name__
            report.add(split_path, f"holds {found}", expected, "replace it with the original")
            return None
        bad = [f"{s}[{i}]" for s in SPLITS for i, item in enumerate(split[s]) if not _is_item(item)]
        if bad:
            report.add(
                split_path, f"has malformed item(s) {shown(bad, quote=False)}", expected,
                "replace it with the original file",
            )  # fmt: skip
            return None
        name_of: dict[int, str] = {}
        clashes: list[str] = []
        for s in SPLITS:
            for _, label, classname in split[s]:
                if name_of.setdefault(label, classname) != classname:
                    clashes.append(f"{label}: {name_of[label]!r} and {classname!r}")
        if clashes:
            report.add(
                split_path, f"names label(s) inconsistently ({shown(clashes, quote=False)})",
                "one class name per label", "replace it with the original file",
            )  # fmt: skip
        gaps = [c for c in range(max(name_of, default=-1) + 1) if c not in name_of]
        if gaps:
            report.add(
                split_path, f"never uses label(s) {shown(gaps, quote=False)}",
                "labels 0 .. C-1, each used", "replace it with the original file",
            )  # fmt: skip
            return None
        keys = [name_of[c] for c in range(len(name_of))]
        names = [self.names.get(k, k.replace("_", " ")) for k in keys]
        splits = {s: [(path, label) for path, label, _ in split[s]] for s in SPLITS}
        if image_root.is_dir():
            present = set(walk_files(image_root)[0])
            listed = (p for s in SPLITS for p, _ in splits[s])
            report_absent(report, split_path, str(image_root), listed, present)
        return Listing(image_root, keys, names, splits, [str(split_path)] * len(keys))


FGVC_DIRS = ("fgvc-aircraft-2013b/data", "fgvc_aircraft")


class FGVCAircraft(Layout):
    """FGVC-Aircraft 2013b variants: ``variants.txt`` and ``images_variant_<split>.txt``."""

    name = "fgvc-aircraft"
    description = (
        "fgvc-aircraft-2013b/data/ with variants.txt, images_variant_{train,val,test}.txt and "
        "images/"
    )
    template = "a photo of a {}, a type of aircraft."
    default_split = "test"
    required_splits = ("train", "test")

    def read(self, root: Path, report: DataReport, **options: Any) -> Listing | None:
        candidates = [root / d for d in FGVC_DIRS] + [root]
        folder = next((c for c in candidates if (c / "variants.txt").exists()), None)
        folder = folder or next((c for c in candidates if c.is_dir()), root)
        image_root = folder / "images"
        fix = f"extract fgvc-aircraft-2013b.tar.gz so that {folder} holds it"
        if not image_root.is_dir():
            report.add(image_root, "does not exist", "the aircraft images <id>.jpg", fix)
        variants = _read_text_lines(
            folder / "variants.txt", report, "one variant name per line", fix
        )
        if variants is None:
            return None
        repeated = [v for v, n in Counter(variants).items() if n > 1]
        if repeated:
            report.add(
                folder / "variants.txt", f"repeats {shown(repeated)}", "distinct variant names",
                "replace it with the original file",
            )  # fmt: skip
        label_of = {v: i for i, v in enumerate(variants)}
        splits: dict[str, list[tuple[str, int]]] = {}
        present = set(walk_files(image_root)[0]) if image_root.is_dir() else None
        for split in SPLITS:
            path = folder / f"images_variant_{split}.txt"
            lines = _read_text_lines(path, report, "lines '<image id> <variant>'", fix)
            entries, bad = [], []
            for number, line in enumerate(lines or [], start=1):
                image_id, _, variant = line.partition(" ")
                if variant.strip() not in label_of:
                    bad.append(number)
                else:
                    entries.append((f"{image_id}.jpg", label_of[variant.strip()]))
            if bad:
                report.add(
                    path, f"has line(s) {shown(bad, quote=False)} without a variant of "
                    "variants.txt", "lines '<image id> <variant>'", "replace it with the original",
                )  # fmt: skip
            splits[split] = entries
            if present is not None:
                report_absent(report, path, str(image_root), (p for p, _ in entries), present)
        locations = [str(folder / "images_variant_{train,val,test}.txt")] * len(variants)
        return Listing(image_root, variants, list(variants), splits, locations)


class ImageNet(Layout):
    """ImageNet as CoOp arranges it: ``classnames.txt`` and ``images/{train,val}/<wnid>/``."""

    name = "imagenet"
    description = "imagenet/ with classnames.txt, images/train/<wnid>/ and images/val/<wnid>/"
    default_split = "test"
    required_splits = ("train", "test")

    def read(self, root: Path, report: DataReport, **options: Any) -> Listing | None:
        folder = dataset_dir(root, "imagenet", "classnames.txt")
        lines = _read_text_lines(
            folder / "classnames.txt", report, "lines '<wnid> <readable name>'",
            f"put CoOp's classnames.txt into {folder}",
        )  # fmt: skip
        if lines is None:
            return None
        pairs = [line.partition(" ") for line in lines]
        bad = [n for n, (wnid, _, name) in enumerate(pairs, start=1) if not name.strip()]
        if bad:
            report.add(
                folder / "classnames.txt", f"has line(s) {shown(bad, quote=False)} without a name",
                "lines '<wnid> <readable name>'", "replace it with CoOp's classnames.txt",
            )  # fmt: skip
            return None
        wnids = [wnid for wnid, _, _ in pairs]
        names = [name.strip() for _, _, name in pairs]
        image_root = folder / "images"
        splits: dict[str, list[tuple[str, int]]] = {}
        # CoOp's test split is ImageNet's val folder, sorted into class folders like train.
        for split, sub in (("train", "train"), ("test", "val")):
            split_dir = image_root / sub
            if not split_dir.is_dir():
                report.add(
                    split_dir, "does not exist", "one folder of images per wnid",
                    f"extract ImageNet's {sub} images there, one folder per class",
                )  # fmt: skip
                splits[split] = []
                continue
            folders = set(sub_folders(split_dir))
            missing = [w for w in wnids if w not in folders]
            if missing:
                report.add(
                    split_dir, f"has no folder for {len(missing)} class(es), e.g. {shown(missing)}",
                    "one folder per wnid of classnames.txt", "sort the images into wnid folders",
                )  # fmt: skip
            extra = sorted(folders - set(wnids))
            if extra:
                report.notes.append(f"ignored folder(s) {shown(extra)} in {split_dir}")
            entries = list_class_folders(split_dir, wnids)[0]
            splits[split] = [(f"{sub}/{path}", label) for path, label in entries]
        locations = [str(image_root / "{train,val}" / w) for w in wnids]
        return Listing(image_root, wnids, names, splits, locations)


LAYOUTS: tuple[Layout, ...] = (
    *(SplitFileLayout(row) for row in SPLIT_FILE_DATASETS),
    FGVCAircraft(),
    ImageNet(),
)
"""The eleven FSL datasets, each registered as a dataset source under its ``name``."""
