"""DRDO inside other training frameworks. Each submodule imports its framework on import, and
nothing imports the submodules for you: ``import drdo`` needs none of these frameworks.

* :mod:`drdo.integrations.trl`: ``DRDOConfig`` / ``DRDOTrainer``, used as TRL's ``DPOConfig`` /
  ``DPOTrainer`` (``pip install drdo[trl]``).
"""
