"""LightningModules for few-shot adaptation, on one shared base; frozen-feature baselines."""

from cdfsl.continual.rail import DualRegressor, PrimalRegressor, fuse
from cdfsl.methods.base import FewShotMethod
from cdfsl.methods.clap import CLAP, ZeroShotLinearProbe
from cdfsl.methods.frozen import FrozenFeatureMethod
from cdfsl.methods.linear_probe import LinearProbe
from cdfsl.methods.lora_ce import LoRAFineTune
from cdfsl.methods.lp_plus_plus import LPPlusPlus
from cdfsl.methods.mind import Mind
from cdfsl.methods.tip_adapter import TipAdapter, TipAdapterF
from cdfsl.methods.zero_shot import ZeroShot

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
