"""Miniature replicas of the real dataset layouts: the same folders, file names, CSV columns,
JSON and text formats as the releases, with a few tiny images per class.

Every builder writes under ``root`` and returns the folder to pass as ``--data.root``. Images
are small noise images with a per-class base colour; same arguments, same files.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cdfsl.data.cdfsl_targets import ISIC_CSV, ISIC_IMAGES
from cdfsl.data.domainbed import DomainBedDataset
from cdfsl.data.fsl import SplitFileDataset
from cdfsl.data.layout import load_package_names

__all__ = [
    "CHESTX_HEADER",
    "make_chestx",
    "make_crop_disease",
    "make_domainbed",
    "make_eurosat",
    "make_fgvc_aircraft",
    "make_imagenet",
    "make_isic2018",
    "make_split_file_dataset",
    "write_image",
]

SIZE = 8


def write_image(path: Path, colour: int, seed: int, mode: str = "RGB") -> Path:
    """A SIZE×SIZE noise image around grey level / hue ``colour`` in ``mode`` (RGB, L, I;16)."""
    rng = np.random.default_rng([colour, seed])
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGB":
        base = np.array([colour * 37 % 200, colour * 71 % 200, colour * 113 % 200]) + 28
        pixels = np.clip(base + rng.integers(-20, 21, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path)
    elif mode == "L":
        pixels = np.clip(colour * 29 % 200 + rng.integers(0, 40, (SIZE, SIZE)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(path)
    else:  # 16-bit grayscale, as some NIH PNGs
        pixels = (colour * 29 % 200 + rng.integers(0, 40, (SIZE, SIZE))) * 257
        Image.fromarray(pixels.astype(np.uint16)).save(path)
    return path


def make_eurosat(root: Path, per_class: int = 3, skip: Sequence[str] = ()) -> Path:
    """EuroSAT RGB: ``root/2750/<class>/<class>_<i>.jpg`` for the 10 classes (minus ``skip``)."""
    for c, name in enumerate(load_package_names("eurosat.json")):
        if name not in skip:
            for i in range(per_class):
                write_image(root / "2750" / name / f"{name}_{i + 1}.jpg", c, i)
    return root


def make_crop_disease(root: Path, per_class: int = 2) -> Path:
    """PlantVillage as the Kaggle release: ``root/dataset/train/<class>/<uuid>___<tag>.JPG``."""
    for c, name in enumerate(load_package_names("crop_disease.json")):
        for i in range(per_class):
            write_image(root / "dataset" / "train" / name / f"{c:04d}{i:04d}___RS_L.JPG", c, i)
    return root


def make_isic2018(root: Path, per_class: int = 3, one_hot: str = "{:.1f}") -> Path:
    """ISIC 2018 Task 3: ``ISIC_00243NN.jpg`` images and the one-hot ground-truth CSV."""
    classes = list(load_package_names("isic2018.json"))
    images = root / ISIC_IMAGES
    rows = []
    for i in range(per_class * len(classes)):
        label = i % len(classes)
        image_id = f"ISIC_{24306 + i:07d}"
        write_image(images / f"{image_id}.jpg", label, i)
        rows.append([image_id, *(one_hot.format(float(c == label)) for c in range(len(classes)))])
    # The release ships these two beside the images.
    (images / "ATTRIBUTION.txt").write_text("attribution\n")
    (images / "LICENSE.txt").write_text("license\n")
    csv_path = root / ISIC_CSV
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", *classes])
        writer.writerows(rows)
    return root


CHESTX_HEADER = [
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
    "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
    "OriginalImagePixelSpacing[x", "y]", "",
]  # fmt: skip
"""The header of the NIH ``Data_Entry_2017.csv``, bracketed names split by their commas."""


def make_chestx(root: Path, per_class: int = 3, spread: bool = True) -> Path:
    """NIH ChestX-ray14: ``Data_Entry_2017.csv`` and grayscale PNGs.

    ``spread``: images over ``images_001/images`` and ``images_002/images`` as the release;
    else all in ``images/``. Multi-label, "No Finding" and other-finding rows are written too
    (the loader must drop them); the second image is 16-bit.
    """
    classes = list(load_package_names("chestx.json"))
    labels = [c for c in classes for _ in range(per_class)]
    labels += ["Cardiomegaly|Effusion", "No Finding", "Pneumonia", "Hernia|Mass"]
    rows = []
    for i, finding in enumerate(labels):
        name = f"{i + 1:08d}_000.png"
        folder = f"images_{1 + i % 2:03d}/images" if spread else "images"
        colour = classes.index(finding) if finding in classes else 9
        write_image(root / folder / name, colour, i, "I;16" if i == 1 else "L")
        size_and_spacing = ["2682", "2749", "0.143", "0.143", ""]
        rows.append([name, finding, "0", str(i + 1), "58", "M", "PA", *size_and_spacing])
    with open(root / "Data_Entry_2017.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CHESTX_HEADER)
        writer.writerows(rows)
    return root


def make_split_file_dataset(
    root: Path, row: SplitFileDataset, classes: Sequence[str] = ("Abyssinian", "beagle", "Sphynx"),
    per_split: Sequence[int] = (3, 1, 2),
) -> Path:  # fmt: skip
    """A CoOp dataset: ``root/<directory>/<split_file>`` and its images in class folders.

    Classes get labels in order; ``per_split``: images per class in train, val, test. Returns
    the data root holding ``<directory>`` (as CoOp's DATA folder).
    """
    folder = root / row.directory
    image_root = folder / row.image_dir if row.image_dir else folder
    split: dict[str, list] = {}
    number = 0
    for name, count in zip(("train", "val", "test"), per_split, strict=True):
        split[name] = []
        for label, classname in enumerate(classes):
            for _ in range(count):
                number += 1
                path = f"{classname.replace(' ', '_')}/image_{number:04d}.jpg"
                write_image(image_root / path, label, number)
                split[name].append([path, label, classname])
    (folder / row.split_file).write_text(json.dumps(split))
    return root


def make_fgvc_aircraft(
    root: Path, variants: Sequence[str] = ("707-320", "Cessna 172", "F-16A/B"), per_split: int = 2
) -> Path:
    """FGVC-Aircraft 2013b: ``fgvc-aircraft-2013b/data/`` with variants and split lists."""
    data = root / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "variants.txt").write_text("".join(f"{v}\n" for v in variants))
    image_id = 1025794
    for split in ("train", "val", "test"):
        lines = []
        for label, variant in enumerate(variants):
            for _ in range(per_split):
                image_id += 1
                write_image(data / "images" / f"{image_id:07d}.jpg", label, image_id)
                lines.append(f"{image_id:07d} {variant}\n")
        (data / f"images_variant_{split}.txt").write_text("".join(lines))
    return root


def make_imagenet(
    root: Path, classes: Sequence[tuple[str, str]] = (
        ("n01440764", "tench"), ("n01443537", "goldfish"), ("n01484850", "great white shark")
    ), per_class: tuple[int, int] = (3, 2),
) -> Path:  # fmt: skip
    """ImageNet as CoOp wants it: ``imagenet/classnames.txt`` and ``images/{train,val}/<wnid>/``."""
    folder = root / "imagenet"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in classes))
    for label, (wnid, _) in enumerate(classes):
        for i in range(per_class[0]):
            write_image(folder / "images/train" / wnid / f"{wnid}_{i + 1}.JPEG", label, i)
        for i in range(per_class[1]):
            name = f"ILSVRC2012_val_{label * 100 + i + 1:08d}.JPEG"
            write_image(folder / "images/val" / wnid / name, label, 100 + i)
    return root


def make_domainbed(
    root: Path, dataset: DomainBedDataset, classes: Sequence[str] | None = None, per_class: int = 2
) -> Path:
    """``root/<directory>/<domain>/<class>/*.jpg`` for every domain of ``dataset``."""
    classes = classes or [f"class_{c}" for c in range(dataset.num_classes)]
    for d, domain in enumerate(dataset.domains):
        for label, name in enumerate(classes):
            for i in range(per_class):
                path = root / dataset.directory / domain / name / f"pic_{d}{i:03d}.jpg"
                write_image(path, label, d * 100 + i)
    return root
