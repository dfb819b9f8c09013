"""RD-MLDG: reasoning-driven domain generalization with a multimodal LLM.

One small generative interface (:class:`GenerativeVLM`: score answers, generate answers) with
two implementations, InternVL3 through transformers + PEFT (:mod:`.internvl`, the ``reason``
extra) and the offline micro MLLM (:mod:`.micro_mllm`); five-stage reasoning chains from any
teacher (:mod:`.chains`, :mod:`.prompts`, the micro world's template teacher in
:mod:`.micro_dg`); MTCT (:mod:`.mtct`), SARR (:mod:`.sarr`) and leave-one-domain-out evaluation
(:mod:`.dg`), run together by ``cdfsl reason`` (:mod:`.experiment`).

Importing this package needs neither transformers nor peft.
"""

from cdfsl.reasoning.answers import TAGS, conclusion_text, missing_tags, parse_class
from cdfsl.reasoning.chains import (
    Chain,
    ChainReport,
    ChainStore,
    import_chains,
    read_chains,
    validate_chains,
    write_chains,
)
from cdfsl.reasoning.dg import evaluate_domain, markdown_table, score_answers
from cdfsl.reasoning.model import GenerativeVLM, ImageInputs, require_reason_extra
from cdfsl.reasoning.mtct import MTCTModule, ReasoningExamples, TrainConfig, mtct_loss, train_mtct
from cdfsl.reasoning.prompts import label_prompt, reason_prompt, teacher_prompt
from cdfsl.reasoning.sarr import SARRConfig, SARRRunner, replace_chains, select_self_chains

__all__ = [
    "TAGS",
    "Chain",
    "ChainReport",
    "ChainStore",
    "GenerativeVLM",
    "ImageInputs",
    "MTCTModule",
    "ReasoningExamples",
    "SARRConfig",
    "SARRRunner",
    "TrainConfig",
    "conclusion_text",
    "evaluate_domain",
    "import_chains",
    "label_prompt",
    "markdown_table",
    "missing_tags",
    "mtct_loss",
    "parse_class",
    "read_chains",
    "reason_prompt",
    "replace_chains",
    "require_reason_extra",
    "score_answers",
    "select_self_chains",
    "teacher_prompt",
    "train_mtct",
    "validate_chains",
    "write_chains",
]
