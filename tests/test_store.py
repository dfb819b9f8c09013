import json

import pytest

from cdfsl.errors import CdfslError
from cdfsl.results.store import ResultStore, write_json_atomic


def test_rows_round_trip_and_completed(tmp_path):
    store = ResultStore(tmp_path / "r.jsonl")
    assert store.rows() == [] and store.completed() == set()
    store.append({"episode": 0, "accuracy": 0.5})
    store.append({"episode": 2, "accuracy": 1.0})
    assert store.completed() == {0, 2}
    assert [r["accuracy"] for r in store.rows()] == [0.5, 1.0]


def test_torn_last_line_is_skipped_by_reads_and_cut_by_the_next_append(tmp_path):
    path = tmp_path / "r.jsonl"
    store = ResultStore(path)
    store.append({"episode": 0, "accuracy": 0.5})
    with open(path, "ab") as handle:
        handle.write(b'{"episode": 1, "accu')  # a kill in the middle of a write
    before = path.read_bytes()
    assert store.completed() == {0}
    assert path.read_bytes() == before  # reading writes nothing
    store.append({"episode": 1, "accuracy": 0.25})
    assert [json.loads(line)["episode"] for line in path.read_text().splitlines()] == [0, 1]


def test_corrupt_complete_line_names_file_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"episode": 0}\nnot json\n')
    with pytest.raises(CdfslError, match=r"r.jsonl:2 is not valid JSON"):
        ResultStore(path).rows()


def test_write_json_atomic_leaves_no_temporary(tmp_path):
    write_json_atomic(tmp_path / "s.json", {"a": 1})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 1}
    assert list(tmp_path.iterdir()) == [tmp_path / "s.json"]
