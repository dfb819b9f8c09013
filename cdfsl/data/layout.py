"""Dataset layouts as the papers ship them: read a folder, report what is wrong, list its splits.

A ``Layout`` knows one on-disk format (class folders, a ground-truth CSV, a split file, ...). Its
``read`` turns the metadata under a root folder into a ``Listing`` — classes, readable names and,
per split, (image path, class) pairs — and records every defect it meets as a ``Problem`` (the
file, what was found, what was expected, the fix) instead of stopping at the first. The shared
checks (root exists, every class has images, readable names are distinct) run here, once for
all layouts. Nothing is decoded: images are opened only by ``ImageList.load``.

``layout.validate(root)`` returns the ``DataReport`` (what ``cdfsl data check`` prints);
``layout(root, split=...)`` and ``layout.splits(root)`` return ``ImageList`` datasets and raise
``DataError`` with the first problem if there is any, so a bad folder fails before training.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from cdfsl.data.base import LabelledImages
from cdfsl.data.images import open_rgb
from cdfsl.errors import DataError
from cdfsl.plumbing import PROMPT_TEMPLATE

__all__ = [
    "GENERIC_TEMPLATE",
    "IMAGE_EXTENSIONS",
    "DataReport",
    "ImageList",
    "Layout",
    "Listing",
    "Problem",
    "check_episode_supply",
    "list_class_folders",
    "open_rgb",
    "prompt_template",
    "readable_class_name",
    "sub_folders",
    "walk_files",
]

GENERIC_TEMPLATE = PROMPT_TEMPLATE
"""The prompt of datasets without their own, and the default of every method's ``template``."""

_SHOWN = 3  # examples named in a message about many files

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
"""The file endings every layout reads as images (any case)."""

# A lower-case letter or digit followed by an upper-case one ("annualCrop"), or the last capital
# of an acronym followed by a capitalised word ("ISICNevus" -> "ISIC Nevus").
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SEPARATORS = re.compile(r"[\s_\-]+")


def readable_class_name(folder_name: str) -> str:
    """A prompt-ready name from a folder name: "Annual_Crop", "AnnualCrop" -> "annual crop"."""
    words = _SEPARATORS.sub(" ", _CAMEL_BOUNDARY.sub(" ", folder_name)).strip().lower()
    return words or folder_name


def is_ignored_dir(name: str) -> bool:
    """Hidden folders (``.git``, ``.ipynb_checkpoints``) and macOS ``__MACOSX`` folders."""
    return name.startswith(".") or name == "__MACOSX"


def is_image_file(name: str) -> bool:
    """True for a file name with an image ending, other than a macOS ``._x.jpg`` resource fork."""
    return not name.startswith("._") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Problem:
    """One defect of a dataset folder: ``where`` (a file or folder), what was ``found``, what was
    ``expected`` and the ``fix``."""

    where: str
    found: str
    expected: str
    fix: str

    def __str__(self) -> str:
        text = f"{self.where}: {self.found}" if self.where else self.found
        return (
            text
            + (f"; expected {self.expected}" if self.expected else "")
            + (f"; {self.fix}" if self.fix else "")
        )


@dataclass
class DataReport:
    """What a layout found under ``root``: problems, notes, classes and images per class per split.

    counts: split -> (C,) images per class, class-index order. notes: harmless oddities (files
    skipped, extra folders). ``ok`` is True when there are no problems.
    """

    source: str
    root: Path
    image_root: Path | None = None
    template: str = GENERIC_TEMPLATE
    classes: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    counts: dict[str, list[int]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, where: Path | str, found: str, expected: str, fix: str) -> None:
        """Record a problem."""
        self.problems.append(Problem(str(where), found, expected, fix))

    def raise_for_problems(self) -> None:
        """Raise ``DataError`` with the first problem (and how to list the rest), if any."""
        if not self.problems:
            return
        first = str(self.problems[0])
        if len(self.problems) > 1:
            first += (
                f" ({len(self.problems) - 1} more problem(s): "
                f"cdfsl data check {self.source} {self.root})"
            )
        raise DataError(first)

    def format(self) -> str:
        """A text table of images per class (rows) and split (columns), then notes and problems."""
        lines = [f"source: {self.source}", f"root: {self.root}"]
        if self.image_root is not None and self.image_root != self.root:
            lines.append(f"images: {self.image_root}")
        lines.append(f"template: {self.template}")
        if self.classes:
            splits = list(self.counts)
            key_width = max(len("class"), *(len(c) for c in self.classes))
            name_width = max(len("name"), *(len(n) for n in self.class_names))
            widths = [max(len(s), 7) for s in splits]

            def row(key: str, name: str, cells: Sequence[object]) -> str:
                columns = "".join(f"  {v!s:>{w}}" for v, w in zip(cells, widths, strict=True))
                return f"{key:<{key_width}}  {name:<{name_width}}{columns}"

            lines.append(row("class", "name", splits))
            for c, (key, name) in enumerate(zip(self.classes, self.class_names, strict=True)):
                lines.append(row(key, name, [self.counts[s][c] for s in splits]))
            lines.append(row("total", "", [sum(self.counts[s]) for s in splits]))
        lines.extend(f"note: {note}" for note in self.notes)
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines.extend(f"  - {problem}" for problem in self.problems)
        else:
            total_images = sum(sum(c) for c in self.counts.values())
            lines.append(f"ok: {len(self.classes)} classes, {total_images} images")
        return "\n".join(lines)


