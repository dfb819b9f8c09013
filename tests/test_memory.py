"""cdfsl.memory: the peak resident memory of a block."""

import math
import sys

import pytest

from cdfsl.memory import peak_rss, release_freed_memory, status_kb


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux's")
def test_a_block_that_touches_64_mb_shows_them_as_extra_memory():
    assert status_kb("VmRSS") > 0 and status_kb("NoSuchField") is None
    with peak_rss() as memory:
        block = bytearray(64 * 2**20)  # zero-filled: every page touched
        del block
    assert memory["extra_mb"] >= 60
    assert memory["peak_mb"] >= memory["extra_mb"]
    with peak_rss() as idle:
        pass
    assert idle["extra_mb"] < 60 and not math.isnan(idle["extra_mb"])


def test_releasing_freed_memory_never_raises():
    release_freed_memory()
