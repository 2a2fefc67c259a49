"""Bad numbers: NaN, Inf or all-zero tensors are named in the results and never become a statistic silently.

A NaN in a norm gain makes a cosine NaN, but a NaN in an embedding or an MLP matrix can be laundered into a
finite number by an assignment solver; so every tensor a lineage test reads is checked as it is read, and a
test whose inputs were bad does not apply.
"""

from __future__ import annotations

import numpy as np

from lmsurgeon.arch import Layout
from lmsurgeon.lineage.results import TestResult


def problem(values: np.ndarray, zero_is_bad: bool = True) -> str | None:
    """'3 NaN', '1 Inf', 'all zero' or None for a healthy tensor."""
    a = np.asarray(values)
    n_nan = int(np.isnan(a).sum())
    if n_nan:
        return f"{n_nan} NaN of {a.size}"
    n_inf = int(np.isinf(a).sum())
    if n_inf:
        return f"{n_inf} Inf of {a.size}"
    if zero_is_bad and a.size and not a.any():
        return "all zero"
    return None


class CheckedLayout(Layout):
    """A :class:`Layout` that records every tensor it hands out holding NaN, Inf or only zeros.

    Biases are allowed to be all zero (that is how they are initialised); weights and gains are not.
    """

    def __init__(self, handle, family=None):
        super().__init__(handle, family)
        self.bad: dict[str, dict] = {}

    def _note(self, name: str, role: str, values: np.ndarray, zero_is_bad: bool = True) -> np.ndarray:
        why = problem(values, zero_is_bad)
        if why:
            self.bad.setdefault(name, {"tensor": name, "role": role, "problem": why})
        return values

    def read(self, role, layer=None, expert=None, dtype=np.float64):
        return self._note(self.name(role, layer, expert) or role, role, super().read(role, layer, expert, dtype))

    def bias(self, role, layer=None, expert=None, dtype=np.float64):
        b = super().bias(role, layer, expert, dtype)
        return b if b is None else self._note(f"{self.name(role, layer, expert)} (bias)", f"{role}.bias", b, False)

    def read_rows(self, role, idx, dtype=np.float64):
        return self._note(self.require(role), role, super().read_rows(role, idx, dtype))

    def bad_outside_norms(self) -> list[dict]:
        """Bad tensors a sound test may have read (norm tensors feed only the naive report)."""
        norm_roles = set(self.family.norm_roles())
        return [b for b in self.bad.values() if b["role"].split(".")[0] not in norm_roles]


def invalidate_tests(tests: list[TestResult], layouts: list[CheckedLayout]) -> None:
    """Tests on models with bad tensors, or with a non-finite statistic, do not apply (and say why)."""
    bad = [f"{lay.handle.name}: {b['tensor']} has {b['problem']}" for lay in layouts for b in lay.bad_outside_norms()]
    for t in tests:
        if not t.applies:
            continue
        if bad:
            why = f"bad numbers: {'; '.join(bad[:3])}" + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
        elif not all(np.isfinite(float(x)) for x in (t.statistic, t.z) if x is not None):
            why = "its statistic is not finite (NaN or Inf in the model's outputs)"
        else:
            continue
        t.invalidate(why)
