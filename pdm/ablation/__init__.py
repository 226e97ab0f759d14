"""The patch-size ablation over real training runs (``python -m pdm.ablation``): the driver
(:mod:`~pdm.ablation.driver`) and its report (:mod:`~pdm.ablation.report`)."""

from pdm.ablation.driver import main, net_for, plan

__all__ = ["main", "net_for", "plan"]
