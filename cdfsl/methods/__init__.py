"""LightningModules for few-shot adaptation, on one shared base."""

from cdfsl.methods.base import FewShotMethod
from cdfsl.methods.lora_ce import LoRAFineTune
from cdfsl.methods.mind import Mind
from cdfsl.methods.rail import DualAdapter, PrimalAdapter, fuse
from cdfsl.methods.zero_shot import ZeroShot

__all__ = [
    "DualAdapter",
    "FewShotMethod",
    "LoRAFineTune",
    "Mind",
    "PrimalAdapter",
    "ZeroShot",
    "fuse",
]
