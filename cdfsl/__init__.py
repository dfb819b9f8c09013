"""cdfsl: few-shot fine-tuning of vision-language models on far-away target domains."""

from cdfsl.errors import CdfslError

__all__ = ["CdfslError"]
__version__ = "0.1.0"