class ImageList:
    """Labelled images listed by a layout: files relative to ``image_root``, with their classes.

    Satisfies ``LabelledImages``. ``sample_id(i)`` is the file's POSIX path relative to
    ``image_root``; ``template`` is the dataset's prompt (see ``prompt_template``);
    ``classes`` are the class keys of the layout (folder, CSV column, wnid) and
    ``class_location(c)`` says where class ``c``'s images are listed, for error messages.
    """

    def __init__(
        self,
        image_root: Path,
        files: Sequence[str],
        targets: Sequence[int],
        class_names: Sequence[str],
        classes: Sequence[str] | None = None,
        template: str = GENERIC_TEMPLATE,
        class_locations: Sequence[str] | None = None,
        name: str = "",
        read_size: tuple[int, int] | None = None,
    ) -> None:
        if len(files) != len(targets):
            raise ValueError(f"{len(files)} files but {len(targets)} targets")
        self.image_root = Path(image_root)
        self._files = list(files)
        self._targets = [int(t) for t in targets]
        self._class_names = list(class_names)
        self._classes = list(classes) if classes is not None else list(class_names)
        self._locations = list(class_locations) if class_locations is not None else None
        self.template = template
        self.name = name
        #: (width, height) every image is resized to when read (``open_rgb``), or None.
        self.read_size = read_size

    @property
    def targets(self) -> list[int]:
        """Class index of each image, (len(self),); a copy."""
        return list(self._targets)

    @property
    def class_names(self) -> list[str]:
        """Readable name of each class, in class-index order."""
        return list(self._class_names)

    @property
    def classes(self) -> list[str]:
        """The layout's key of each class (folder name, CSV column, ...), class-index order."""
        return list(self._classes)

    def __len__(self) -> int:
        return len(self._files)

    def path(self, index: int) -> Path:
        """The file of image ``index``."""
        return self.image_root / self._files[index]

    def sample_id(self, index: int) -> str:
        return self._files[index]

    def load(self, index: int) -> Image.Image:
        """Image ``index`` as RGB; raises ``DataError`` naming the file if it is unreadable."""
        return open_rgb(self.path(index), self.read_size)

    def class_location(self, label: int) -> str:
        """Where class ``label``'s images are listed (a folder, or a file and its class key)."""
        if self._locations is not None:
            return self._locations[label]
        return f"class {self._classes[label]!r} under {self.image_root}"

    def counts_per_class(self) -> dict[str, int]:
        """Images per class, keyed by class key, in class-index order."""
        counts = Counter(self._targets)
        return {key: counts[c] for c, key in enumerate(self._classes)}

    def __repr__(self) -> str:
        label = f"{self.name!r}, " if self.name else ""
        return (
            f"ImageList({label}{str(self.image_root)!r}, {len(self._classes)} classes, "
            f"{len(self)} images)"
        )


@dataclass
class Listing:
    """A dataset as its metadata describes it, before any image is opened.

    image_root: the folder the image paths are relative to; classes: the layout's class keys
    (folder, CSV column, wnid), class-index order; class_names: readable names, same order;
    splits: split name -> (image path relative to image_root, class index) pairs;
    locations: the folder or file that lists each class's images, for messages;
    read_size: (width, height) every image is resized to when read, or None.
    """

    image_root: Path
    classes: list[str]
    class_names: list[str]
    splits: dict[str, list[tuple[str, int]]]
    locations: list[str]
    read_size: tuple[int, int] | None = None


