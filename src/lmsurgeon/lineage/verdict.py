"""The three-way verdict (methods.md §L7.7) from the decisive tests' z-scores; naive numbers never count.

Thresholds: T_hi = 5 and T_lo = 3 standard deviations of each test's stated null (one-sided p ≈ 3e-7 and
1e-3). They are fixed by the null's scale, not fitted to any particular set of models.
"""

from __future__ import annotations

import numpy as np

from lmsurgeon.lineage.results import TestResult, Verdict

T_HI = 5.0
T_LO = 3.0
DECISIVE = ("awm", "phi_u", "circuits", "phi_match")


def verdict(tests: list[TestResult]) -> Verdict:
    """``derived`` (max z ≥ T_hi and min z ≥ T_lo), ``independent`` (max z < T_lo), else ``inconclusive``."""
    used = [t for t in tests if t.name in DECISIVE and t.applies and np.isfinite(t.z if t.z is not None else np.nan)]
    if not used:
        reasons = [f"{t.name}: {t.reason}" for t in tests if not t.applies]
        return Verdict("inconclusive", ["no decisive test applies"] + reasons)
    zs = {t.name: float(t.z or 0.0) for t in used}  # every z here is finite
    desc = ", ".join(f"{k} z={v:.1f}" for k, v in zs.items())
    hi, lo = max(zs.values()), min(zs.values())
    if hi >= T_HI and lo >= T_LO:
        return Verdict("derived", [f"all decisive tests ≥ {T_LO} and one ≥ {T_HI} ({desc})"])
    if hi < T_LO:
        return Verdict("independent", [f"no decisive test reaches {T_LO} ({desc})"])
    reasons = [f"tests disagree ({desc}): derived needs max ≥ {T_HI} and min ≥ {T_LO}"]
    permutation = all((t.align or "permutation") == "permutation" for t in used)
    if permutation and zs.get("phi_match", 0.0) >= T_HI and min(zs.get("awm", T_HI), zs.get("phi_u", T_HI)) < T_LO:
        reasons.append(
            "activations match but weights do not: a rotated residual basis (folded gains) fits this; "
            "rerun the weight tests with --align procrustes"
        )
    return Verdict("inconclusive", reasons)
