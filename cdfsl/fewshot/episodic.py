"""The episodic protocol: episode -> reset adapters -> fit on support -> score queries -> row.

Training and scoring are the engine's (:mod:`cdfsl.engine`); this module samples or reads the
episodes, groups them, writes their rows and the summary, and checks a resumed run's fingerprint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from cdfsl.data.base import LabelledImages
from cdfsl.data.episodes import (
    Episode,
    EpisodeManifest,
    EpisodeSampler,
    load_episode,
    manifest_lines,
)
from cdfsl.engine import (
    ENGINE_VERSION,
    FitConfig,
    NonFiniteGuard,
    device_fingerprint,
    episode_seed,
    episodes_per_step,
    failure_record,
    fit_episode,
    predict_logits,
)
from cdfsl.errors import CdfslError
from cdfsl.features import EpisodeFeatures, FeatureCache
from cdfsl.fewshot.methods.base import FewShotMethod
from cdfsl.fewshot.methods.frozen import FrozenFeatureMethod, SupportSet
from cdfsl.results import distributed, shards
from cdfsl.results.progress import RowProgress
from cdfsl.results.shards import Shard
from cdfsl.results.stats import mean_ci95
from cdfsl.results.store import ResultStore, check_run_config, plain_json, write_json_atomic


@dataclass
class EpisodeProtocol:
    """N-way K-shot episodes with Q queries per class; episode i depends only on (seed, i)."""

    n_way: int = 5
    k_shot: int = 1
    n_query: int = 15
    episodes: int = 800
    seed: int = 0


def summarize_rows(rows: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> dict[str, Any]:
    """An episodic run's summary: ``config`` with mean accuracy, CI95 and std over the successful
    rows (``episodes_done`` of them), the failed episodes (``episodes_failed``,
    ``failed_episodes``: rows with ``status: failed``, left out of the statistics) and the mean
    seconds per episode over all ``rows``."""
    failed = sorted(int(row["episode"]) for row in rows if shards.failed(row))
    stats = mean_ci95([row["accuracy"] for row in rows if not shards.failed(row)])
    return {
        **config,
        "accuracy": stats["mean"],
        "ci95": stats["ci95"],
        "std": stats["std"],
        "episodes_done": stats["episodes"],
        "episodes_failed": len(failed),
        "failed_episodes": failed,
        "seconds_per_episode": float(np.mean([r["seconds"] for r in rows])) if rows else None,
    }


def merge_output(output_dir: str | Path) -> dict[str, Any]:
    """Merge the static shards of ``output_dir`` into results.jsonl and write its summary (what
    ``cdfsl merge`` does once every shard is done); returns the summary."""
    config = shards.recorded_config(output_dir)
    summary = summarize_rows(shards.merge(output_dir), config)
    write_json_atomic(Path(output_dir) / "summary.json", summary)
    return summary


def protocol_manifest(dataset: LabelledImages, protocol: EpisodeProtocol) -> list[dict[str, Any]]:
    """The manifest lines of ``protocol``'s episodes over ``dataset`` (see
    :func:`cdfsl.data.episodes.manifest_lines`), with the training seeds their rows carry."""
    sampler = EpisodeSampler(
        dataset.targets, protocol.n_way, protocol.k_shot, protocol.n_query, protocol.episodes,
        protocol.seed, dataset.class_names,
    )  # fmt: skip
    return manifest_lines(sampler, dataset, functools.partial(episode_seed, protocol.seed))


def manifest_digest(lines: Sequence[Mapping[str, Any]]) -> str:
    """sha256 of manifest ``lines`` as canonical JSON (sorted keys), one line each."""
    text = "".join(json.dumps(dict(line), sort_keys=True) + "\n" for line in lines)
    return hashlib.sha256(text.encode()).hexdigest()


class EpisodicEvaluator:
    """Run (or resume) an episodic evaluation into ``output_dir``.

    Writes ``results.jsonl`` (one row per finished episode, sorted by episode), ``run.json``
    (the configuration, checked on resume) and ``summary.json``. ``shard`` runs only episodes
    ``i % shard.count == shard.index``, into ``shards/`` (see :meth:`run`). Nothing is ever
    selected on query labels: the queries are predicted once, after training, and only then
    scored.

    ``manifest``: evaluate its episodes (the first ``protocol.episodes``, whose way, shot and
    query it must match) instead of sampling them; the run's fingerprint records its digest.
    An episode whose loss or query logits turn non-finite is a row with ``status: failed``
    (see :class:`NonFiniteGuard`); a resumed run skips it unless ``retry_failed``.
    """

    def __init__(
        self,
        method: FewShotMethod,
        dataset: LabelledImages,
        protocol: EpisodeProtocol,
        output_dir: str | Path,
        fit: FitConfig | None = None,
        config: dict[str, Any] | None = None,
        progress: bool = True,
        shard: Shard | None = None,
        manifest: EpisodeManifest | None = None,
        retry_failed: bool = False,
    ) -> None:
        self.method = method
        self.manifest = manifest
        self.retry_failed = retry_failed
        self.shard = shard
        self.dataset = dataset
        self.protocol = protocol
        self.fit = fit or FitConfig()
        self.output_dir = Path(output_dir)
        self.store = ResultStore(self.output_dir / "results.jsonl")
        self.config = {
            "method": type(method).__name__,
            # A resumed run must not mix rows of different engines: engine 1 drew dropout from
            # the global RNG, engine 2 from per-episode streams with a mask that never dropped
            # one element in four, engine 3 from the device's generator (MT19937 / Philox),
            # engine 4 from counter-based SplitMix64 streams, the same on every device.
            "engine": ENGINE_VERSION,
            # Kernels and their rounding differ between device types (and GPU models): rows
            # made on one are not those of another, so a resume elsewhere is refused.
            "device": device_fingerprint(self.fit.device()),
            # A resumed run must not mix episodes trained with other hyper-parameters.
            "method_args": plain_json(dict(method.hparams)),
            "protocol": asdict(protocol),
            "fit": self.fit.record(),
            **(config or {}),
        }
        self.progress = progress
        self._features: EpisodeFeatures | None = None
        self.sampler: EpisodeSampler | EpisodeManifest
        if manifest is None:
            self.sampler = EpisodeSampler(
                dataset.targets, protocol.n_way, protocol.k_shot, protocol.n_query,
                protocol.episodes, protocol.seed,
            )  # fmt: skip
        else:
            check_manifest(manifest, protocol)
            self.sampler = manifest
            self.config["manifest"] = {
                "path": manifest.source,
                "sha256": manifest_digest(manifest.lines),
            }

    def _fingerprint(self) -> dict[str, Any]:
        """The configuration a resumed run must share; the episode count may grow or shrink."""
        config = json.loads(json.dumps(self.config, sort_keys=True))
        config["protocol"].pop("episodes")
        config["fit"].pop("episodes_per_step", None)  # rows do not depend on it
        if "manifest" in config:
            config["manifest"].pop("path")  # the episodes are what counts, not where they lie
        return config

    def _episode_seed(self, index: int) -> int:
        seed = self.manifest.seed(index) if self.manifest is not None else None
        return episode_seed(self.protocol.seed, index) if seed is None else seed

    def _class_names(self, index: int) -> list[str] | None:
        return self.manifest.class_names(index) if self.manifest is not None else None

    def load_group(self, indices: Sequence[int]) -> list[Episode]:
        """Episodes ``indices`` with their images read and framed (what :meth:`run_episodes`
        trains on; the evaluator reads the next group's while the current one trains)."""
        to_tensor = self.method.to_tensor()
        return [
            load_episode(self.dataset, self.sampler.episode(i), to_tensor, self._class_names(i))
            for i in indices
        ]

    def run_episodes(
        self,
        indices: Sequence[int],
        callbacks: list[L.Callback] | None = None,
        loaded: Sequence[Episode] | None = None,
    ) -> list[dict[str, Any]]:
        """Fit and score the episodes ``indices`` side by side; their rows (not stored).

        The episodes train together (one adapter set each, see
        :meth:`FewShotMethod.start_episodes`); a row depends only on (protocol seed, index,
        configuration), never on which other episodes share the call. ``seconds`` is the
        group's time divided among its episodes. A row has ``status`` ``"ok"``, or
        ``"failed"`` with no accuracy and a ``failure`` (``step``, ``term``, ``non_finite``;
        its ``terms`` are those of the failing step) when the episode's loss turned non-finite
        in training (:class:`NonFiniteGuard`) or its query logits did (``term``
        ``"query_logits"``, ``step`` the step count).
        """
        start = time.perf_counter()
        method = self.method
        seeds = [self._episode_seed(i) for i in indices]
        guard = NonFiniteGuard()
        if isinstance(method, FrozenFeatureMethod):
            episodes, logits, steps = self._fit_frozen(method, indices, seeds)
        else:
            episodes = list(loaded) if loaded is not None else self.load_group(indices)
            method.to(self.fit.device())
            method.start_episodes(seeds, [episode.class_names for episode in episodes])
            steps = [0] * len(indices)
            if method.trainable:
                steps = [self.fit.total_steps(self.protocol.k_shot)] * len(indices)
                images = torch.cat([episode.support_images for episode in episodes])
                labels = torch.cat([episode.support_labels for episode in episodes])
                fit_episode(method, images, labels, steps[0], self.fit, [*(callbacks or ()), guard])
            queries = torch.cat([episode.query_images for episode in episodes])
            logits = predict_logits(method, queries, self.fit).chunk(len(episodes))
        seconds = round((time.perf_counter() - start) / len(episodes), 4)
        rows = []
        for position, (index, episode) in enumerate(zip(indices, episodes, strict=True)):
            terms = method.episode_terms(position) if method.trainable else {}
            if isinstance(method, FrozenFeatureMethod):
                terms = method.episode_terms(position)
            failure = guard.failures.get(position)
            if failure is None and not bool(torch.isfinite(logits[position]).all()):
                failure = {
                    "step": steps[position],
                    "term": "query_logits",
                    "non_finite": ["query_logits"],
                }
                failure["terms"] = failure_record(steps[position], terms)["terms"]
            row: dict[str, Any] = {
                "episode": index,
                "seed": seeds[position],
                "classes": episode.class_names,
                "support_ids": list(episode.support_ids),
                "query_ids": list(episode.query_ids),
                "status": "ok",
                "steps": steps[position],
                "seconds": seconds,
                "terms": terms,
            }  # fmt: skip
            if failure is None:
                hits = logits[position].argmax(dim=1) == episode.query_labels
                row["accuracy"] = float(hits.float().mean())
            else:
                row["status"], row["terms"] = shards.FAILED, failure.pop("terms")
                row["failure"] = failure
            rows.append(row)
        return rows

    def _fit_frozen(
        self, method: FrozenFeatureMethod, indices: Sequence[int], seeds: Sequence[int]
    ) -> tuple[list[Episode], list[torch.Tensor], list[int]]:
        """Fit and score a frozen-feature method's episodes on cached features: no images are
        framed or encoded but the support views the method draws."""
        if self._features is None:
            # Every image of every episode of the protocol, whichever share this process runs:
            # shards, ranks and reruns then read one cache entry.
            touched = [
                j
                for e in map(self.sampler.episode, range(self.protocol.episodes))
                for j in (*e.support, *e.query)
            ]
            size = list(method.backbone.preprocess.size)
            framing = {"geometry": method.geometry, "interpolation": method.resize_interpolation,
                       "size": size}  # fmt: skip
            self._features = EpisodeFeatures.build(
                FeatureCache(), method.backbone, self.dataset, touched, method.to_tensor(),
                framing, self.progress,
            )  # fmt: skip
        parts = [self.sampler.episode(i) for i in indices]
        episodes = [load_episode(self.dataset, e, None, self._class_names(e.index)) for e in parts]
        method.to(self.fit.device())
        method.start_episodes(seeds, [episode.class_names for episode in episodes])
        supports = [
            SupportSet(
                self._features(e.support), episode.support_labels,
                functools.partial(lambda rows: [self.dataset.load(j) for j in rows], e.support),
            )
            for e, episode in zip(parts, episodes, strict=True)
        ]  # fmt: skip
        steps = method.fit_episodes(supports)
        with torch.no_grad():
            logits = [
                method.predict_features(self._features(e.query).to(method.device), state).cpu()
                for e, state in zip(parts, method.episodes, strict=True)
            ]
        return episodes, logits, steps

    def run_episode(self, index: int, callbacks: list[L.Callback] | None = None) -> dict[str, Any]:
        """Fit and score episode ``index`` alone; returns its result row (not stored)."""
        return self.run_episodes([index], callbacks)[0]

    def run(
        self, on_episode: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any] | None:
        """Evaluate every unfinished episode of this process's share, then merge and summarize.

        Episodes in results.jsonl or in any shard file count as finished, whatever world size or
        shard count wrote them. Without a shard the rows go to results.jsonl, then any shard
        files are merged into it and the summary is written and returned. A ranked shard (one
        rank of a torch.distributed group) appends to its own file; once every rank is done,
        rank 0 merges and writes the summary, which every rank returns. A static shard only
        appends to its file and returns None: ``cdfsl merge`` merges once all shards are done.
        ``on_episode`` is called with each stored row (e.g. to report progress elsewhere).
        """
        shard = self.shard
        ranked = shard is not None and shard.ranked
        if ranked:
            self._check_group(shard)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # In a group rank 0 alone reads what is finished (and records run.json), before any rank
        # writes: every rank then splits the same list.
        done = distributed.on_rank0(self._finished) if ranked else self._finished()
        store = self.store if shard is None else ResultStore(shard.rows_path(self.output_dir))
        if shard is not None:
            shards.record_config(self.output_dir, shard, self.config, self._fingerprint())
        share = [i for i in range(self.protocol.episodes) if shard is None or shard.owns(i)]
        todo = [i for i in share if i not in done]
        # One bar per run: rank 0's counts every rank's episodes (from their files, also while it
        # waits for them); a static shard's counts its share.
        bar = RowProgress(
            [self.output_dir], range(self.protocol.episodes) if ranked else share,
            f"{self.config['method']} {self.protocol.n_way}w{self.protocol.k_shot}s"
            + (f" {shard.name}" if shard is not None and not ranked else ""),
            enabled=self.progress and not (ranked and shard.index != 0), accuracy=True,
        )  # fmt: skip
        with bar:
            size = episodes_per_step(
                self.method, self.protocol.n_way * self.protocol.k_shot, self.fit
            )
            groups = [todo[i : i + size] for i in range(0, len(todo), size)]
            for group, loaded in self._prefetched(groups):
                for row in self.run_episodes(group, loaded=loaded):
                    store.append(row)
                    if on_episode is not None:
                        on_episode(row)
            if shard is None:
                shards.merge(self.output_dir)
                return self.write_summary()
            if not ranked:
                return None
            distributed.barrier()
        return distributed.on_rank0(self._merge_and_summarize)

    def _prefetched(
        self, groups: Sequence[Sequence[int]]
    ) -> Iterator[tuple[Sequence[int], list[Episode] | None]]:
        """Each group with its episodes loaded; the next group's images are read in a thread
        while the caller trains this one (a frozen-feature method reads cached features: None)."""
        if isinstance(self.method, FrozenFeatureMethod) or not groups:
            yield from ((group, None) for group in groups)
            return
        pool = ThreadPoolExecutor(1, thread_name_prefix="cdfsl-prefetch")
        try:
            pending = pool.submit(self.load_group, groups[0])
            for k, group in enumerate(groups):
                loaded = pending.result()
                if k + 1 < len(groups):
                    pending = pool.submit(self.load_group, groups[k + 1])
                yield group, loaded
        finally:
            # Interrupted: do not wait for a load nobody will train.
            pool.shutdown(wait=False, cancel_futures=True)

    def _check_group(self, shard: Shard) -> None:
        group = distributed.ranked_shard()
        if group != shard:
            raise CdfslError(
                f"ranked shard {shard.name} but the process group is "
                f"{group.name if group else 'absent'}; expected the group's own rank and size; "
                "fix: pass distributed.ranked_shard() inside distributed.process_group()"
            )

    def _finished(self) -> set[int]:
        """Check (or record) run.json; the episodes finished in results.jsonl or any shard
        (failed ones too, unless ``retry_failed``)."""
        check_run_config(self.output_dir, self._fingerprint())
        rows = shards.finished_rows(self.output_dir)
        return {i for i, row in rows.items() if not (self.retry_failed and shards.failed(row))}

    def _merge_and_summarize(self) -> dict[str, Any]:
        shards.merge(self.output_dir)
        return self.write_summary()

    def write_summary(self) -> dict[str, Any]:
        """Write and return the summary of results.jsonl (see :func:`summarize_rows`)."""
        summary = summarize_rows(self.store.rows(), self.config)
        write_json_atomic(self.output_dir / "summary.json", summary)
        return summary


def check_manifest(manifest: EpisodeManifest, protocol: EpisodeProtocol) -> None:
    """Refuse a ``protocol`` whose way, shot or query differ from ``manifest``'s episodes, or
    that asks for more episodes than it holds."""
    shape = (manifest.n_way, manifest.k_shot, manifest.n_query)
    if shape != (protocol.n_way, protocol.k_shot, protocol.n_query):
        raise CdfslError(
            f"{manifest.source} holds {shape[0]}-way {shape[1]}-shot {shape[2]}-query episodes, "
            f"the protocol is {protocol.n_way}-way {protocol.k_shot}-shot {protocol.n_query}-query;"
            f" expected the same; fix: pass --way {shape[0]} --shot {shape[1]} --query {shape[2]}"
        )
    if protocol.episodes > manifest.episodes:
        raise CdfslError(
            f"{protocol.episodes} episodes asked of {manifest.source}, which holds "
            f"{manifest.episodes}; expected at most that many; fix: --episodes {manifest.episodes}"
        )
