"""Ablations over real training runs (``python -m pdm.ablation``): the driver
(:mod:`~pdm.ablation.driver`), the held-out scoring of each run (:mod:`~pdm.ablation.heldout`),
the statistics over seeds (:mod:`~pdm.ablation.stats`) and the report (:mod:`~pdm.ablation.report`)."""

from pdm.ablation.configs import net_for
from pdm.ablation.driver import main, plan

__all__ = ["main", "net_for", "plan"]
