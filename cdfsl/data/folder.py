"""``ImageFolder``: the one-sub-folder-per-class layout, as a ``LabelledImages``.

Layout::

    root/
      AnnualCrop/           one folder per class, sorted by folder name -> class index
        img_001.jpg
        more/img_002.png    nested folders are searched too and belong to the class above
      Forest/
        ...

Class folders are the direct sub-folders of ``root``; images are found recursively inside each
and ordered by their path relative to ``root``, so indices are the same on every machine.
Hidden folders (``.git``, ``.ipynb_checkpoints``) and macOS ``__MACOSX`` folders are ignored.

Readable class names (used in prompts) come from a JSON file mapping folder name to name::

    {"AnnualCrop": "annual crop land", "Forest": "forest", ...}

or, without one, from the folder name: camel case, underscores and hyphens are split and the
result lower-cased ("AnnualCrop" and "Annual_Crop" both give "annual crop").
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path

from PIL import Image

from cdfsl.data.images import open_rgb
from cdfsl.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "readable_class_name"]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
_EXTENSIONS_TEXT = " ".join(sorted(IMAGE_EXTENSIONS))

# A lower-case letter or digit followed by an upper-case one ("annualCrop"), or the last capital
# of an acronym followed by a capitalised word ("ISICNevus" -> "ISIC Nevus").
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SEPARATORS = re.compile(r"[\s_\-]+")


def readable_class_name(folder_name: str) -> str:
    """A prompt-ready name from a folder name: "Annual_Crop", "AnnualCrop" -> "annual crop"."""
    words = _SEPARATORS.sub(" ", _CAMEL_BOUNDARY.sub(" ", folder_name)).strip().lower()
    return words or folder_name


def _is_ignored_dir(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _is_image_file(name: str) -> bool:
    # "._x.jpg" files are macOS resource forks left in zip archives: image extension, no image.
    return not name.startswith("._") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _class_files(class_dir: Path) -> tuple[list[Path], list[Path]]:
    """All (images, other files) under ``class_dir``, recursively, following folder links once."""
    images: list[Path] = []
    others: list[Path] = []
    seen: set[str] = set()
    for current, dirnames, filenames in os.walk(class_dir, followlinks=True):
        # Linked folders are followed (datasets are often assembled from links), but a link back
        # up the tree would loop forever: visit each real folder once.
        real = os.path.realpath(current)
        if real in seen:
            dirnames.clear()
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not _is_ignored_dir(d)]
        for name in filenames:
            (images if _is_image_file(name) else others).append(Path(current, name))
    return images, others


def _read_class_names_file(path: Path, folders: list[str]) -> list[str]:
    """Readable names for ``folders`` from a JSON object {folder name: readable name}."""
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"class-names file {path} does not exist; expected a JSON file mapping each class "
            "folder to its readable name; fix the path or leave it out to derive names from folders"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = str(err).replace("\n", " ")
        raise DataError(
            f"cannot read class-names file {path} ({reason}); expected a UTF-8 JSON object "
            'like {"AnnualCrop": "annual crop land"}; fix the file'
        ) from None
    if not isinstance(mapping, dict):
        raise DataError(
            f"class-names file {path} holds a JSON {type(mapping).__name__}; expected an object "
            'mapping folder name to readable name, like {"AnnualCrop": "annual crop land"}'
        )
    missing = [f for f in folders if f not in mapping]
    if missing:
        shown = ", ".join(repr(f) for f in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(
            f"class-names file {path} has no entry for class folder(s) {shown}{more}; expected "
            "one entry per class folder; add them to the file"
        )
    # Entries for folders that are not present are allowed: one file can serve a subset folder.
    bad = [f for f in folders if not isinstance(mapping[f], str) or not mapping[f].strip()]
    if bad:
        raise DataError(
            f"class-names file {path} gives {bad[0]!r} the name {mapping[bad[0]]!r}; expected a "
            "non-empty string; fix the entry"
        )
    return [mapping[f].strip() for f in folders]


class ImageFolder:
    """Labelled images in a ``root/<class folder>/**/<image>`` tree; see the module docstring.

    The tree is listed once, here; images are opened only by ``load``, so a corrupt file is
    reported when it is first used, by name.
    """

    def __init__(
        self, root: str | os.PathLike[str], class_names_file: str | os.PathLike[str] | None = None
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise DataError(
                f"dataset root {self.root} does not exist; expected a folder with one sub-folder "
                "of images per class; fix the path"
            )
        if not self.root.is_dir():
            raise DataError(
                f"dataset root {self.root} is a file, not a folder; expected a folder with one "
                "sub-folder of images per class; pass that folder"
            )

        entries = sorted(self.root.iterdir(), key=lambda p: p.name)
        class_dirs = [p for p in entries if p.is_dir() and not _is_ignored_dir(p.name)]
        if not class_dirs:
            raise DataError(
                f"dataset root {self.root} has no class sub-folders; expected one sub-folder of "
                "images per class (root/<class>/<image>.jpg); move the images into class folders"
            )
        if len(class_dirs) < 2:
            raise DataError(
                f"dataset root {self.root} has 1 class folder ({class_dirs[0].name}); expected at "
                "least 2 classes; pass the folder that contains the class folders"
            )

        # Image files directly under root belong to no class: skipped with the stray files.
        skipped = [p for p in entries if p.is_file() and _is_image_file(p.name)]
        paths: list[Path] = []
        targets: list[int] = []
        for label, class_dir in enumerate(class_dirs):
            images, others = _class_files(class_dir)
            skipped.extend(others)
            if not images:
                raise DataError(
                    f"class folder {class_dir} has no images; expected files ending in "
                    f"{_EXTENSIONS_TEXT}; add images or remove the folder"
                )
            images.sort(key=lambda p: p.relative_to(self.root).as_posix())
            paths.extend(images)
            targets.extend([label] * len(images))
        if skipped:
            warnings.warn(
                f"skipped {len(skipped)} file(s) under {self.root} that are not images in a class "
                f"folder, e.g. {skipped[0]}; images end in {_EXTENSIONS_TEXT}",
                stacklevel=2,
            )

        self._classes = [p.name for p in class_dirs]
        if class_names_file is None:
            names = [readable_class_name(c) for c in self._classes]
        else:
            names = _read_class_names_file(Path(class_names_file).expanduser(), self._classes)
        # Two classes with one name would get identical prompts and be indistinguishable.
        duplicates = [n for n, count in Counter(names).items() if count > 1]
        if duplicates:
            folders = [c for c, n in zip(self._classes, names, strict=True) if n == duplicates[0]]
            raise DataError(
                f"class folders {', '.join(folders)} under {self.root} share the readable name "
                f"{duplicates[0]!r}; expected distinct names; give them distinct names in a "
                "class-names file"
            )
        self._class_names = names
        self._paths = paths
        self._targets = targets

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
        """Folder name of each class, in class-index order."""
        return list(self._classes)

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> Path:
        """The file of image ``index``."""
        return self._paths[index]

    def sample_id(self, index: int) -> str:
        """The path of image ``index`` relative to ``root``, POSIX form ("Forest/img_1.jpg")."""
        return self._paths[index].relative_to(self.root).as_posix()

    def load(self, index: int) -> Image.Image:
        """Image ``index`` as RGB (16-bit rescaled, as every layout reads it); raises
        ``DataError`` naming the file if it is unreadable."""
        return open_rgb(self._paths[index])

    def counts_per_class(self) -> dict[str, int]:
        """Number of images per class, keyed by folder name, in class-index order."""
        counts = Counter(self._targets)
        return {name: counts[label] for label, name in enumerate(self._classes)}

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, {len(self._classes)} classes, {len(self)} images)"
