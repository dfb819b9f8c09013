"""Continual learning: a frozen VLM learns domain after domain, each tested after every step.

:mod:`.xtail` is the X-TAIL protocol (recipe, splits and shots, framing, the learners registry,
Transfer / Average / Last, the resumable runner behind ``cdfsl rail``); :mod:`.rail` holds RAIL's
closed-form regressors (:class:`~cdfsl.continual.rail.PrimalRegressor`,
:class:`~cdfsl.continual.rail.DualRegressor`) and RAIL-Fusion
(:func:`~cdfsl.continual.rail.fuse`). Rows and tables go through :mod:`cdfsl.results`; the
fine-tuning baseline trains through :mod:`cdfsl.engine`.
"""
