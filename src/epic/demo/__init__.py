"""`epic demo`: the paper's experiment in miniature on the built-in data (see `pipeline`, `kd` and `report`)."""

from epic.demo.config import DemoConfig, demo_config, scaled_budgets
from epic.demo.kd import run_kd_demo
from epic.demo.pipeline import run_demo

__all__ = ["DemoConfig", "demo_config", "run_demo", "run_kd_demo", "scaled_budgets"]
