"""Few-shot adaptation: N-way K-shot episodes on a far-away target domain, one row per episode.

- :mod:`.methods`: :class:`~cdfsl.fewshot.methods.FewShotMethod` (a LightningModule) and its
  subclasses, ZeroShot, LoRAFineTune, Mind and the frozen-feature baselines (linear probe,
  Tip-Adapter(-F), LP++, CLAP, ZS-LP); users import them from :mod:`cdfsl.methods`;
- :mod:`.losses` (Mind's terms, the split of L_vlm, the schedule) and :mod:`.alignment`
  (modality gap, class cosine gap, image-text margin), pure functions;
- the protocols, which train through :mod:`cdfsl.engine` and write their rows through
  :mod:`cdfsl.results`: :mod:`.episodic` (``cdfsl eval``: the episodic evaluator, its
  fingerprint, manifests, merging), :mod:`.allway` (``cdfsl allway``), :mod:`.grid` and
  :mod:`.table` (``cdfsl table``: methods x targets x shots x backbones, and the paper tables
  made from the cells' rows) and :mod:`.demo` (the demo's training curves).

This package imports nothing itself: the engine imports :mod:`.methods`, and the protocols
import the engine.
"""
