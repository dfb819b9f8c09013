"""``cdfsl reason``: RD-MLDG variants over leave-one-domain-out splits, resumable, tabulated.

For each held-out domain (a fold): the training domains' images get teacher chains (validated;
rejects reported), one model is built, and each variant starts from the same initial weights:

==============  ====================================================  ==================
variant         training                                              answers with
==============  ====================================================  ==================
zero-shot       none: the base MLLM (adapters at their identity)      q_cls
label-only      label NLL (q_cls -> class name)                       q_cls
chain-only      length-normalised chain NLL (q_reason -> chain)       q_reason (CONCLUSION)
mtct            both, 1:1 (:mod:`cdfsl.reasoning.mtct`)               q_reason (CONCLUSION)
mtct-sarr       the MTCT model, then N SARR rounds (:mod:`.sarr`)     q_reason (CONCLUSION)
==============  ====================================================  ==================

(:data:`VARIANTS` holds this table; ``answer`` in the recipe overrides the prompt per variant;
models trained on labels are also scored with q_cls, reported beside.) The zero-shot row is the
paper's "InternVL3-8B zero-shot" baseline, answers parsed as every other variant's; on the
micro MLLM, whose LM is trained from scratch, it is the untrained model.

Output folder: ``run.json`` (the recipe; checked on resume), ``fold-<domain>/`` with
``chain_report.json``, ``teacher_chains.jsonl`` and one folder per variant (``adapter.pt``
where it trains, ``log/metrics.csv``, ``answers-<mode>.jsonl``, ``result.json`` written last;
SARR's rounds under ``mtct-sarr/round-<r>/``), then ``summary.json`` and ``summary.md``. A
rerun skips every variant whose ``result.json`` exists.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from cdfsl.data.base import LabelledImages
from cdfsl.errors import CdfslError
from cdfsl.plumbing import save_torch_atomic, write_jsonl_atomic
from cdfsl.reasoning.chains import Chain, ChainReport, import_chains, validate_chains, write_chains
from cdfsl.reasoning.dg import ANSWER_MODES, DomainResult, average, evaluate_domain, markdown_table
from cdfsl.reasoning.internvl import DEFAULT_INTERNVL, INTERNVL_MAX_TILES, LoRASettings
from cdfsl.reasoning.model import GenerativeVLM, ImageInputs
from cdfsl.reasoning.mtct import (
    ReasoningExamples,
    TrainConfig,
    check_label_reduction,
    train_mtct,
)
from cdfsl.reasoning.prompts import label_prompt, reason_prompt, teacher_prompt
from cdfsl.reasoning.sarr import SARRConfig, SARRRunner
from cdfsl.registry import Registry, import_class_path
from cdfsl.results.store import check_run_config, write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One row of the variant table (module docstring).

    ``training``: a key of :attr:`ReasonRun.TRAINING` ("none", "mtct" or "sarr"); ``answer``:
    the prompt it answers by default (a mode of :data:`~cdfsl.reasoning.dg.ANSWER_MODES`);
    ``weights``: (label, chain) loss weights replacing the recipe's (None: the recipe's);
    ``needs_chains``: whether it trains on teacher chains.
    """

    title: str
    training: str
    answer: str
    weights: tuple[float, float] | None = None
    needs_chains: bool = True


VARIANTS: Registry[str, Variant] = Registry(
    "variant",
    {
        "zero-shot": Variant("Zero-shot", "none", "label", (0.0, 0.0), needs_chains=False),
        "label-only": Variant("Label-only", "mtct", "label", (1.0, 0.0), needs_chains=False),
        "chain-only": Variant("Chain-only", "mtct", "reason", (0.0, 1.0)),
        "mtct": Variant("MTCT", "mtct", "reason"),
        "mtct-sarr": Variant("MTCT + SARR", "sarr", "reason"),
    },
)
"""The variants ``cdfsl reason`` runs, by name, in table order."""


