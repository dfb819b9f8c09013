"""The X-TAIL run: prepare the sequence once, then learn and test every method step by step.

Computing and writing are apart: :meth:`XTailRun.learn_step` learns one domain and measures
it (a result row), :func:`method_result` and :func:`run_summary` turn rows into results; only
:meth:`XTailRun.run_method` and :meth:`XTailRun.run` read and write the output folder.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdfsl.backbones import Backbone, create_backbone
from cdfsl.continual.xtail.config import XTailConfig
from cdfsl.continual.xtail.data import Domain, domain_splits
from cdfsl.continual.xtail.framing import FramedImages, framing
from cdfsl.continual.xtail.learners import (
    LEARNERS,
    LearnerContext,
    XTailLearner,
    learner_class,
    title_of,
)
from cdfsl.continual.xtail.metrics import (
    _pct,
    format_matrix,
    format_summary,
    plot_matrices,
    xtail_metrics,
)
from cdfsl.engine import episode_seed
from cdfsl.errors import CdfslError
from cdfsl.features import FeatureCache, backbone_fingerprint
from cdfsl.memory import peak_rss
from cdfsl.plumbing import resolve_device, save_torch_atomic
from cdfsl.results.store import ResultStore, check_run_config, plain_json, write_json_atomic


def method_result(
    name: str, rows: Sequence[Mapping[str, Any]], domains: Sequence[str], learns: bool = True
) -> dict[str, Any]:
    """Method ``name``'s matrix, metrics, update times and memory from its step rows 0..K-1.

    ``learns``: False for a method that learns nothing (its update figures are None).
    """
    matrix = [[row["accuracy"][d] for d in domains] for row in rows]
    seconds = [row["update_seconds"] for row in rows]
    peaks = [row["update_peak_rss_mb"] for row in rows]
    extras = [row["update_extra_rss_mb"] for row in rows]
    return {
        "method": name,
        "domains": list(domains),
        "matrix": matrix,
        "metrics": xtail_metrics(matrix),
        "update_seconds": seconds,
        "update_seconds_mean": float(np.mean(seconds)) if learns else None,
        "update_peak_rss_mb_max": max(peaks) if learns else None,
        "update_extra_rss_mb_max": max(extras) if learns else None,
        "state_mb": rows[-1]["state_mb"],
    }


def run_summary(
    domains: Sequence[Domain], backbone: str, results: Mapping[str, Any]
) -> dict[str, Any]:
    """``summary.json``'s content: the sequence's sizes and every method's result."""
    return {
        "domains": [d.name for d in domains],
        "classes": {d.name: len(d.class_names) for d in domains},
        "train_images": {d.name: len(d.train) for d in domains},
        "test_images": {d.name: len(d.test) for d in domains},
        "backbone": backbone,
        "methods": dict(results),
    }


