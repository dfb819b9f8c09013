"""The public import path of the methods: ``from cdfsl.methods import Mind``, and every recipe's
``class_path: cdfsl.methods.Mind``.

It holds no code. It re-exports every name of :mod:`cdfsl.fewshot.methods` (FewShotMethod,
ZeroShot, LoRAFineTune, Mind and the frozen-feature baselines: FrozenFeatureMethod,
LinearProbe, ZeroShotLinearProbe, TipAdapter, TipAdapterF, LPPlusPlus, CLAP) and RAIL's
regressors and RAIL-Fusion from :mod:`cdfsl.continual.rail` (PrimalRegressor, DualRegressor,
fuse).
"""

from cdfsl.continual.rail import DualRegressor, PrimalRegressor, fuse
from cdfsl.fewshot.methods import *  # noqa: F403 (the names of its __all__, listed once there)
from cdfsl.fewshot.methods import __all__ as _FEWSHOT_METHODS

__all__ = ["DualRegressor", "PrimalRegressor", "fuse"]
__all__ += _FEWSHOT_METHODS
__all__.sort()
