"""The four BSCD-FSL target datasets in the layouts their releases ship in.

==============  ===============================================================================
source          layout under ``--data.root``
==============  ===============================================================================
eurosat         ``2750/<class>/*.jpg`` (or ``EuroSAT_RGB/``, or the class folders directly):
                the 10 RGB classes
crop-disease    ``train/<class>/*.jpg`` (or ``dataset/train/``, or the class folders directly):
                the 38 PlantVillage classes, e.g. ``Apple___Apple_scab``
isic2018        ``ISIC2018_Task3_Training_Input/ISIC_*.jpg`` and
                ``ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv``
                (columns ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``, one-hot floats): 7 classes
chestx          NIH ``Data_Entry_2017.csv`` and ``images/*.png`` or ``images_0NN/images/*.png``;
                the single-label images of 7 findings, grayscale read as RGB
==============  ===============================================================================

Each has one split, ``all``: the benchmark draws its episodes from the whole dataset. Readable
class names come from ``cdfsl/data/classnames/<dataset>.json``; every class of the benchmark
must be present. The prompt is the Mind reference's "a photo of a {}.".
"""

from __future__ import annotations

import csv
from collections import Counter
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
from cdfsl.errors import DataError

__all__ = ["ISIC2018", "LAYOUTS", "ChestX", "ClassFolderTarget", "read_csv"]


def read_csv(
    path: Path, report: DataReport, columns: list[str], expected: str, fix: str
) -> tuple[dict[str, int], list[tuple[int, list[str]]]] | None:
    """Header positions of ``columns`` and the (line number, cells) rows of the CSV ``path``.

    Records a problem and returns None when the file is missing, unreadable, empty or lacks a
    column; ``expected`` describes the file and ``fix`` says how to get it.
    """
    if not path.is_file():
        report.add(path, "does not exist", expected, missing_file_fix(report.root, path, fix))
        return None
    try:
        # utf-8-sig: spreadsheet programs prepend a byte-order mark the header must not keep.
        with open(path, newline="", encoding="utf-8-sig") as handle:
            lines = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        reason = str(err).replace("\n", " ")
        report.add(path, f"cannot be read as CSV ({reason})", expected, "replace the file")
        return None
    if not lines:
        report.add(path, "is empty", expected, "replace it with the original file")
        return None
    header = [cell.strip() for cell in lines[0]]
    missing = [c for c in columns if c not in header]
    if missing:
        lowered = {h.lower(): h for h in header}
        near = [lowered[c.lower()] for c in missing if c.lower() in lowered]
        hint = f" (column names are case-sensitive: found {shown(near)})" if near else ""
        report.add(
            path,
            f"has no column(s) {shown(missing)} in its header {shown(header, 10)}{hint}",
            f"{expected}",
            "fix the header or use the original file",
        )
        return None
    position = {c: header.index(c) for c in columns}
    rows = [(number, cells) for number, cells in enumerate(lines[1:], start=2) if any(cells)]
    return position, rows


def _folder_name(key: str) -> str:
    # The reference's prompt name: the folder name with "_" as spaces (the tokenizer then
    # collapses the runs of spaces: "Apple___Apple_scab" -> "apple apple scab").
    return key.replace("_", " ")


#: Readable class names of a class-folder target (layout option ``names``): ``curated`` the
#: package's names file, ``folder`` the folder name with underscores as spaces.
CLASS_NAMINGS = ("curated", "folder")


