"""DomainBed folders, ``ROOT/<domain>/<class>/*.jpg``, split leave-one-domain-out.

==================  ================  ==============================================  =======
source              folder            domains                                         classes
==================  ================  ==============================================  =======
pacs                PACS              art_painting, cartoon, photo, sketch                  7
vlcs                VLCS              Caltech101, LabelMe, SUN09, VOC2007                   5
office-home         office_home       Art, Clipart, Product, Real World                    65
terra-incognita     terra_incognita   location_100, location_38, location_43, location_46  10
domainbed           (root itself)     every sub-folder of the root                          -
==================  ================  ==============================================  =======

``--data.root`` is the dataset folder or DomainBed's data root holding it. Every domain must have
the same class folders, so all domains share one class list (sorted folder names; readable
names from the folder names, "Alarm_Clock" -> "alarm clock"). With the option
``target_domain``, the splits are ``train`` (every other domain), ``test`` (the held-out
domain) and each domain by its own name; ``cdfsl eval`` uses ``test``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdfsl.data.layout import (
    DataReport,
    ImageList,
    Layout,
    Listing,
    list_class_folders,
    readable_class_name,
    shown,
    sub_folders,
)
from cdfsl.errors import DataError

__all__ = [
    "DOMAINBED_DATASETS",
    "LAYOUTS",
    "DomainBedDataset",
    "DomainFolders",
    "LeaveOneDomainOut",
    "leave_one_domain_out",
]


@dataclass(frozen=True)
class DomainBedDataset:
    """One DomainBed dataset: its source name, folder, domains and number of classes."""

    name: str
    directory: str
    domains: tuple[str, ...]
    num_classes: int


DOMAINBED_DATASETS: tuple[DomainBedDataset, ...] = (
    DomainBedDataset("pacs", "PACS", ("art_painting", "cartoon", "photo", "sketch"), 7),
    DomainBedDataset("vlcs", "VLCS", ("Caltech101", "LabelMe", "SUN09", "VOC2007"), 5),
    DomainBedDataset("office-home", "office_home", ("Art", "Clipart", "Product", "Real World"), 65),
    DomainBedDataset(
        "terra-incognita", "terra_incognita",
        ("location_100", "location_38", "location_43", "location_46"), 10,
    ),
)  # fmt: skip


class DomainFolders(Layout):
    """``<domain>/<class>/*`` folders; ``dataset`` fixes the domains and class count, or None
    accepts any (the ``domainbed`` source)."""

    default_split = "test"
    required_splits = ()  # checked per domain in read()
    options = ("target_domain",)

    def __init__(self, dataset: DomainBedDataset | None = None) -> None:
        self.dataset = dataset
        if dataset is None:
            self.name = "domainbed"
            self.description = "one folder per domain, each with one folder per class"
        else:
            self.name = dataset.name
            self.description = (
                f"{dataset.directory}/<domain>/<class>/*.jpg with domains "
                f"{', '.join(dataset.domains)}"
            )

    def read(
        self, root: Path, report: DataReport, target_domain: str | None = None, **options: Any
    ) -> Listing | None:
        folder = root
        if self.dataset is not None and (root / self.dataset.directory).is_dir():
            folder = root / self.dataset.directory
        domains = sub_folders(folder)
        if self.dataset is not None:
            expected = self.dataset.domains
            missing = [d for d in expected if d not in domains]
            if missing:
                report.add(
                    folder, f"has no folder for domain(s) {shown(missing)}",
                    f"the {len(expected)} {self.name} domains {', '.join(expected)}",
                    "extract the missing domains or pass the dataset folder as --data.root",
                )  # fmt: skip
            extra = [d for d in domains if d not in expected]
            if extra:
                report.notes.append(f"ignored folder(s) {shown(extra)} in {folder}: not domains")
            domains = [d for d in domains if d in expected]
        if len(domains) < 2:
            report.add(
                folder, f"has {len(domains)} domain folder(s)", self.description,
                "pass the folder that holds the domain folders as --data.root",
            )  # fmt: skip
            return None
        if target_domain is not None and target_domain not in domains:
            report.add(
                folder, f"has no domain {target_domain!r} (the target_domain option)",
                f"one of {', '.join(domains)}", "fix --data.options",
            )  # fmt: skip
        class_dirs = {d: sub_folders(folder / d) for d in domains}
        classes = sorted({c for names in class_dirs.values() for c in names})
        for domain, names in class_dirs.items():
            absent = [c for c in classes if c not in names]
            if absent:
                report.add(
                    folder / domain, f"has no folder for class(es) {shown(absent)}",
                    "the same class folders in every domain (one shared label space)",
                    "restore them from the dataset archive",
                )  # fmt: skip
        if self.dataset is not None and len(classes) != self.dataset.num_classes:
            report.add(
                folder, f"has {len(classes)} classes", f"{self.dataset.num_classes} classes",
                "restore the dataset from its archive",
            )  # fmt: skip
        splits: dict[str, list[tuple[str, int]]] = {}
        for domain in domains:
            entries = list_class_folders(folder / domain, classes)[0]
            found = {label for _, label in entries}
            for label, name in enumerate(classes):
                if name in class_dirs[domain] and label not in found:
                    report.add(
                        folder / domain / name, "has no images", "image files (.jpg, .png, ...)",
                        "add the class's images",
                    )  # fmt: skip
            splits[domain] = [(f"{domain}/{path}", label) for path, label in entries]
        names = [readable_class_name(c) for c in classes]
        locations = [str(folder / "*" / c) for c in classes]
        return Listing(folder, classes, names, splits, locations)

    def arrange(
        self, listing: Listing, target_domain: str | None = None, **options: Any
    ) -> dict[str, list[tuple[str, int]]]:
        """``train`` (all other domains), ``test`` (``target_domain``) and each domain."""
        domains = list(listing.splits)
        if target_domain is None:
            raise DataError(
                f"dataset source {self.name!r} needs a held-out domain; expected one of "
                f"{', '.join(domains)}; pass --data.options "
                f'\'{{"target_domain": "{domains[0]}"}}\''
            )
        train = [e for d in domains if d != target_domain for e in listing.splits[d]]
        return {"train": train, "test": listing.splits[target_domain], **listing.splits}


@dataclass
class LeaveOneDomainOut:
    """One DG split: ``train`` (the other domains), ``test`` (``target_domain``), one class list.

    ``domains`` holds every domain's images on its own (the training domains included), for
    methods that batch per domain.
    """

    target_domain: str
    train: ImageList
    test: ImageList
    domains: dict[str, ImageList]


def leave_one_domain_out(
    root: str | Path, target_domain: str, dataset: str = "domainbed"
) -> LeaveOneDomainOut:
    """Read ``root`` as the DomainBed ``dataset`` (a source name) and hold out ``target_domain``.

    Raises ``DataError`` with the first problem of the folder.
    """
    layout = next((x for x in LAYOUTS if x.name == dataset), None)
    if layout is None:
        known = ", ".join(x.name for x in LAYOUTS)
        raise DataError(f"unknown DomainBed dataset {dataset!r}; expected one of {known}")
    splits = layout.splits(root, target_domain=target_domain)
    train, test = splits.pop("train"), splits.pop("test")
    return LeaveOneDomainOut(target_domain, train, test, splits)


LAYOUTS: tuple[DomainFolders, ...] = (
    *(DomainFolders(d) for d in DOMAINBED_DATASETS),
    DomainFolders(),
)
"""The DomainBed layouts, each registered as a dataset source under its ``name``."""