def variant_row(entry: str) -> Variant:
    """The variant a recipe's ``variants`` entry names: a key of :data:`VARIANTS`, or the
    dotted path of a :class:`Variant` defined anywhere (``my_variants.LABEL_HEAVY``), which is
    registered under that path on first use."""
    if entry in VARIANTS or "." not in entry:
        return VARIANTS.lookup(entry, "variants")
    row = import_class_path(entry, "Variant row", "cdfsl.reasoning.experiment.VARIANTS' rows")
    if not isinstance(row, Variant):
        raise CdfslError(
            f"variants entry {entry!r} is {row!r}: expected a cdfsl.reasoning.experiment.Variant"
            " row; define one, e.g. LABEL_HEAVY = Variant('Label-heavy', 'mtct', 'reason')"
        )
    if row.training not in ReasonRun.TRAINING:
        raise CdfslError(
            f"variant {entry!r} trains by {row.training!r}: expected one of "
            f"{list(ReasonRun.TRAINING)}; fix its `training`"
        )
    return VARIANTS.register(entry, row)


MICRO_DOMAINS = ["photo", "cartoon", "dermoscopy", "aerial"]


@dataclass
class ModelConfig:
    """The MLLM. ``kind``: "micro" (:class:`~cdfsl.reasoning.micro_mllm.MicroMLLM`; keys
    vision..dropout) or "internvl" (:class:`~cdfsl.reasoning.internvl.InternVLReasoner`; keys
    path..max_tiles). ``max_tiles``: most 448-px tiles per image, InternVL's dynamic tiling
    (default 12 + a thumbnail, InternVL's own; 1: one tile per image). ``gradient_checkpointing``
    uses torch's non-reentrant checkpoint (the reentrant one left the adapters without gradient
    on transformers 4.x)."""

    kind: str = "micro"
    vision: str = "micro-clip"
    width: int = 128
    layers: int = 2
    heads: int = 4
    image_grid: int | None = None
    max_length: int = 192
    dropout: float = 0.1
    path: str = DEFAULT_INTERNVL
    lora: LoRASettings = field(default_factory=LoRASettings)
    dtype: str = "bfloat16"
    device: str = "cpu"
    cache_dir: str | None = None
    gradient_checkpointing: bool = False
    max_tiles: int = INTERNVL_MAX_TILES


@dataclass
class DGDataConfig:
    """The multi-domain dataset. ``kind``: "micro" (the micro world in several styles, classes
    by ``classes``: "colour" or "shape"; :mod:`cdfsl.reasoning.micro_dg`) or "domainbed"
    (``dataset`` under ``root``, read by :func:`cdfsl.data.domainbed.leave_one_domain_out`).
    ``domains``: None for all (micro: photo, cartoon, dermoscopy, aerial)."""

    kind: str = "micro"
    domains: list[str] | None = None
    classes: str = "colour"
    train_images_per_class: int = 20
    test_images_per_class: int = 30
    seed: int = 0
    dataset: str = "pacs"
    root: str | None = None


@dataclass
class TeacherConfig:
    """Where teacher chains come from: "template" (micro world only: written from each image's
    scene), "file" (a JSONL file from any teacher, ``path``; ``source`` names it) or "none".

    ``tell_class``: whether ``--teacher_requests`` tells the external teacher each image's class
    (:func:`~cdfsl.reasoning.prompts.teacher_prompt`). Default false: the paper keeps a chain
    "only if its conclusion names the true class", which filters only a teacher that was not
    told; true is cdfsl's earlier request."""

    kind: str = "template"
    path: str | None = None
    source: str | None = None
    seed: int = 0
    tell_class: bool = False


@dataclass
class GenerationConfig:
    """Greedy decoding limits for answers and SARR chains."""

    max_new_tokens: int = 128
    batch_size: int = 64


