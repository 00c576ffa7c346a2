"""A validation figure and its goal, shared by the single-frame and coadd validations."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Metric:
    """One validation figure with its goal; ``passed`` when ``value`` is on the right side."""

    name: str
    value: float
    goal: float
    unit: str
    n: int
    higher_is_better: bool = False

    @property
    def passed(self) -> bool:
        if not np.isfinite(self.value):
            return False
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal

    def line(self) -> str:
        rel = ">=" if self.higher_is_better else "<="
        status = "PASS" if self.passed else "FAIL"
        return f"{status} {self.name}: {self.value:.4g} {self.unit} (goal {rel} {self.goal:g}; n={self.n})"
