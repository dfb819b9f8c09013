"""The training engine: fit E episodes side by side over one frozen backbone, and score them.

Protocols (the episodic and all-way evaluators, X-TAIL's fine-tuning baseline) and ``cdfsl fit``
train through this package; it knows nothing of rows, manifests or result files.

- :mod:`cdfsl.engine.fit`: :class:`FitConfig`, the support batches, :class:`NonFiniteGuard`,
  :func:`fit_episode`;
- :mod:`cdfsl.engine.capacity`: :func:`episodes_per_step`, E from the configuration or memory;
- :mod:`cdfsl.engine.predict`: :func:`predict_logits`.
"""

from cdfsl.engine.capacity import episodes_per_step
from cdfsl.engine.fit import (
    ENGINE_VERSION,
    PRECISIONS,
    FitConfig,
    NonFiniteGuard,
    check_finished,
    cpu_has_bf16,
    cuda_numerics,
    device_fingerprint,
    episode_seed,
    failure_record,
    fit_episode,
    support_loader,
    tf32_allowed,
    warn_if_slow_bf16,
)
from cdfsl.engine.predict import predict_logits

__all__ = [
    "ENGINE_VERSION",
    "PRECISIONS",
    "FitConfig",
    "NonFiniteGuard",
    "check_finished",
    "cpu_has_bf16",
    "cuda_numerics",
    "device_fingerprint",
    "episode_seed",
    "episodes_per_step",
    "failure_record",
    "fit_episode",
    "predict_logits",
    "support_loader",
    "tf32_allowed",
    "warn_if_slow_bf16",
]