@dataclass
class ReasonConfig:
    """A ``cdfsl reason`` run (module docstring). ``held_out``: the folds (None: every domain).
    ``answer``: variant -> "label" or "reason", overriding the defaults."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DGDataConfig = field(default_factory=DGDataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sarr: SARRConfig = field(default_factory=SARRConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    answer: dict[str, str] = field(default_factory=dict)
    held_out: list[str] | None = None
    output: str = "runs/rd_mldg/micro"
    threads: int | None = None


@dataclass
class Fold:
    """One leave-one-domain-out split: training images (every other domain) and the test domain.

    ``known``: image id -> class of every image of the dataset, held-out domain included, so
    that chains for held-out images are told apart from chains for unknown ids.
    """

    domain: str
    train: LabelledImages
    test: LabelledImages
    known: dict[str, int]


# -- dataset -----------------------------------------------------------------------------------
def registry_row(registry: Mapping[str, Any], key: str, setting: str) -> Any:
    """``registry[key]``, or a ``CdfslError`` naming ``setting`` and the known keys."""
    if key not in registry:
        raise CdfslError(f"{setting}={key!r}; expected one of {sorted(registry)}")
    return registry[key]


def _ids(images: LabelledImages) -> dict[str, int]:
    return {images.sample_id(i): t for i, t in enumerate(images.targets)}


class MicroDGData:
    """``data.kind: micro``: the micro world's shapes in its DG styles (CPU, generated)."""

    def domains(self, data: DGDataConfig) -> list[str]:
        from cdfsl.reasoning.micro_dg import list_dg_domains

        domains = data.domains or list(MICRO_DOMAINS)
        unknown = [d for d in domains if d not in list_dg_domains()]
        if unknown:
            raise CdfslError(
                f"micro DG domains {unknown} are unknown; expected some of {list_dg_domains()}"
            )
        return list(domains)

    def fold(self, data: DGDataConfig, domain: str) -> Fold:
        from cdfsl.reasoning.micro_dg import micro_dg_split

        train, test = micro_dg_split(
            self.domains(data), domain, data.train_images_per_class, data.test_images_per_class,
            data.seed, data.classes,
        )  # fmt: skip
        return Fold(domain, train, test, {**_ids(train), **_ids(test)})


class DomainBedData:
    """``data.kind: domainbed``: a DomainBed dataset's folders under ``data.root``."""

    def domains(self, data: DGDataConfig) -> list[str]:
        from cdfsl.data.domainbed import DOMAINBED_DATASETS

        if data.domains:
            return list(data.domains)
        for d in DOMAINBED_DATASETS:
            if d.name == data.dataset:
                return list(d.domains)
        raise CdfslError(
            f"DomainBed dataset {data.dataset!r} has no known domain list; expected one of "
            f"{', '.join(d.name for d in DOMAINBED_DATASETS)}, or set data.domains"
        )

    def fold(self, data: DGDataConfig, domain: str) -> Fold:
        from cdfsl.data.domainbed import leave_one_domain_out

        self.domains(data)
        if data.root is None:
            raise CdfslError(
                "data.root is not set; pass the DomainBed data root (the folder holding "
                f"the {data.dataset} folder) as --data.root"
            )
        split = leave_one_domain_out(data.root, domain, data.dataset)
        known: dict[str, int] = {}
        for images in split.domains.values():
            known.update(_ids(images))
        return Fold(domain, split.train, split.test, {**known, **_ids(split.test)})


#: ``data.kind`` -> where the DG domains come from (``domains(data)``, ``fold(data, domain)``).
DG_DATA: Registry[str, Any] = Registry(
    "DG data kind", {"micro": MicroDGData(), "domainbed": DomainBedData()}
)


def dataset_domains(data: DGDataConfig) -> list[str]:
    """The domains of the dataset of ``data``."""
    return registry_row(DG_DATA, data.kind, "data.kind").domains(data)


def build_fold(data: DGDataConfig, domain: str) -> Fold:
    """The leave-``domain``-out split of ``data``."""
    return registry_row(DG_DATA, data.kind, "data.kind").fold(data, domain)


# -- teacher chains ----------------------------------------------------------------------------
def _template_chains(config: TeacherConfig, fold: Fold) -> ChainReport:
    from cdfsl.reasoning.micro_dg import ConcatImages, TemplateTeacher

    if not isinstance(fold.train, ConcatImages):
        raise CdfslError(
            "teacher.kind=template writes chains from the micro world's scenes; for other "
            "data use teacher.kind=file with a chain file from an external teacher"
        )
    chains = TemplateTeacher(config.seed).chains(fold.train)
    return validate_chains(chains, fold.known, fold.train.class_names)


def _file_chains(config: TeacherConfig, fold: Fold) -> ChainReport:
    if config.path is None:
        raise CdfslError("teacher.kind=file needs teacher.path, the JSONL chain file")
    return import_chains(config.path, fold.known, fold.train.class_names, config.source)


#: ``teacher.kind`` -> fn(config, fold) -> the validated chains of every image of the dataset
#: (``none``: no teacher, for variants that need no chains).
TEACHERS: Registry[str, Callable[[TeacherConfig, Fold], ChainReport]] = Registry(
    "teacher kind",
    {
        "none": lambda config, fold: ChainReport(),
        "template": _template_chains,
        "file": _file_chains,
    },
)


