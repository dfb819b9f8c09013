"""``cdfsl reason``: RD-MLDG on a multi-domain dataset, leave-one-domain-out.

Scores the zero-shot MLLM and trains label-only, chain-only, MTCT and MTCT + SARR variants of
it on every fold, and prints held-out accuracy (± 95% CI) per domain and on average. The micro
recipe runs offline on a CPU; the paper's recipes need InternVL3-8B and the DomainBed data:

    cdfsl reason --config recipes/rd_mldg/micro.yaml
    cdfsl reason --config recipes/rd_mldg/pacs.yaml --model.path /models/InternVL3-8B-hf \\
        --data.root /data/DomainBed --teacher.path /data/DomainBed-Reasoning/pacs.jsonl

``--check_chains`` validates the teacher's chains of every fold and stops;
``--teacher_requests FILE`` writes one request per training image (of any fold) for an
external teacher, whose answers ``teacher.kind: file`` then reads.
A rerun with the same recipe resumes where it stopped. Every recipe key is a flag.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jsonargparse import ArgumentParser, Namespace

from cdfsl.commands._recipe_file import RecipeFile

if TYPE_CHECKING:  # the CLI imports every command at start-up; torch loads only when run
    from cdfsl.reasoning.experiment import ReasonConfig

NAME = "reason"
HELP = "RD-MLDG: zero-shot, label-only, chain-only, MTCT, MTCT + SARR; leave-one-domain-out"


def configure(parser: ArgumentParser) -> None:
    """The keys of :class:`cdfsl.reasoning.experiment.ReasonConfig` at the top level."""
    from cdfsl.reasoning.experiment import ReasonConfig

    parser.add_argument(
        "--config", action=RecipeFile, help="a YAML recipe or a name (rd_mldg/micro)"
    )
    parser.add_class_arguments(ReasonConfig, nested_key=None, as_group=False)
    parser.add_argument(
        "--check_chains", type=bool, default=False, help="validate teacher chains, then stop"
    )
    parser.add_argument(
        "--teacher_requests", type=str | None, default=None,
        help="write a JSONL request per image (id, class, teacher prompt) and stop",
    )  # fmt: skip


def config_from(cfg: Namespace) -> ReasonConfig:
    """The parsed ``cdfsl reason`` arguments as a ``ReasonConfig``."""
    from cdfsl.reasoning.experiment import ReasonConfig

    parser = ArgumentParser()
    configure(parser)
    values = parser.instantiate_classes(Namespace(**vars(cfg)))
    skip = {"config", "check_chains", "teacher_requests"}
    return ReasonConfig(**{k: v for k, v in vars(values).items() if k not in skip})


def run(cfg: Namespace) -> None:
    import json
    from pathlib import Path

    from cdfsl.reasoning.experiment import ReasonRun, build_fold, teacher_chains, teacher_requests

    config = config_from(cfg)
    runner = ReasonRun(config)
    if cfg.teacher_requests:
        seen: set[str] = set()
        rows = []
        for domain in runner.domains:
            fold = build_fold(config.data, domain)
            for row in teacher_requests(fold.train, config.teacher.tell_class):
                if row["image_id"] not in seen:
                    seen.add(row["image_id"])
                    rows.append(row)
        path = Path(cfg.teacher_requests)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{len(rows)} teacher requests: {path}")
        return
    if cfg.check_chains:
        for domain in runner.held_out:
            report, chains = teacher_chains(config.teacher, build_fold(config.data, domain))
            print(f"[held out: {domain}] {len(chains)} training images with a chain")
            print(report.format())
        return
    summary = runner.run()
    print()
    print(runner.report(summary))
    out = Path(config.output)
    print(f"\nresults: {out / 'summary.json'}  {out / 'summary.md'}")
