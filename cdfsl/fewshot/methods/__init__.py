"""LightningModules for few-shot adaptation, on one shared base; frozen-feature baselines.

Users import them from :mod:`cdfsl.methods` (``from cdfsl.methods import Mind``; a recipe's
``class_path: cdfsl.methods.Mind``), which re-exports every name here.
"""

from cdfsl.fewshot.methods.base import FewShotMethod
from cdfsl.fewshot.methods.clap import CLAP, ZeroShotLinearProbe
from cdfsl.fewshot.methods.frozen import FrozenFeatureMethod
from cdfsl.fewshot.methods.linear_probe import LinearProbe
from cdfsl.fewshot.methods.lora_ce import LoRAFineTune
from cdfsl.fewshot.methods.lp_plus_plus import LPPlusPlus
from cdfsl.fewshot.methods.mind import Mind
from cdfsl.fewshot.methods.tip_adapter import TipAdapter, TipAdapterF
from cdfsl.fewshot.methods.zero_shot import ZeroShot

__all__ = [
    "CLAP",
    "FewShotMethod",
    "FrozenFeatureMethod",
    "LPPlusPlus",
    "LinearProbe",
    "LoRAFineTune",
    "Mind",
    "TipAdapter",
    "TipAdapterF",
    "ZeroShot",
    "ZeroShotLinearProbe",
]
