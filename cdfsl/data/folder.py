"""The ``folder`` layout: one sub-folder per class, the default ``--data.source``.

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

which must name every class folder, or, without one, from the folder name: camel case,
underscores and hyphens are split and the result lower-cased ("AnnualCrop" and "Annual_Crop"
both give "annual crop").

``FOLDER`` is the layout registered as the ``folder`` source (``cdfsl data check folder ROOT``
prints its report); ``ImageFolder(root)`` is the same dataset under its older name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cdfsl.data.layout import (
    IMAGE_EXTENSIONS,
    DataReport,
    ImageList,
    Layout,
    Listing,
    is_image_file,
    list_class_folders,
    readable_class_name,
    sub_folders,
)

__all__ = ["FOLDER", "IMAGE_EXTENSIONS", "ClassFolders", "ImageFolder", "readable_class_name"]

_EXTENSIONS_TEXT = " ".join(sorted(IMAGE_EXTENSIONS))


class ClassFolders(Layout):
    """``root/<class folder>/**/<image>``; see the module docstring. One split, ``all``."""

    name = "folder"
    description = "root/<class>/<image>: one sub-folder of images per class"
    names_file_complete = True

    def read(self, root: Path, report: DataReport, **options: Any) -> Listing | None:
        classes = sub_folders(root)
        if not classes:
            report.add(
                root, "has no class sub-folders",
                "one sub-folder of images per class (root/<class>/<image>.jpg)",
                "move the images into class folders",
            )  # fmt: skip
            return None
        entries, others = list_class_folders(root, classes)
        # Image files directly under root belong to no class: skipped with the stray files.
        loose = sorted(p.name for p in root.iterdir() if p.is_file() and is_image_file(p.name))
        skipped = [*loose, *others]
        if skipped:
            report.notes.append(
                f"skipped {len(skipped)} file(s) under {root} that are not images in a class "
                f"folder, e.g. {root / skipped[0]}; images end in {_EXTENSIONS_TEXT}"
            )
        names = [readable_class_name(c) for c in classes]
        return Listing(root, classes, names, {"all": entries}, [str(root / c) for c in classes])


FOLDER = ClassFolders()
"""The ``folder`` source."""


class ImageFolder(ImageList):
    """The ``folder`` layout's dataset of ``root``, checked (raises ``DataError`` on any problem).

    ``root`` is the folder of class folders; ``sample_id(i)`` the image's path relative to it.
    """

    def __init__(
        self, root: str | os.PathLike[str], class_names_file: str | os.PathLike[str] | None = None
    ) -> None:
        images = FOLDER(root, class_names_file)
        super().__init__(
            images.image_root,
            [images.sample_id(i) for i in range(len(images))],
            images.targets,
            images.class_names,
            images.classes,
            images.template,
            [images.class_location(c) for c in range(len(images.classes))],
            name=images.name,
        )

    @property
    def root(self) -> Path:
        """The folder of class folders (``image_root``)."""
        return self.image_root

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, {len(self.classes)} classes, {len(self)} images)"
