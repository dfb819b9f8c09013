"""A progress bar over the finished episodes of runs, read from their row files by a thread.

Ranks in other processes report through the rows they write anyway, so one bar (on rank 0, or
in the process that launched the ranks) counts every rank's episodes, also while its own
process waits for the others.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from cdfsl.results.shards import RESULTS, shard_files


class RowProgress:
    """A tqdm bar of the episodes ``wanted`` that are finished in each of ``dirs``.

    A context manager: entering shows the bar at the episodes already finished and starts a
    thread that rereads the files every ``interval`` seconds (only what was appended since,
    whole lines only); leaving counts once more and closes the bar. ``accuracy`` adds the mean
    accuracy of the counted rows. ``wanted_by_dir``: the episodes wanted in each of ``dirs``
    instead of ``wanted`` (a grid whose cells run different episode counts). Disabled, it does
    nothing.
    """

    def __init__(
        self, dirs: Sequence[str | Path], wanted: Iterable[int], desc: str, enabled: bool = True,
        accuracy: bool = False, interval: float = 0.5,
        wanted_by_dir: Sequence[Iterable[int]] | None = None,
    ) -> None:  # fmt: skip
        self.dirs = [Path(d) for d in dirs]
        shared = set(wanted)
        each = [set(w) for w in wanted_by_dir] if wanted_by_dir is not None else None
        if each is not None and len(each) != len(self.dirs):
            raise ValueError(f"{len(each)} episode sets for {len(self.dirs)} folders")
        self.wanted = {d: shared if each is None else each[i] for i, d in enumerate(self.dirs)}
        self.desc, self.enabled, self.accuracy, self.interval = desc, enabled, accuracy, interval
        self._seen: dict[Path, dict[int, float | None]] = {d: {} for d in self.dirs}
        self._read: dict[Path, tuple[int, int]] = {}  # file -> (inode, bytes read)
        self._stop = threading.Event()

    def _update(self) -> None:
        for folder, seen in self._seen.items():
            for path in [folder / RESULTS, *shard_files(folder)]:
                try:
                    self._read_new(path, seen, self.wanted[folder])
                except (OSError, ValueError):  # merged away mid-read: the next poll recounts
                    self._read.pop(path, None)
        count = sum(len(seen) for seen in self._seen.values())
        if count != self.bar.n:
            self.bar.n = count
            # Failed episodes (no accuracy) count as done but stay out of the mean.
            accs = [a for seen in self._seen.values() for a in seen.values() if a is not None]
            if self.accuracy and accs:
                self.bar.set_postfix(acc=f"{100 * sum(accs) / len(accs):.2f}", refresh=False)
            self.bar.refresh()

    def _read_new(self, path: Path, seen: dict[int, float | None], wanted: set[int]) -> None:
        with open(path, "rb") as handle:
            inode = os.fstat(handle.fileno()).st_ino
            known, offset = self._read.get(path, (inode, 0))
            if known != inode:  # replaced (a merge rewrote it): read it again from the start
                offset = 0
            handle.seek(offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1  # a torn last line waits for the next poll
        for line in data[:end].splitlines():
            if line.strip():
                row = json.loads(line)
                if row["episode"] in wanted:
                    seen[row["episode"]] = row.get("accuracy")
        self._read[path] = (inode, offset + end)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._update()

    def __enter__(self) -> RowProgress:
        total = sum(len(w) for w in self.wanted.values())
        self.bar = tqdm(total=total, desc=self.desc, unit="ep", disable=not self.enabled)
        if self.enabled:
            self._update()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()
            self._update()
        self.bar.close()
