"""The three-way verdict (methods.md §L7.7) from the decisive tests' z-scores; naive numbers never count.

Thresholds: T_hi = 5 and T_lo = 3 standard deviations of each test's stated null (one-sided p ≈ 3e-7 and
1e-3). They are fixed by the null's scale, not fitted to any particular set of models.

Corroboration. The verdict rests on the level that two decisive tests reach together (the second largest z;
the only z when a single test applies), so neither of two failures can decide alone:

* a launderer who evades one test (per-head maps against awm, a rotation against a permutation alignment) cannot
  turn a pair that the other tests call strongly derived into ``independent``: the evaded test is named under
  ``evaded`` with what the data suggests was done;
* one test whose null does not fit a pair (same-data independents that share structure in a privileged basis
  score high on awm) cannot make two independent models ``derived`` when no other test agrees; a single test at
  T_hi or above with no second one at T_lo leaves the pair ``inconclusive``, never ``independent``.
"""

from __future__ import annotations

import numpy as np

from lmsurgeon.lineage.results import AlignmentFacts, TestResult, Verdict

T_HI = 5.0
T_LO = 3.0
DECISIVE = ("awm", "phi_u", "circuits", "phi_match")
WEAK_ALIGNMENT = 0.5  # embedding mean |corr| below which the shared tokens do not fix a common residual basis


def _suggested(zs: dict[str, float], alignment: AlignmentFacts | None, method: str | None) -> list[str]:
    """What the pattern of z-scores and the alignment evidence (``method``: the weight tests' alignment) suggest
    the second model went through."""
    out = []
    evidence = (alignment.evidence or {}) if alignment is not None else {}
    if method == "procrustes" and evidence.get("chosen") == "procrustes":
        out.append(
            "rotation: an orthogonal map fitted held-out shared tokens decisively better than any signed "
            f"permutation (margin z = {evidence.get('margin_z', float('nan')):.1f})"
        )
    elif (
        method == "permutation"
        and zs.get("phi_match", 0.0) >= T_HI
        and any(w in zs for w in ("awm", "phi_u"))  # weights not compared are not weights that failed to match
        and max(zs.get("awm", -np.inf), zs.get("phi_u", -np.inf)) < T_LO
    ):
        out.append(
            "rotation: activations match but the permutation-aligned weights do not (a rotated residual "
            "basis after folded gains fits this; --align procrustes forces the orthogonal map)"
        )
    if method == "stored":
        out.append(
            "re-embedding or a new tokenizer: the embedding rows of shared tokens fix no common residual basis, "
            "but the body's weights match in the basis they are stored in"
        )
    if zs.get("circuits", 0.0) >= T_HI and zs.get("awm", T_HI) < T_LO:
        out.append(
            "per-head maps: the attention circuits (sums over heads of W_Q W_Kᵀ and W_V W_O) match while the "
            "per-head q/k weights do not"
        )
    weak = alignment is not None and (alignment.embedding_mean_abs_corr or 0.0) < WEAK_ALIGNMENT
    if zs.get("phi_match", 0.0) >= T_HI and weak:
        out.append(
            "vocabulary permutation or re-embedding: activations on the same words match, but the embedding rows "
            "of tokens spelled alike do not fix a common residual basis"
        )
    return out


def verdict(tests: list[TestResult], alignment: AlignmentFacts | None = None) -> Verdict:
    """``derived`` when two decisive tests reach T_hi; ``independent`` when no two reach T_lo and none reaches
    T_hi; else ``inconclusive``. With a single applicable decisive test, that test alone (T_hi / T_lo)."""
    used = [t for t in tests if t.name in DECISIVE and t.applies and np.isfinite(t.z if t.z is not None else np.nan)]
    if not used:
        reasons = [f"{t.name}: {t.reason}" for t in tests if not t.applies]
        return Verdict("inconclusive", ["no decisive test applies"] + reasons)
    zs = {t.name: float(t.z or 0.0) for t in used}  # every z here is finite
    ranked = sorted(zs, key=zs.__getitem__, reverse=True)
    strongest = ranked[0]
    decisive = ranked[1] if len(ranked) > 1 else ranked[0]
    z = zs[decisive]
    desc = ", ".join(f"{k} z={v:.1f}" for k, v in zs.items())
    facts = {"decisive_test": decisive, "decisive_z": z, "strongest_test": strongest, "strongest_z": zs[strongest]}
    two = "two decisive tests" if len(ranked) > 1 else "the only decisive test"
    method = alignment.method if alignment is not None else next((t.align for t in used if t.align), None)
    if z >= T_HI:
        evaded = [k for k in ranked if zs[k] < T_LO]
        reasons = [f"{two} reach {T_HI} (decisive: {decisive} z={z:.1f}; {desc})"]
        if evaded:
            reasons.append(f"evaded: {', '.join(evaded)} (below {T_LO} while the others are strongly positive)")
        suggested = _suggested(zs, alignment, method)
        return Verdict(
            "derived", reasons + [f"suggested: {x}" for x in suggested], **facts, evaded=evaded, suggested=suggested
        )
    if z < T_LO and zs[strongest] < T_HI:
        reasons = [f"no {two} reach {T_LO} (decisive: {decisive} z={z:.1f}; {desc})"]
        if zs[strongest] >= T_LO:
            reasons.append(f"{strongest} alone is weakly positive (z={zs[strongest]:.1f}); one test never decides")
        return Verdict("independent", reasons, **facts)
    reasons = [f"tests disagree ({desc}): derived needs {two} ≥ {T_HI}, independent none ≥ {T_HI}, no two ≥ {T_LO}"]
    suggested = _suggested(zs, alignment, method)
    reasons += [f"suggested: {s}" for s in suggested]
    return Verdict("inconclusive", reasons, **facts, suggested=suggested)
