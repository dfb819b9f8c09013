"""Results, shared by every track: resumable rows and what is made from them.

The append-only JSONL store and atomic writes (:mod:`.store`), shards of a run and their merge
(:mod:`.shards`), torch.distributed ranks (:mod:`.distributed`), the progress bar over row files
(:mod:`.progress`), mean and CI95 (:mod:`.stats`), summary tables (:mod:`.report`), PNG figures
(:mod:`.plots`) and per-step training terms (:mod:`.history`). Nothing here knows a protocol: the
few-shot protocols (:mod:`cdfsl.fewshot`), X-TAIL (:mod:`cdfsl.continual`) and RD-MLDG
(:mod:`cdfsl.reasoning`) write and read their rows through it.
"""

from cdfsl.results.report import summary_table
from cdfsl.results.stats import EpisodeAccuracy, mean_ci95
from cdfsl.results.store import ResultStore, write_json_atomic

__all__ = [
    "EpisodeAccuracy",
    "ResultStore",
    "mean_ci95",
    "summary_table",
    "write_json_atomic",
]
