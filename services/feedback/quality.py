"""Answer quality per model version from ratings: up-rate and correction rate with their
confidence intervals (no I/O).

The intervals are Wilson score intervals at 95%: unlike the normal approximation they stay
inside [0, 1] and are honest for the small counts a new version starts with (0 of 3 rated
up is "somewhere in 0-56%", not "0%").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``successes`` out of ``trials`` ((0, 1) for none)."""
    if trials <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= trials:
        raise ValueError(f"{successes} successes out of {trials} trials")
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class QualityCounts:
    """The ratings of one model version (each example counted once, its latest rating)."""

    model: str
    model_version: str
    rated: int
    up: int  # rating +1 (up, or a score of 4-5)
    down: int  # rating -1 (down, or a score of 1-2)
    corrected: int  # carrying a correction

    @property
    def up_rate(self) -> float:
        return self.up / self.rated if self.rated else 0.0

    @property
    def correction_rate(self) -> float:
        return self.corrected / self.rated if self.rated else 0.0

    def to_json(self) -> dict[str, object]:
        up_low, up_high = wilson(self.up, self.rated)
        fix_low, fix_high = wilson(self.corrected, self.rated)
        return {
            "model": self.model,
            "model_version": self.model_version,
            "rated": self.rated,
            "up": self.up,
            "down": self.down,
            "corrected": self.corrected,
            "up_rate": self.up_rate,
            "up_rate_ci95": [up_low, up_high],
            "correction_rate": self.correction_rate,
            "correction_rate_ci95": [fix_low, fix_high],
        }
