"""Append-only JSONL result rows that survive a kill: whole lines or nothing, resumable."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from cdfsl.errors import CdfslError


class ResultStore:
    """One JSON object per line in ``path``; each row carries an ``"episode"`` index.

    Each row is written with a single ``write`` of the whole line and fsync'd, so a kill leaves
    at most a partial last line, which :meth:`rows` cuts off before the run resumes.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def rows(self, repair: bool = True) -> list[dict[str, Any]]:
        """All complete rows; a torn trailing line (no newline) is truncated from the file.

        ``repair`` False leaves the file as it is and skips a torn line: for files that another
        process may still be appending to (the shards of a sharded run).
        """
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data) and repair:
            with open(self.path, "r+b") as handle:
                handle.truncate(end)
        rows = []
        for number, line in enumerate(data[:end].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise CdfslError(
                    f"{self.path}:{number} is not valid JSON ({err.msg}); remove that line or "
                    "start a new --output directory"
                ) from err
        return rows

    def completed(self) -> set[int]:
        return {int(row["episode"]) for row in self.rows()}

    def replace(self, rows: list[dict[str, Any]]) -> None:
        """Make ``rows`` the whole file at once (a temporary file, fsync'd, then a rename).

        A file that already holds exactly these rows is left alone.
        """
        data = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()
        if self.path.exists() and self.path.read_bytes() == data:
            return
        _write_atomic(self.path, data)

    def append(self, row: dict[str, Any]) -> None:
        line = (json.dumps(row, sort_keys=True) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _write_all(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON through a temporary file and a rename: readers never see half."""
    _write_atomic(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _write_atomic(path: Path, data: bytes) -> None:
    """Make ``data`` the whole of ``path`` at once: a temporary file, fsync'd, then a rename.

    A kill at any moment leaves ``path`` as it was or as ``data``, never part of it (at worst a
    stray temporary file beside it).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a write may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _temporary(path: Path) -> Path:
    """A temporary name beside ``path``, its own per process: shards of one run may write the
    same file (run.json) at once, on one host or several sharing the folder."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def plain_json(value: Any) -> Any:
    """``value`` as JSON values, e.g. for a run fingerprint: dataclasses and jsonargparse
    namespaces as dicts, tuples as lists; a leaf JSON cannot hold becomes its repr."""
    if is_dataclass(value) and not isinstance(value, type):
        return plain_json(asdict(value))
    if type(value).__name__ == "Namespace" and hasattr(value, "__dict__"):
        return plain_json(vars(value))
    if isinstance(value, Mapping):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def check_run_config(output_dir: str | Path, config: dict[str, Any]) -> None:
    """Record ``config`` in ``output_dir/run.json``, or refuse if a different one is recorded.

    Resumed runs append rows to the same files; rows of two configurations must never mix.
    """
    output_dir = Path(output_dir)
    path = output_dir / "run.json"
    current = json.loads(json.dumps(config, sort_keys=True))
    if not path.exists():
        write_json_atomic(path, current)
        return
    previous = json.loads(path.read_text())
    changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
    if changed:
        raise CdfslError(
            f"{output_dir} holds results of a different configuration (changed: "
            f"{', '.join(changed)}); pass a new --output directory or delete this one"
        )
