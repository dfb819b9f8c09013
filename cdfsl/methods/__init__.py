"""The public import path of the methods: ``from cdfsl.methods import Mind``, and every recipe's
``class_path: cdfsl.methods.Mind``.

It holds no code: the few-shot LightningModules live in :mod:`cdfsl.fewshot.methods`, RAIL's
regressors and RAIL-Fusion in :mod:`cdfsl.continual.rail`; both are re-exported here.
"""

from cdfsl.continual.rail import DualRegressor, PrimalRegressor, fuse
from cdfsl.fewshot.methods import (
    CLAP,
    FewShotMethod,
    FrozenFeatureMethod,
    LinearProbe,
    LoRAFineTune,
    LPPlusPlus,
    Mind,
    TipAdapter,
    TipAdapterF,
    ZeroShot,
    ZeroShotLinearProbe,
)

__all__ = [
    "CLAP",
    "DualRegressor",
    "FewShotMethod",
    "FrozenFeatureMethod",
    "LPPlusPlus",
    "LinearProbe",
    "LoRAFineTune",
    "Mind",
    "PrimalRegressor",
    "TipAdapter",
    "TipAdapterF",
    "ZeroShot",
    "ZeroShotLinearProbe",
    "fuse",
]