def teacher_chains(config: TeacherConfig, fold: Fold) -> tuple[ChainReport, dict[str, Chain]]:
    """Validate the teacher's chains against every image of the dataset; return the report and
    the kept chains of the fold's training images, by image id."""
    report = registry_row(TEACHERS, config.kind, "teacher.kind")(config, fold)
    train_ids = set(_ids(fold.train))
    return report, {c.image_id: c for c in report.kept if c.image_id in train_ids}


def teacher_requests(images: LabelledImages, tell_class: bool = False) -> list[dict[str, Any]]:
    """One request per image for an external teacher: id, image file (where the dataset has
    files), class (for the records and validation; the prompt names it only if ``tell_class``)
    and the teacher prompt."""
    names = images.class_names
    rows = []
    for i, t in enumerate(images.targets):
        row = {"image_id": images.sample_id(i), "class_name": names[t]}
        if hasattr(images, "path"):
            row["image_path"] = str(images.path(i))
        prompt = teacher_prompt(names, names[t] if tell_class else None)
        rows.append({**row, "prompt": prompt})
    return rows


# -- the run -----------------------------------------------------------------------------------
class ReasonRun:
    """Runs :class:`ReasonConfig` (module docstring)."""

    def __init__(self, config: ReasonConfig) -> None:
        self.config = config
        self.output = Path(config.output)
        if not config.variants:
            raise CdfslError(f"variants {config.variants}; expected some of {list(VARIANTS)}")
        for variant in config.variants:
            variant_row(variant)
        for variant, mode in config.answer.items():
            if variant not in VARIANTS or mode not in ANSWER_MODES:
                raise CdfslError(
                    f"answer {variant}: {mode}; expected a variant of {list(VARIANTS)} and a "
                    f"mode of {list(ANSWER_MODES)}"
                )
        check_label_reduction(config.train.label_reduction)
        registry_row(TEACHERS, config.teacher.kind, "teacher.kind")
        registry_row(MODELS, config.model.kind, "model.kind")
        if config.teacher.kind == "none" and self._needing_chains():
            raise CdfslError(
                f"teacher.kind=none gives no chains, which variants {self._needing_chains()} "
                f"need; set variants to some of {self._chainless()} or give a teacher"
            )
        self.domains = dataset_domains(config.data)
        self.held_out = list(config.held_out or self.domains)
        missing = [d for d in self.held_out if d not in self.domains]
        if missing:
            raise CdfslError(f"held_out domains {missing} are not among {self.domains}")
        self._vision: tuple[Any, Any] | None = None
        self._internvl: GenerativeVLM | None = None

    def answer_mode(self, variant: str) -> str:
        return self.config.answer.get(variant, VARIANTS[variant].answer)

    def _needing_chains(self) -> list[str]:
        return [v for v in self.config.variants if VARIANTS[v].needs_chains]

    @staticmethod
    def _chainless() -> str:
        return "[" + ", ".join(v for v, spec in VARIANTS.items() if not spec.needs_chains) + "]"

    # -- model ---------------------------------------------------------------------------------
    def build_model(self, texts: Sequence[str]) -> GenerativeVLM:
        """A fresh model (a row of :data:`MODELS`); the micro MLLM's vocabulary comes from
        ``texts`` (prompts, class names, chains of the fold)."""
        return registry_row(MODELS, self.config.model.kind, "model.kind")(self, texts)

    # -- driving -------------------------------------------------------------------------------
    def check_output(self) -> None:
        """Record the recipe in ``run.json``, or refuse a folder that holds another one."""
        recipe = json.loads(json.dumps(asdict(self.config)))
        for key in ("output", "threads"):
            recipe.pop(key, None)
        recipe["train"].pop("progress", None)  # how a run looks, not what it computes
        check_run_config(self.output, recipe)

    def run(self) -> dict[str, Any]:
        """Every fold and variant (skipping finished ones); returns the summary."""
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.check_output()
        start = time.perf_counter()
        results: dict[str, dict[str, dict[str, Any]]] = {v: {} for v in self.config.variants}
        for domain in self.held_out:
            for variant, result in self.run_fold(domain).items():
                results[variant][domain] = result
        summary = self.summarise(results, time.perf_counter() - start)
        write_json_atomic(self.output / "summary.json", summary)
        (self.output / "summary.md").write_text(self.report(summary) + "\n")
        return summary

    def run_fold(self, domain: str) -> dict[str, dict[str, Any]]:
        """All variants on the fold that holds ``domain`` out."""
        folder = self.output / f"fold-{domain}"
        done = {v: folder / v / "result.json" for v in self.config.variants}
        if all(p.is_file() for p in done.values()):
            return {v: json.loads(p.read_text()) for v, p in done.items()}
        fold = build_fold(self.config.data, domain)
        report, chains = teacher_chains(self.config.teacher, fold)
        write_json_atomic(folder / "chain_report.json", report.summary())
        write_chains(folder / "teacher_chains.jsonl", chains.values())
        print(f"[held out: {domain}] teacher {report.format()}")
        texts = [label_prompt(), reason_prompt(), *fold.train.class_names]
        texts += [c.chain for c in chains.values()]
        model = self.build_model(texts)
        too_long = [i for i, c in chains.items() if not model.fits(reason_prompt(), c.chain)]
        if too_long:
            print(
                f"  {len(too_long)} chains are too long for the model's context, e.g. "
                f"{too_long[0]!r}: dropped (label loss only for those images)"
            )
            chains = {i: c for i, c in chains.items() if i not in set(too_long)}
        if not chains and self._needing_chains():
            raise CdfslError(
                f"no valid teacher chain for the training images of fold {domain!r} (see "
                f"{folder / 'chain_report.json'}); fix the chain file or run variants: "
                f"{self._chainless()}"
            )
        train_ids = [fold.train.sample_id(i) for i in range(len(fold.train))]
        without = sum(i not in chains for i in train_ids)
        if without:
            print(f"  {without} of {len(train_ids)} training images have no chain: label loss only")
        train_inputs = ImageInputs(model, fold.train)
        test_inputs = ImageInputs(model, fold.test)
        context = _FoldContext(fold, chains, train_ids, train_inputs, test_inputs)
        results = {}
        for variant in self.config.variants:
            if done[variant].is_file():
                results[variant] = json.loads(done[variant].read_text())
                continue
            results[variant] = self.run_variant(model, context, variant, folder / variant)
        return results

    def _examples(self, ctx: _FoldContext) -> ReasoningExamples:
        texts = [ctx.chains[i].chain if i in ctx.chains else None for i in ctx.train_ids]
        return ReasoningExamples(
            ctx.train_inputs, ctx.fold.train.targets, ctx.fold.train.class_names, texts
        )

    def _train_config(self, variant: str) -> TrainConfig:
        label, chain = VARIANTS[variant].weights or (
            self.config.train.label_weight,
            self.config.train.chain_weight,
        )
        return TrainConfig(
            **{**asdict(self.config.train), "label_weight": label, "chain_weight": chain}
        )

    def evaluate(self, model: GenerativeVLM, ctx: _FoldContext, mode: str) -> DomainResult:
        test = ctx.fold.test
        ids = [test.sample_id(i) for i in range(len(test))]
        g = self.config.generation
        return evaluate_domain(
            model, ctx.fold.domain, ctx.test_inputs, test.targets, test.class_names, ids, mode,
            g.max_new_tokens, g.batch_size,
        )  # fmt: skip

    def score(
        self, model: GenerativeVLM, ctx: _FoldContext, mode: str, config: TrainConfig
    ) -> dict[str, DomainResult]:
        """The trained model's held-out answers by prompt mode: ``mode``, and also ``label``
        (reported beside) when the label loss was trained but ``mode`` is not it. Reads and
        writes nothing."""
        modes = [mode] + (["label"] if config.label_weight and mode != "label" else [])
        return {m: self.evaluate(model, ctx, m) for m in modes}

    def run_variant(
        self, model: GenerativeVLM, ctx: _FoldContext, variant: str, folder: Path
    ) -> dict[str, Any]:
        """Train one variant from the initial weights, score it, write ``result.json``."""
        start = time.perf_counter()
        model.reset_trainable(self.config.train.seed)
        config = self._train_config(variant)
        mode = self.answer_mode(variant)
        train = self.TRAINING[VARIANTS[variant].training]
        training, rounds = train(self, model, ctx, config, folder, mode)
        result: dict[str, Any] = {
            "variant": variant,
            "domain": ctx.fold.domain,
            "answer": mode,
            "train": training,
            "sarr_rounds": rounds,
        }
        for m, scored in self.score(model, ctx, mode, config).items():
            write_jsonl_atomic(folder / f"answers-{m}.jsonl", scored.rows)
            result["held_out" if m == mode else "held_out_label"] = scored.summary()
            if scored.unparsable:
                log.warning(
                    "%s on %s (%s): %d of %d answers unparsable (counted wrong; see %s)",
                    variant, ctx.fold.domain, m, scored.unparsable, scored.n,
                    folder / f"answers-{m}.jsonl",
                )  # fmt: skip
        result["wall_s"] = time.perf_counter() - start
        write_json_atomic(folder / "result.json", result)
        held = result["held_out"]
        print(
            f"  {VARIANTS[variant].title}: held-out {ctx.fold.domain} "
            f"{100 * held['accuracy']:.1f} ± {100 * held['ci95']:.1f} ({mode}, "
            f"{held['unparsable']} unparsable), {result['wall_s']:.0f} s"
        )
        return result

    # -- training, one way per Variant.training ----------------------------------------------------
    def _no_training(
        self, model: GenerativeVLM, ctx: _FoldContext, config: TrainConfig, folder: Path, mode: str
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Zero-shot: the model as built, its adapters reset (the base MLLM)."""
        return {"epochs": 0, "steps": 0, "examples": 0, "wall_s": 0.0}, []

    def _mtct_training(
        self, model: GenerativeVLM, ctx: _FoldContext, config: TrainConfig, folder: Path, mode: str
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The MTCT loss with ``config``'s weights; saves ``adapter.pt``."""
        training = train_mtct(model, self._examples(ctx), config, folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_torch_atomic(model.trainable_state_dict(), folder / "adapter.pt")
        return training, []

    def _sarr_training(
        self, model: GenerativeVLM, ctx: _FoldContext, config: TrainConfig, folder: Path, mode: str
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The MTCT model, then the SARR rounds (held-out accuracy with ``mode`` per round)."""
        training = self._mtct_start(model, ctx, folder)
        runner = SARRRunner(
            model, ctx.train_inputs, ctx.train_ids, ctx.fold.train.targets,
            ctx.fold.train.class_names, ctx.chains, config, folder, self.config.sarr,
            evaluate=lambda m: self.evaluate(m, ctx, mode).summary(),
            max_new_tokens=self.config.generation.max_new_tokens,
            generate_batch_size=self.config.generation.batch_size,
        )  # fmt: skip
        return training, runner.run()

    TRAINING: ClassVar[Mapping[str, Callable[..., Any]]] = MappingProxyType(
        {"none": _no_training, "mtct": _mtct_training, "sarr": _sarr_training}
    )
    """:attr:`Variant.training` -> the method that trains (returns training log, SARR rounds)."""

    def _mtct_start(self, model: GenerativeVLM, ctx: _FoldContext, folder: Path) -> dict[str, Any]:
        """Put ``model`` in its MTCT state: the mtct variant's weights if trained, else train."""
        mtct_dir = folder.parent / "mtct"
        for candidate in (mtct_dir, folder / "round-0"):
            if (candidate / "adapter.pt").is_file() and (
                candidate != mtct_dir or (mtct_dir / "result.json").is_file()
            ):
                model.load_trainable_state_dict(
                    torch.load(candidate / "adapter.pt", weights_only=True)
                )
                return {"from": str(candidate)}
        training = train_mtct(
            model, self._examples(ctx), self._train_config("mtct"), folder / "round-0"
        )
        (folder / "round-0").mkdir(parents=True, exist_ok=True)
        save_torch_atomic(model.trainable_state_dict(), folder / "round-0" / "adapter.pt")
        return training

    # -- reporting -----------------------------------------------------------------------------
    def summarise(
        self, results: dict[str, dict[str, dict[str, Any]]], wall_s: float
    ) -> dict[str, Any]:
        table = {v: {d: r["held_out"] for d, r in per.items()} for v, per in results.items()}
        label_table = {
            v: {d: r["held_out_label"] for d, r in per.items() if "held_out_label" in r}
            for v, per in results.items()
        }
        rounds = {
            d: r["sarr_rounds"] for d, r in results.get("mtct-sarr", {}).items() if r["sarr_rounds"]
        }
        return {
            "domains": self.held_out,
            "answers": {v: self.answer_mode(v) for v in self.config.variants},
            "held_out": table,
            "average": {
                v: average(list(per.values()))
                for v, per in table.items()
                if len(per) == len(self.held_out)
            },
            "held_out_label_prompt": {v: t for v, t in label_table.items() if t},
            "sarr_rounds": rounds,
            "train_wall_s": {
                v: sum(r["wall_s"] for r in per.values()) for v, per in results.items()
            },
            "this_invocation_wall_s": wall_s,
            "ci": "95% normal (Wald) interval over per-image correctness, mean_ci95; average: "
            "sqrt(sum h^2)/K",
        }

    def report(self, summary: dict[str, Any]) -> str:
        """The markdown summary: the main table, q_cls answers of label-trained models, SARR."""
        domains = summary["domains"]
        titled = {VARIANTS[v].title: t for v, t in summary["held_out"].items()}
        notes = {
            VARIANTS[v].title: ("q_cls" if m == "label" else "q_reason → CONCLUSION")
            for v, m in summary["answers"].items()
        }
        lines = [
            f"Held-out accuracy (%, ± 95% CI over images), leave-one-domain-out, "
            f"{len(domains)} folds",
            "",
            markdown_table(titled, domains, notes),
        ]
        extra = {
            VARIANTS[v].title: t
            for v, t in summary["held_out_label_prompt"].items()
            if summary["answers"][v] != "label"
        }
        if extra:
            lines += ["", "The same models answering q_cls:", "", markdown_table(extra, domains)]
        if summary["sarr_rounds"]:
            lines += ["", "SARR per round (acceptance of own chains; held-out accuracy):", ""]
            lines += ["| held out | round | accepted | held-out acc. |", "|---|---|---|---|"]
            for d, rounds in summary["sarr_rounds"].items():
                for r in rounds:
                    acc = r.get("held_out", {}).get("accuracy", float("nan"))
                    lines.append(
                        f"| {d} | {r['round']} | {100 * r['acceptance_rate']:.1f}% "
                        f"({r['accepted']}/{r['generated']}) | {100 * acc:.1f} |"
                    )
        walls = ", ".join(
            f"{VARIANTS[v].title} {s / 60:.1f} min" for v, s in summary["train_wall_s"].items()
        )
        lines += [
            "",
            f"Wall time (training + scoring, all folds): {walls}; MTCT + SARR starts from the "
            "MTCT weights, so its time is the SARR rounds alone.",
        ]
        return "\n".join(lines)


def _micro_model(run: ReasonRun, texts: Sequence[str]) -> GenerativeVLM:
    from cdfsl.reasoning.micro_mllm import (
        MicroMLLM,
        MicroMLLMConfig,
        WordVocabulary,
        load_vision_tower,
    )

    m = run.config.model
    if run._vision is None:
        run._vision = load_vision_tower(m.vision)
    micro = MicroMLLMConfig(
        vision=m.vision, width=m.width, layers=m.layers, heads=m.heads,
        image_grid=m.image_grid, max_length=m.max_length, dropout=m.dropout,
    )  # fmt: skip
    vocabulary = WordVocabulary.from_texts(texts)
    return MicroMLLM(micro, vocabulary, *run._vision, seed=run.config.train.seed)


def _internvl_model(run: ReasonRun, texts: Sequence[str]) -> GenerativeVLM:
    from cdfsl.reasoning.internvl import InternVLReasoner

    m = run.config.model
    if run._internvl is None:
        run._internvl = InternVLReasoner.from_pretrained(
            m.path, m.lora, m.dtype, m.device, m.cache_dir, run.config.train.seed, m.max_tiles,
            m.gradient_checkpointing,
        )  # fmt: skip
    return run._internvl


#: ``model.kind`` -> fn(run, texts) -> the model a variant trains or answers with (InternVL is
#: loaded once per run and its adapters reset per variant).
MODELS: Registry[str, Callable[[ReasonRun, Sequence[str]], GenerativeVLM]] = Registry(
    "model kind",
    {
        "micro": _micro_model,
        "internvl": _internvl_model,
    },
)


@dataclass
class _FoldContext:
    fold: Fold
    chains: dict[str, Chain]
    train_ids: list[str]
    train_inputs: ImageInputs
    test_inputs: ImageInputs
