"""Append-only JSONL result rows that survive a kill: whole lines or nothing, resumable."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cdfsl.errors import CdfslError
from cdfsl.plumbing import plain_json, write_all, write_bytes_atomic, write_json_atomic

# plain_json and write_json_atomic are re-exported: run fingerprints and summaries import them here.
__all__ = ["ResultStore", "check_run_config", "plain_json", "write_json_atomic"]


class ResultStore:
    """One JSON object per line in ``path``; each row carries an ``"episode"`` index.

    Each row is written with a single ``write`` of the whole line and fsync'd, so a kill leaves
    at most a partial last line, which :meth:`rows` cuts off before the run resumes.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def rows(self) -> list[dict[str, Any]]:
        """All complete rows; a torn trailing line (no newline yet) is skipped, never changed.

        Reading writes nothing, so it is safe on files another process is appending to (the
        shards of a sharded run); :meth:`append` cuts a torn line before it writes.
        """
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
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
        write_bytes_atomic(self.path, data)

    def append(self, row: dict[str, Any]) -> None:
        """Add ``row`` as one line in one fsync'd write, first cutting a torn last line (a kill
        mid-write) so the new row starts a line of its own."""
        line = (json.dumps(row, sort_keys=True) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _cut_torn_line(fd)
            write_all(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def _cut_torn_line(fd: int) -> None:
    """Truncate the file open as ``fd`` after its last newline, if it does not end with one."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    data = os.pread(fd, size, 0)
    os.ftruncate(fd, data.rfind(b"\n") + 1)


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
