"""``cdfsl data check`` decodes every image: each unreadable file is named with its error and the
fix, a clean folder passes, and any number of workers gives the same report."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from idxgen import write_fashion_like
from imagegen import make_image_folder
from PIL import Image

from cdfsl.cli import main
from cdfsl.data import decode
from cdfsl.data.decode import unreadable_images
from cdfsl.errors import DataError

FIX = "replace it with an intact copy (re-extract or re-download the dataset) or delete it"


def _check(capsys, root: Path, *args: str) -> tuple[int, str, str]:
    code = main(["data", "check", "folder", str(root), *args])
    out, err = capsys.readouterr()
    return code, out, err


def _broken_folder(root: Path) -> tuple[Path, Path]:
    """Two classes of three 32x32 images, one JPEG cut in half, one text file named .png."""
    make_image_folder(root, {"cat": 3, "dog": 3}, size=32)
    truncated = root / "cat" / "cat_1.jpg"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    fake = root / "dog" / "readme.png"
    fake.write_text("not an image")
    return truncated, fake


def test_check_names_every_undecodable_file_with_its_error_and_fix(tmp_path, capsys):
    truncated, fake = _broken_folder(tmp_path)
    assert _check(capsys, tmp_path, "--decode", "false")[0] == 0  # the listing alone is fine

    code, out, err = _check(capsys, tmp_path)

    assert code == 2 and "2 problem(s):" in out and "ok:" not in out
    # PIL words a cut JPEG by where the cut falls: "image file is truncated", "Truncated File Read"
    assert re.search(
        rf"  - {re.escape(str(truncated))}: cannot be decoded \(.*truncated", out, re.I
    )
    assert f"  - {fake}: cannot be decoded (cannot identify image file" in out
    assert out.count(f"; expected an image file that decodes to its end; {FIX}") == 2
    assert "decoding: 100%" in err and "7/7" in err  # the progress bar
    assert err.endswith(f"cdfsl: error: 2 problem(s) in {tmp_path} as 'folder'; fix them as "
                        "listed above\n")  # fmt: skip


def test_check_passes_a_clean_folder(tmp_path, capsys):
    make_image_folder(tmp_path, {"cat": 3, "dog": 2}, size=32)
    code, out, err = _check(capsys, tmp_path, "--progress", "false")
    assert code == 0 and out.endswith("ok: 2 classes, 5 images\n")
    assert "decoding" not in err


class _SlowFirstChunk:
    """100 stand-in images; some fail, and the first chunk decodes slowest, so a pool finishes
    it last."""

    bad = (3, 40, 70, 99)

    def __len__(self) -> int:
        return 100

    def sample_id(self, index: int) -> str:
        return f"img{index}"

    def load(self, index: int) -> Image.Image:
        if index < decode._CHUNK:
            time.sleep(0.005)
        if index in self.bad:
            raise DataError(f"bad {index}")
        return Image.new("RGB", (2, 2))


def test_parallel_and_serial_decoding_give_the_same_report():
    images = _SlowFirstChunk()
    serial = unreadable_images([images], workers=1, progress=False)
    parallel = unreadable_images([images], workers=4, progress=False)
    assert parallel == serial
    assert [(p.where, p.found) for p in serial] == [
        (f"img{i}", f"cannot be decoded (bad {i})") for i in _SlowFirstChunk.bad
    ]


def test_workers_default_to_the_available_cores_and_must_be_positive(tmp_path, capsys, monkeypatch):
    make_image_folder(tmp_path, {"cat": 2, "dog": 2}, size=8)
    pools: list[int] = []

    class Recording(decode.ThreadPoolExecutor):
        def __init__(self, max_workers: int) -> None:
            pools.append(max_workers)
            super().__init__(max_workers=max_workers)

    monkeypatch.setattr(decode, "ThreadPoolExecutor", Recording)
    monkeypatch.setattr(decode, "available_cores", lambda: 5)
    assert _check(capsys, tmp_path, "--progress", "false")[0] == 0
    assert _check(capsys, tmp_path, "--progress", "false", "--workers", "3")[0] == 0
    assert _check(capsys, tmp_path, "--progress", "false", "--workers", "1")[0] == 0
    assert pools == [5, 3]  # one worker decodes without a pool
    code, _, err = _check(capsys, tmp_path, "--workers", "0")
    assert code == 2
    assert "workers=0: expected an integer >= 1 (default: the 5 cores available)" in err


def test_check_decodes_the_images_of_an_idx_dataset(tmp_path, capsys):
    names = write_fashion_like(tmp_path)
    code = main(["data", "check", "idx", str(tmp_path), "--class_names", str(names)])
    out, err = capsys.readouterr()
    assert code == 0 and "T-shirt/top" in out and out.endswith("ok: 3 classes, 6 images\n")
    assert "decoding: 100%" in err and "6/6" in err


@pytest.mark.parametrize("workers", [1, 2])
def test_a_dataset_whose_load_breaks_otherwise_is_still_reported(workers):
    class Broken(_SlowFirstChunk):
        def load(self, index: int) -> Image.Image:
            raise ValueError(f"no pixels at {index}")

    problems = unreadable_images([Broken()], workers=workers, progress=False)
    assert len(problems) == 100 and problems[7].found == "cannot be decoded (no pixels at 7)"