class XTailRun:
    """Run (or resume) an X-TAIL sequence: see the package docstring for the output layout."""

    def __init__(self, config: XTailConfig) -> None:
        if not config.domains:
            raise CdfslError("no domains given: expected a recipe with a 'domains' list")
        names = [d.name for d in config.domains]
        if len(set(names)) != len(names):
            raise CdfslError(f"domain names {names} repeat: expected each domain once")
        classes = [learner_class(m) for m in config.methods]
        if None in classes or not classes:
            raise CdfslError(
                f"methods {config.methods}: expected a non-empty subset of {list(LEARNERS)} "
                "or class_paths of XTailLearner subclasses"
            )
        self.methods = [cls.name for cls in classes]  # registered names, folder names
        self.config = config
        self.output = Path(config.output)
        self.device = resolve_device(config.device)
        self.cache = FeatureCache(config.cache_dir)

    # -- set-up -------------------------------------------------------------------------------
    def _prepare(self) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)  # a random-init backbone is then the same on every run
        self.backbone: Backbone = create_backbone(cfg.backbone, cfg.pretrained, self.device)
        self.backbone.requires_grad_(False)
        self.backbone_key = backbone_fingerprint(self.backbone)
        self.domains: list[Domain] = []
        preprocess = self.backbone.preprocess
        train_frame = framing(cfg.train_preprocess, cfg.train_crop_scale)
        test_frame = framing(cfg.test_preprocess)
        offset = 0
        for position, part in enumerate(domain_splits(cfg)):
            # The crop of training row i comes from stream (crop_seed, i): a pure function of
            # the run's seed, the domain's place and the row.
            crop_seed = episode_seed(episode_seed(cfg.seed, position), 0)
            train = FramedImages(part.train, train_frame, preprocess, crop_seed)
            test = FramedImages(part.test, test_frame, preprocess, 0)
            feats = {
                split: self.cache.image_features(
                    self.backbone, data,
                    identity={"domain": part.name, "split": split, **data.identity()},
                    batch_size=cfg.batch_size, progress=cfg.progress,
                    backbone_key=self.backbone_key, desc=f"{part.name} {split} features",
                )
                for split, data in (("train", train), ("test", test))
            }  # fmt: skip
            domain = Domain(
                part.name, part.class_names, offset, train, test, feats["train"], feats["test"]
            )
            self.domains.append(domain)
            offset += len(part.class_names)
        self.union_names = [name for d in self.domains for name in d.class_names]
        self.text_feats = self.cache.text_features(
            self.backbone, self.union_names, cfg.template, self.backbone_key
        )

    def _fingerprint(self) -> dict[str, Any]:
        cfg = self.config
        return plain_json(
            {
                "backbone": cfg.backbone, "pretrained": cfg.pretrained,
                "backbone_fingerprint": self.backbone_key, "template": cfg.template,
                "shots": cfg.shots, "small_classes": cfg.small_classes, "seed": cfg.seed,
                "domains": cfg.domains, "class_name_style": cfg.class_name_style,
                "class_names": self.union_names, "train_preprocess": cfg.train_preprocess,
                "train_crop_scale": cfg.train_crop_scale, "test_preprocess": cfg.test_preprocess,
                "train_ids": [d.train_feats.key for d in self.domains],
                "test_ids": [d.test_feats.key for d in self.domains],
            }
        )  # fmt: skip

    def _learner(self, name: str) -> XTailLearner:
        """A fresh learner of the registered method ``name`` over the prepared sequence."""
        context = LearnerContext(
            config=self.config, domains=self.domains, union_names=self.union_names,
            text_feats=self.text_feats, logit_scale=self.backbone.logit_scale,
            device=self.device,
        )  # fmt: skip
        return LEARNERS[name](context)

    def _method_config(self, name: str) -> dict[str, Any]:
        """Method ``name``'s fingerprint: its name and the settings its learner reads."""
        return plain_json({"method": name, **LEARNERS[name].settings(self.config)})

    # -- one method: compute ------------------------------------------------------------------
    def _evaluate(self, learner: XTailLearner) -> dict[str, float]:
        accs = {}
        for k, d in enumerate(self.domains):
            predicted = learner.predict(k)
            truth = d.test_feats.labels + d.offset
            accs[d.name] = float((predicted == truth).double().mean())
        return accs

    def learn_step(self, learner: XTailLearner, step: int) -> dict[str, Any]:
        """Learn domain ``step``, then test every domain: the step's result row."""
        start = time.perf_counter()
        with peak_rss() as memory:
            learner.learn(step)
        update_seconds = time.perf_counter() - start
        start = time.perf_counter()
        accs = self._evaluate(learner)
        state_bytes = learner.state_bytes()
        return {
            "episode": step,
            "step": step,
            "learned": self.domains[step].name,
            "accuracy": accs,
            "update_seconds": round(update_seconds, 4),
            "update_peak_rss_mb": round(memory["peak_mb"], 1),
            "update_extra_rss_mb": round(memory["extra_mb"], 1),
            "eval_seconds": round(time.perf_counter() - start, 4),
            "state_mb": None if state_bytes is None else round(state_bytes / 2**20, 2),
        }

    # -- one method: read and write its folder ------------------------------------------------
    def _resume(
        self, store: ResultStore, state_path: Path
    ) -> tuple[dict[int, dict[str, Any]], dict[str, Any] | None]:
        """The finished rows by step and the saved learner state (None when not needed)."""
        rows = {row["episode"]: row for row in store.rows()}
        saved = None
        if state_path.exists() and len(rows) < len(self.domains):  # M may be gigabytes
            saved = torch.load(state_path, map_location="cpu", weights_only=True)
        if saved is not None and saved["step"] not in rows:
            # Killed between saving the state and appending its row: the row is in the state.
            store.append(saved["row"])
            rows[saved["step"]] = saved["row"]
        last = max(rows, default=-1)
        if sorted(rows) != list(range(last + 1)):
            raise CdfslError(
                f"{store.path} holds steps {sorted(rows)}: expected 0..{last} without gaps; "
                "delete the method's folder to rerun it"
            )
        return rows, saved

    def run_method(self, name: str) -> dict[str, Any]:
        """Learn every unfinished step of method ``name``; returns its matrix and metrics.

        Writes the method's folder: ``run.json``, ``steps.jsonl`` and ``state.pt`` after each
        step, then ``matrix.json`` and ``matrix.png``.
        """
        folder = self.output / name
        folder.mkdir(parents=True, exist_ok=True)
        check_run_config(folder, self._method_config(name))
        store = ResultStore(folder / "steps.jsonl")
        state_path = folder / "state.pt"
        rows, saved = self._resume(store, state_path)
        first = len(rows)
        learner = None
        if first < len(self.domains):
            learner = self._learner(name)
            if first > 0:
                if saved is None or saved["step"] != first - 1:
                    raise CdfslError(
                        f"{state_path} is missing or not at step {first - 1}: expected the "
                        f"learner saved with the last row of {store.path}; delete {folder} to "
                        "rerun it"
                    )
                learner.load_state(saved["state"])
            del saved
        bar = None
        if self.config.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(self.domains), initial=first, desc=f"X-TAIL {name}", unit="domain")
        for step in range(first, len(self.domains)):
            row = self.learn_step(learner, step)
            save_torch_atomic({"step": step, "row": row, "state": learner.state()}, state_path)
            store.append(row)
            rows[step] = row
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        del learner
        domains = [d.name for d in self.domains]
        ordered = [rows[t] for t in range(len(self.domains))]
        result = method_result(name, ordered, domains, LEARNERS[name].learns)
        write_json_atomic(folder / "matrix.json", plain_json(result))
        plot_matrices({name: result["matrix"]}, domains).savefig(folder / "matrix.png", dpi=120)
        return result

    def run(self) -> dict[str, Any]:
        """Every method of the config, in :data:`LEARNERS` order; returns ``{method: result}``."""
        self.output.mkdir(parents=True, exist_ok=True)
        self._prepare()
        check_run_config(self.output, self._fingerprint())
        results = {}
        for name in (m for m in LEARNERS if m in self.methods):
            results[name] = self.run_method(name)
        summary = run_summary(self.domains, self.config.backbone, results)
        write_json_atomic(self.output / "summary.json", plain_json(summary))
        (self.output / "summary.md").write_text(self.report(results) + "\n")
        fig = plot_matrices({n: r["matrix"] for n, r in results.items()}, summary["domains"])
        fig.savefig(self.output / "xtail.png", dpi=120)
        return results

    def report(self, results: Mapping[str, Mapping[str, Any]]) -> str:
        """The K×K matrix of every method, then the metrics table, as markdown."""
        domains = [d.name for d in self.domains]
        parts = []
        for name, res in results.items():
            parts.append(f"### {title_of(name)} (accuracy %, row: after learning)")
            parts.append(format_matrix(res["matrix"], domains))
            m = res["metrics"]
            parts.append(
                f"Transfer {_pct(m['transfer'])} · Average {_pct(m['average'])} · "
                f"Last {_pct(m['last'])}\n"
            )
        parts.append(format_summary(results))
        return "\n\n".join(parts)