class ClassFolderTarget(Layout):
    """A target with one folder per class (EuroSAT, CropDisease), classes from a names file.

    ``image_dirs``: where the class folders may sit under the root, tried in order ("" is the
    root itself); the first holding a known class folder is used. Option ``names`` (a value of
    :data:`CLASS_NAMINGS`, default ``default_names``: the Mind reference's for the target) says
    where readable class names come from.
    """

    options = ("names",)

    def __init__(
        self, name: str, description: str, image_dirs: tuple[str, ...], names_file: str,
        default_names: str = "curated",
    ) -> None:  # fmt: skip
        self.name = name
        self.description = description
        self.image_dirs = image_dirs
        self.names = load_package_names(names_file)
        self.default_names = default_names

    def read(self, root: Path, report: DataReport, **options: Any) -> Listing | None:
        naming = options.get("names", self.default_names)
        if naming not in CLASS_NAMINGS:
            raise DataError(
                f"{self.name} option names={naming!r}: expected one of {CLASS_NAMINGS} (the "
                f"reference's is {self.default_names!r}); fix --data.options"
            )
        candidates = [root / d if d else root for d in self.image_dirs]
        image_root = next(
            (p for p in candidates if p.is_dir() and set(sub_folders(p)) & set(self.names)), None
        )
        if image_root is None:
            tried = ", ".join(str(p) for p in candidates)
            report.add(
                root, f"has no {self.name} class folder (looked in {tried})",
                f"{self.description}, e.g. a folder {next(iter(self.names))!r}",
                "pass the folder that holds the class folders as --data.root",
            )  # fmt: skip
            return None
        folders = sub_folders(image_root)
        missing = [key for key in self.names if key not in folders]
        if missing:
            report.add(
                image_root, f"has no folder for class(es) {shown(missing)}",
                f"all {len(self.names)} {self.name} class folders (the benchmark uses every "
                "class)", "restore the missing folders from the dataset archive",
            )  # fmt: skip
        extra = [f for f in folders if f not in self.names]
        if extra:
            report.notes.append(
                f"ignored folder(s) {shown(extra)} in {image_root}: not {self.name} classes"
            )
        classes = [f for f in folders if f in self.names]
        entries, skipped = list_class_folders(image_root, classes)
        if skipped:
            report.notes.append(
                f"skipped {len(skipped)} non-image file(s) in {image_root}, e.g. {shown(skipped)}"
            )
        readable = [self.names[c] if naming == "curated" else _folder_name(c) for c in classes]
        return Listing(
            image_root, classes, readable, {"all": entries}, [str(image_root / c) for c in classes]
        )


ISIC_IMAGES = "ISIC2018_Task3_Training_Input"
ISIC_CSV = "ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv"


class ISIC2018(Layout):
    """ISIC 2018 Task 3 training set: ground-truth CSV of one-hot rows and the image folder."""

    name = "isic2018"
    description = f"ISIC 2018 Task 3 training data: {ISIC_IMAGES}/ISIC_*.jpg and {ISIC_CSV}"

    def __init__(self) -> None:
        self.names = load_package_names("isic2018.json")

    def read(self, root: Path, report: DataReport, **options: Any) -> Listing | None:
        image_root = root / ISIC_IMAGES
        csv_path = root / ISIC_CSV
        classes = list(self.names)
        columns = ["image", *classes]
        if not image_root.is_dir():
            report.add(
                image_root, "does not exist", "the folder of Task 3 training images ISIC_*.jpg",
                f"extract {ISIC_IMAGES}.zip into {root}",
            )  # fmt: skip
        table = read_csv(
            csv_path, report, columns,
            f"the Task 3 ground-truth CSV with columns {','.join(columns)}",
            f"extract ISIC2018_Task3_Training_GroundTruth.zip into {root}",
        )  # fmt: skip
        if table is None:
            return None
        position, rows = table
        entries: list[tuple[str, int]] = []
        bad: list[int] = []
        for number, cells in rows:
            label = _one_hot_label([_cell(cells, position[c]) for c in classes])
            image_id = _cell(cells, position["image"])
            if label is None or not image_id:
                bad.append(number)
                continue
            name = image_id if Path(image_id).suffix else f"{image_id}.jpg"
            entries.append((name, label))
        if bad:
            report.add(
                csv_path, f"has malformed row(s) at line(s) {shown(bad, quote=False)}",
                "an image id and seven 0.0/1.0 values with exactly one 1.0 per row",
                "fix or remove those rows, or use the original file",
            )  # fmt: skip
        repeated = [p for p, n in Counter(p for p, _ in entries).items() if n > 1]
        if repeated:
            report.add(
                csv_path, f"lists image(s) {shown(repeated)} more than once",
                "one row per image", "remove the repeated rows",
            )  # fmt: skip
        if image_root.is_dir():
            present, _ = walk_files(image_root)
            listed = (p for p, _ in entries)
            report_absent(report, csv_path, str(image_root), listed, set(present))
            unlisted = len(set(present) - {p for p, _ in entries})
            if unlisted:
                report.notes.append(f"{unlisted} image(s) in {image_root} are not in {csv_path}")
        return Listing(
            image_root, classes, [self.names[c] for c in classes], {"all": entries},
            [str(csv_path)] * len(classes),
        )  # fmt: skip