def walk_files(folder: Path) -> tuple[list[str], list[str]]:
    """(image files, other files) under ``folder``, recursively, as sorted POSIX paths relative to
    ``folder``. Ignored folders (``is_ignored_dir``) are skipped; folder links are followed, each
    real folder visited once."""
    images: list[str] = []
    others: list[str] = []
    seen: set[str] = set()
    for current, dirnames, filenames in os.walk(folder, followlinks=True):
        # Linked folders are followed (datasets are often assembled from links), but a link back
        # up the tree would loop forever: visit each real folder once.
        real = os.path.realpath(current)
        if real in seen:
            dirnames.clear()
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not is_ignored_dir(d)]
        for name in filenames:
            relative = Path(current, name).relative_to(folder).as_posix()
            (images if is_image_file(name) else others).append(relative)
    return sorted(images), sorted(others)


def sub_folders(folder: Path) -> list[str]:
    """Names of the visible direct sub-folders of ``folder``, sorted."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not is_ignored_dir(p.name))


def list_class_folders(
    folder: Path, classes: Sequence[str]
) -> tuple[list[tuple[str, int]], list[str]]:
    """The one class-folder reader: images of ``folder/<classes[c]>/**`` with class index ``c``.

    Returns (image path relative to ``folder``, class index) pairs, class-major and sorted by
    path within a class, and the other files found, relative to ``folder``. A class whose folder
    is absent contributes nothing (the layout reports it).
    """
    entries: list[tuple[str, int]] = []
    others: list[str] = []
    for label, key in enumerate(classes):
        if not (folder / key).is_dir():
            continue
        images, rest = walk_files(folder / key)
        entries.extend((f"{key}/{image}", label) for image in images)
        others.extend(f"{key}/{other}" for other in rest)
    return entries, others


def find_elsewhere(root: Path, filename: str, depth: int = 3) -> Path | None:
    """A file called ``filename`` at most ``depth`` folders below ``root``, for "move it" hints."""
    for current, dirnames, filenames in os.walk(root):
        level = len(Path(current).relative_to(root).parts)
        if filename in filenames:
            return Path(current, filename)
        if level >= depth:
            dirnames.clear()
        dirnames[:] = [d for d in sorted(dirnames) if not is_ignored_dir(d)]
    return None


def missing_file_fix(root: Path, expected: Path, how: str) -> str:
    """The fix for a missing metadata file: move the copy found under ``root``, else ``how``."""
    found = find_elsewhere(root, expected.name) if root.is_dir() else None
    if found is not None and found != expected:
        return f"a copy is at {found}: move it to {expected}"
    return how


def shown(items: Sequence[object], limit: int = _SHOWN, quote: bool = True) -> str:
    """``items`` as "'a', 'b', 'c' and 7 more" (unquoted with ``quote=False``)."""
    text = ", ".join(repr(i) if quote else str(i) for i in items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


def report_absent(
    report: DataReport, listed_in: Path, searched: str, listed: Iterable[str], present: set[str]
) -> None:
    """Record one problem for the ``listed`` images not in ``present`` (found in ``searched``)."""
    absent = sorted({p for p in listed if p not in present})
    if absent:
        report.add(
            listed_in,
            f"lists {len(absent)} image(s) absent from {searched}, e.g. {shown(absent)}",
            "every listed image to exist",
            "restore the missing files (re-extract the dataset archive) or pass the right "
            "--data.root",
        )


def read_names_file(path: Path, report: DataReport) -> dict[str, str]:
    """A JSON object {class key: readable name} from ``path``; problems go to ``report``."""
    expected = 'a class-names file: a UTF-8 JSON object like {"AnnualCrop": "annual crop land"}'
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        report.add(path, "does not exist", expected, "fix the path")
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = str(err).replace("\n", " ")
        report.add(path, f"cannot be read ({reason})", expected, "fix the file")
        return {}
    if not isinstance(mapping, dict):
        report.add(path, f"holds a JSON {type(mapping).__name__}", expected, "fix the file")
        return {}
    bad = [k for k, v in mapping.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        report.add(
            path, f"gives {bad[0]!r} the name {mapping[bad[0]]!r}",
            expected + " with non-empty names", "fix the entry",
        )  # fmt: skip
        return {}
    return {str(k): v.strip() for k, v in mapping.items()}


def load_package_names(filename: str) -> dict[str, str]:
    """The built-in readable names ``cdfsl/data/classnames/<filename>``: {class key: name}."""
    path = Path(__file__).with_name("classnames") / filename
    return json.loads(path.read_text(encoding="utf-8"))


class Layout(ABC):
    """One on-disk dataset format, registered as a source under ``name``.

    Subclasses set ``name``, ``description``, ``template`` (the dataset's prompt),
    ``default_split`` (the split ``cdfsl eval`` uses; ``"all"``: the layout has no train / test
    splits), ``required_splits`` (splits in which every class must have images), ``options``
    (extra keyword options they accept) and ``names_file_complete`` (a ``class_names`` file must
    name every class, as there are no built-in names to fall back on), and implement ``read``.
    """

    name: str
    description: str
    template: str = GENERIC_TEMPLATE
    default_split: str = "all"
    required_splits: tuple[str, ...] = ("all",)
    options: tuple[str, ...] = ()
    names_file_complete: bool = False

    @property
    def has_splits(self) -> bool:
        """True if the layout lists train / test splits, not only the whole dataset (``all``)."""
        return self.default_split != "all"

    @abstractmethod
    def read(self, root: Path, report: DataReport, **options: Any) -> Listing | None:
        """The listing of ``root`` (an existing folder); problems go to ``report``.

        Returns None when nothing can be listed (e.g. the metadata file is missing).
        """

    def arrange(self, listing: Listing, **options: Any) -> dict[str, list[tuple[str, int]]]:
        """The splits ``splits()`` returns; the listing's own by default. ``read`` has already
        checked ``options``; this may still raise ``DataError`` for a missing one."""
        return listing.splits

    def scan(
        self, root: str | os.PathLike[str] | None, class_names: str | None = None,
        template: str | None = None, **options: Any,
    ) -> tuple[DataReport, Listing | None]:  # fmt: skip
        """Read ``root`` and run the shared checks: the report and the listing (None if unusable).

        class_names: optional JSON file {class key: readable name} overriding built-in names;
        template: optional prompt overriding the dataset's.
        """
        options.pop("split", None)  # chooses among the splits; reading lists them all
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(("split", "template", *self.options))
            raise DataError(
                f"unknown option(s) {', '.join(unknown)} for dataset source {self.name!r}; "
                f"expected some of: {known}; fix --data.options"
            )
        if root is None:
            raise DataError(
                f"no dataset root given for source {self.name!r}; expected {self.description}; "
                "pass --data.root DIR"
            )
        root = Path(root).expanduser()
        report = DataReport(self.name, root, template=template or self.template)
        if template is not None and "{}" not in template:
            report.add(
                "template option", f"{template!r} has no '{{}}'", "a prompt with '{}' for the "
                "class name", "fix --data.options",
            )  # fmt: skip
        if not root.is_dir():
            found = "is a file, not a folder" if root.exists() else "does not exist"
            report.add(root, found, self.description, "pass the dataset folder as --data.root")
            return report, None
        listing = self.read(root, report, **options)
        if listing is None:
            return report, None
        report.image_root = listing.image_root
        if class_names is not None:
            names_path = Path(class_names).expanduser()
            names = read_names_file(names_path, report)
            missing = [key for key in listing.classes if key not in names]
            if names and missing and self.names_file_complete:
                report.add(
                    names_path, f"has no entry for class(es) {shown(missing, 5)}",
                    "one entry per class in the class-names file", "add them to the file",
                )  # fmt: skip
            pairs = zip(listing.classes, listing.class_names, strict=True)
            listing.class_names = [names.get(key, name) for key, name in pairs]
        self._check_classes(listing, report)
        report.classes = list(listing.classes)
        report.class_names = list(listing.class_names)
        for split, entries in listing.splits.items():
            counts = Counter(label for _, label in entries)
            report.counts[split] = [counts[c] for c in range(len(listing.classes))]
        return report, listing

    def _check_classes(self, listing: Listing, report: DataReport) -> None:
        if len(listing.classes) < 2:
            report.add(
                listing.image_root, f"has {len(listing.classes)} class(es)",
                f"at least 2 classes ({self.description})", "pass the right --data.root",
            )  # fmt: skip
        for split in self.required_splits:
            counts = Counter(label for _, label in listing.splits.get(split, []))
            for c, key in enumerate(listing.classes):
                if counts[c] == 0:
                    where = f" in split {split!r}" if split != "all" else ""
                    report.add(
                        listing.locations[c], f"no images of class {key!r}{where}",
                        "at least one image per class", "add the class's images",
                    )  # fmt: skip
        repeated = [n for n, k in Counter(listing.class_names).items() if k > 1]
        if repeated:
            pairs = zip(listing.classes, listing.class_names, strict=True)
            keys = [key for key, name in pairs if name == repeated[0]]
            report.add(
                listing.image_root,
                f"classes {shown(keys)} share the readable name {repeated[0]!r}",
                "distinct names (identical prompts cannot be told apart)",
                "give them distinct names in a --data.class_names JSON file",
            )

    def validate(
        self, root: str | os.PathLike[str] | None, class_names: str | None = None, **options: Any
    ) -> DataReport:
        """Everything wrong with ``root`` as this layout, plus images per class and split."""
        template = options.pop("template", None)
        return self.scan(root, class_names, template, **options)[0]

    def splits(
        self, root: str | os.PathLike[str] | None, class_names: str | None = None, **options: Any
    ) -> dict[str, ImageList]:
        """Every split of ``root`` as an ``ImageList``; raises ``DataError`` on any problem."""
        template = options.pop("template", None)
        report, listing = self.scan(root, class_names, template, **options)
        report.raise_for_problems()
        assert listing is not None  # a listing-less scan always records a problem
        for note in report.notes:
            warnings.warn(note, stacklevel=3)
        locations = listing.locations
        return {
            split: ImageList(
                listing.image_root,
                [path for path, _ in entries],
                [label for _, label in entries],
                listing.class_names,
                listing.classes,
                report.template,
                locations,
                name=f"{self.name}:{split}",
                read_size=listing.read_size,
            )
            for split, entries in self.arrange(listing, **options).items()
        }

    def __call__(
        self, root: str | os.PathLike[str] | None, class_names: str | None = None,
        split: str | None = None, **options: Any,
    ) -> ImageList:  # fmt: skip
        """The ``split`` (default ``default_split``) of ``root``, checked; see ``splits``."""
        splits = self.splits(root, class_names, **options)
        split = split or self.default_split
        if split not in splits:
            raise DataError(
                f"dataset source {self.name!r} has no split {split!r}; expected one of "
                f"{', '.join(splits)}; fix --data.options"
            )
        return splits[split]


def prompt_template(method_template: str, dataset: LabelledImages) -> str:
    """The prompt a run uses: the method's, unless it is the generic default and the dataset has
    its own ``template`` (CoOp's per-dataset prompts); then the dataset's."""
    own = getattr(dataset, "template", None)
    if method_template == GENERIC_TEMPLATE and isinstance(own, str):
        return own
    return method_template


def _class_location(dataset: LabelledImages, label: int) -> str:
    locate = getattr(dataset, "class_location", None)
    if callable(locate):
        return locate(label)
    root, classes = getattr(dataset, "root", None), getattr(dataset, "classes", None)
    if root is not None and classes is not None:  # one folder per class under root
        return str(Path(root) / classes[label])
    return repr(dataset.class_names[label])


def check_episode_supply(
    dataset: LabelledImages, n_way: int, k_shot: int, n_query: int
) -> list[int]:
    """Classes too small for N-way K-shot episodes with Q queries; raises if fewer than N remain.

    Raises ``DataError`` naming where each short class lives when the protocol cannot be served;
    otherwise returns the short classes (never drawn) and warns about them. Non-positive
    arguments are left to ``EpisodeSampler`` to report.
    """
    if not all(isinstance(v, int) and v > 0 for v in (n_way, k_shot, n_query)):
        return []
    needed = k_shot + n_query
    counts = Counter(dataset.targets)
    names = dataset.class_names
    short = [c for c in range(len(names)) if counts[c] < needed]
    if not short:
        return []
    # Classes listed in one file (a CSV, a split file) are named together after it.
    places: dict[str, list[str]] = {}
    for c in short:
        places.setdefault(_class_location(dataset, c), []).append(f"{names[c]!r} ({counts[c]})")
    groups = list(places.items())
    listed = "; ".join(f"{shown(classes, quote=False)} in {where}" for where, classes in groups[:2])
    if len(groups) > 2:
        listed += f" and {sum(len(classes) for _, classes in groups[2:])} more"
    if len(names) - len(short) < n_way:
        raise DataError(
            f"{n_way}-way {k_shot}-shot episodes with {n_query} queries need {needed} images in "
            f"each of {n_way} classes, but {len(short)} of {len(names)} classes have fewer: "
            f"{listed}; lower --shot, --query or --way, or add images there"
        )
    warnings.warn(
        f"{len(short)} class(es) have fewer than {needed} images and never appear in episodes: "
        f"{listed}",
        stacklevel=2,
    )
    return short
