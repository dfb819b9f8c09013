"""X-TAIL: a frozen VLM learns a sequence of domains; every domain is tested after every step.

The label space is the union of the class names of all domains of the sequence, in sequence
order, names never merged across domains. The domain of a test image is unknown: every
prediction is an argmax over the whole union, seen and not yet seen. After learning domain t,
every domain k is evaluated: ``a[t][k]`` (rows: steps, columns: domains).

Methods, each an :class:`~cdfsl.continual.xtail.learners.XTailLearner` registered in
:data:`LEARNERS` under the name a recipe's ``methods`` list uses, each resumable per step (a
kill loses at most the step it was in):

- ``zero-shot``: the frozen model with ``template`` prompts; learns nothing.
- ``finetune``: LoRA cross-entropy fine-tuning on each domain's training shots in turn, over
  that domain's class names, the regressors carried from domain to domain (the forgetting that
  RAIL avoids).
- ``primal`` / ``dual``: Primal-RAIL and Dual-RAIL on cached frozen features, with RAIL-Fusion.

Where the public RAIL implementation (github.com/linghan1997/Regression-based-Analytic-
Incremental-Learning, ``primal_RAIL.py``) makes a choice the paper leaves open, it is a named
option whose default is the reference's: the class names in prompts (``class_name_style``),
the framing of training and test images (``train_preprocess``, ``train_crop_scale``,
``test_preprocess``), the draw for a class with fewer images than ``shots``
(``small_classes``) and the random layer's scale (``primal.random_init``).

Output directory: ``run.json`` (the sequence; checked on resume), one folder per method with
``run.json`` (its settings, checked on resume), ``steps.jsonl`` (one row per step),
``state.pt`` (the learner after the last finished step), ``matrix.json`` and ``matrix.png``;
then ``summary.json``, ``summary.md`` and ``xtail.png`` over all methods.

Modules, one concern each: :mod:`.config` (the recipe), :mod:`.data` (splits, shots, prompt
names), :mod:`.framing` (images to the input size), :mod:`.learners` (the methods),
:mod:`.metrics` (Transfer / Average / Last, tables, heatmaps) and :mod:`.run` (the runner).
Every public name is importable from ``cdfsl.continual.xtail``.
"""

from cdfsl.continual.xtail.config import (
    DomainConfig,
    DualConfig,
    FineTuneConfig,
    PrimalConfig,
    XTailConfig,
)
from cdfsl.continual.xtail.data import (
    CLASS_NAME_STYLES,
    SMALL_CLASS_DRAWS,
    Domain,
    DomainSplit,
    Subset,
    build_split,
    domain_splits,
    few_shot_indices,
    import_class_path,
    prompt_names,
)
from cdfsl.continual.xtail.framing import (
    FramedImages,
    GeometryFraming,
    RandomResizedCropFraming,
    framing,
)
from cdfsl.continual.xtail.learners import (
    LEARNERS,
    METHOD_TITLES,
    METHODS,
    DualRailLearner,
    FineTuneLearner,
    LearnerContext,
    PrimalRailLearner,
    XTailLearner,
    ZeroShotLearner,
    _FeatureLearner,
    _RailLearner,
    learner_class,
    title_of,
)
from cdfsl.continual.xtail.metrics import (
    format_matrix,
    format_summary,
    plot_matrices,
    xtail_metrics,
)
from cdfsl.continual.xtail.run import XTailRun, method_result, run_summary
from cdfsl.memory import peak_rss

__all__ = [
    "CLASS_NAME_STYLES",
    "LEARNERS",
    "METHODS",
    "METHOD_TITLES",
    "SMALL_CLASS_DRAWS",
    "Domain",
    "DomainConfig",
    "DomainSplit",
    "DualConfig",
    "DualRailLearner",
    "FineTuneConfig",
    "FineTuneLearner",
    "FramedImages",
    "GeometryFraming",
    "LearnerContext",
    "PrimalConfig",
    "PrimalRailLearner",
    "RandomResizedCropFraming",
    "Subset",
    "XTailConfig",
    "XTailLearner",
    "XTailRun",
    "ZeroShotLearner",
    "_FeatureLearner",
    "_RailLearner",
    "build_split",
    "domain_splits",
    "few_shot_indices",
    "format_matrix",
    "format_summary",
    "framing",
    "import_class_path",
    "learner_class",
    "method_result",
    "peak_rss",
    "plot_matrices",
    "prompt_names",
    "run_summary",
    "title_of",
    "xtail_metrics",
]
