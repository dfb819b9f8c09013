"""LightningModules for few-shot adaptation, on one shared base."""

from cdfsl.methods.base import FewShotMethod
from cdfsl.methods.lora_ce import LoRAFineTune
from cdfsl.methods.mind import Mind
from cdfsl.methods.rail import DualRegressor, PrimalRegressor, fuse
from cdfsl.methods.zero_shot import ZeroShot

__all__ = [
    "DualRegressor",
    "FewShotMethod",
    "LoRAFineTune",
    "Mind",
    "PrimalRegressor",
    "ZeroShot",
    "fuse",
]