def _cell(cells: list[str], index: int) -> str:
    return cells[index].strip() if index < len(cells) else ""


def _one_hot_label(values: list[str]) -> int | None:
    """The position of the single 1 among 0/1 values ("1.0", "0"), else None."""
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return None
    if sorted(numbers) != [0.0] * (len(numbers) - 1) + [1.0]:
        return None
    return numbers.index(1.0)


CHESTX_CSV = "Data_Entry_2017.csv"
#: The Mind reference reads every ChestX image resized to 256×256 (``Chest_few_shot_da``).
CHESTX_PRE_RESIZE = 256


class ChestX(Layout):
    """NIH ChestX-ray14: ``Data_Entry_2017.csv`` and its PNGs; single-label images of 7 findings.

    Images may sit in ``images/`` or in the release's ``images_001/images/`` ... folders.
    Option ``pre_resize`` (default 256, the Mind reference's): each image is resized to that
    square when read, with PIL's default filter in the file's own mode, before any framing;
    ``null`` reads it at its own size (1024²).
    """

    name = "chestx"
    description = f"the NIH ChestX-ray14 release: {CHESTX_CSV} and images/*.png"
    options = ("pre_resize",)

    def __init__(self) -> None:
        self.names = load_package_names("chestx.json")

    def read(self, root: Path, report: DataReport, **options: Any) -> Listing | None:
        size = options.get("pre_resize", CHESTX_PRE_RESIZE)
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise DataError(
                f"chestx option pre_resize={size!r}: expected a positive integer (the reference's "
                f"{CHESTX_PRE_RESIZE}) or null (no resize when read); fix --data.options"
            )
        csv_path = root / CHESTX_CSV
        table = read_csv(
            csv_path, report, ["Image Index", "Finding Labels"],
            "the NIH data-entry CSV with columns 'Image Index' and 'Finding Labels'",
            f"download {CHESTX_CSV} from the NIH ChestX-ray14 release into {root}",
        )  # fmt: skip
        folders = [root / "images", *sorted(root.glob("images_*/images"))]
        folders = [f for f in folders if f.is_dir()]
        if not folders:
            report.add(
                root, "has no image folder",
                "the PNGs in images/ or in images_001/images/, images_002/images/, ...",
                "extract the images_0NN.tar.gz archives into the root",
            )  # fmt: skip
        if table is None:
            return None
        location: dict[str, str] = {}
        for folder in folders:
            prefix = folder.relative_to(root).as_posix()
            for image in walk_files(folder)[0]:
                location.setdefault(Path(image).name, f"{prefix}/{image}")
        position, rows = table
        classes = list(self.names)
        label_of = {c: i for i, c in enumerate(classes)}
        kept: list[tuple[str, int]] = []
        for _, cells in rows:
            findings = {f.strip() for f in _cell(cells, position["Finding Labels"]).split("|")}
            name = _cell(cells, position["Image Index"])
            # The benchmark keeps images with exactly one finding, and only the seven classes.
            if len(findings) == 1 and (finding := findings.pop()) in label_of and name:
                kept.append((name, label_of[finding]))
        entries = [(location.get(name, name), label) for name, label in kept]
        if folders:
            searched = shown([str(f) for f in folders], limit=2, quote=False)
            report_absent(report, csv_path, searched, (n for n, _ in kept), set(location))
        return Listing(
            root, classes, [self.names[c] for c in classes], {"all": entries},
            [str(csv_path)] * len(classes), None if size is None else (size, size),
        )  # fmt: skip


LAYOUTS: tuple[Layout, ...] = (
    ClassFolderTarget(
        "eurosat",
        "EuroSAT RGB: 2750/<class>/*.jpg with the 10 land-cover classes",
        ("2750", "EuroSAT/2750", "EuroSAT_RGB", ""),  # EuroSAT_RGB: the Zenodo release
        "eurosat.json",
    ),
    ClassFolderTarget(
        "crop-disease",
        "PlantVillage (CropDisease): train/<class>/*.jpg with the 38 classes",
        ("dataset/train", "train", ""),
        "crop_disease.json",
        default_names="folder",  # the Mind reference prompts with the raw folder names
    ),
    ISIC2018(),
    ChestX(),
)
"""The four CDFSL targets, each registered as a dataset source under its ``name``."""
