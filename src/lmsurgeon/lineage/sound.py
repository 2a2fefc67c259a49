"""Stage 2 for one pair: residual alignment, then the weight tests, each with ``applies`` and why not.

The alignment brings the wider model's weights into the narrower one's basis, so the weight tests run with
the wider model first; their results are turned round once, here, to the caller's (A, B).
"""

from __future__ import annotations

import numpy as np

from lmsurgeon.lineage.align import (
    MAX_SHARED,
    MIN_SHARED,
    Alignment,
    align_residual,
    align_rotation,
    paired_column_cosines,
    shared_tokens,
)
from lmsurgeon.lineage.awm import awm_test
from lmsurgeon.lineage.checks import problem
from lmsurgeon.lineage.circuits import circuits_test, permutation_map
from lmsurgeon.lineage.config import LineageConfig
from lmsurgeon.lineage.phi_u import mlp_kind, phi_u_test
from lmsurgeon.lineage.results import AlignmentFacts, TestResult
from lmsurgeon.lineage.stats import sidak_z

WEIGHT_TESTS = ("awm", "phi_u", "circuits")
ALIGNMENT_FITS = {"permutation": align_residual, "procrustes": align_rotation}  # LineageConfig.align → fit


def _roles_missing(layout, roles) -> str | None:
    """Why a model lacks one of ``roles`` in some layer, or None."""
    for r in roles:
        missing = [i for i in layout.layers if not layout.has(r, i)]
        if missing:
            return f"{layout.handle.name} has no {r!r} in layer {missing[0]}"
    return None


def _mlp_missing(layout) -> str | None:
    """Why φ_U cannot read a model's MLPs (a layer with neither up/down nor router + experts), or None."""
    bad = [i for i in layout.layers if mlp_kind(layout, i) is None]
    return f"{layout.handle.name} has no up/down or experts in layer {bad[0]}" if bad else None


AUTO_MARGIN_Z = 3.0  # held-out evidence an orthogonal fit needs over the signed permutation (methods.md §L7.1.3)
AUTO_CLOSED = 0.5  # ... and the share of the permutation's held-out misfit (1 − mean |corr|) it must remove


def held_out_corr(al: Alignment, E_A: np.ndarray, E_B: np.ndarray) -> np.ndarray:
    """Per B dimension, the correlation over held-out rows of A's mapped embedding column with B's (signs applied)."""
    mapped = E_A @ al.rotation if al.rotation is not None else E_A[:, al.perm] * al.sign[None, :]
    return paired_column_cosines(mapped, E_B)


def choose_alignment(E_A: np.ndarray, E_B: np.ndarray, seed: int = 0) -> tuple[str, dict]:
    """``permutation`` or ``procrustes`` for ``--align auto``, and the evidence (methods.md §L7.1.3).

    Both are fitted on half the shared tokens and scored on the other half by the per-dimension correlation of
    the mapped columns; the orthogonal map (d² free parameters against d) is chosen only when its held-out gain
    over the signed permutation is decisive, the paired difference's mean at least AUTO_MARGIN_Z standard errors
    above 0, and material, removing at least AUTO_CLOSED of what the permutation leaves unexplained. A model whose
    basis is a permutation of the other's scores about the same either way and keeps the permutation (a fine-tune's
    small drift is fitted slightly better by the freer map, significantly so with many dimensions, but that closes
    a sliver of the misfit); a rotated basis is fitted far better by the orthogonal map; independent models gain
    nothing held-out from the extra freedom.
    """
    n, d_b = E_B.shape
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    fit, held = order[: n // 2], order[n // 2 :]
    evidence: dict = {"n_fit": int(fit.size), "n_held_out": int(held.size), "threshold_z": AUTO_MARGIN_Z}
    if fit.size < max(MIN_SHARED // 2, d_b):
        evidence["reason"] = f"too few shared tokens to hold half out ({n} for width {d_b})"
        return "permutation", evidence | {"chosen": "permutation"}
    c_perm = np.abs(held_out_corr(align_residual(E_A[fit], E_B[fit]), E_A[held], E_B[held]))
    c_rot = np.abs(held_out_corr(align_rotation(E_A[fit], E_B[fit]), E_A[held], E_B[held]))
    diff = c_rot - c_perm
    se = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else float("nan")
    z = float(diff.mean() / max(se, 1e-12)) if np.isfinite(se) else float("nan")
    closed = float(diff.mean() / max(1.0 - c_perm.mean(), 1e-12))
    chosen = "procrustes" if np.isfinite(z) and z >= AUTO_MARGIN_Z and closed >= AUTO_CLOSED else "permutation"
    evidence |= {
        "held_out_corr_permutation": float(c_perm.mean()),
        "held_out_corr_procrustes": float(c_rot.mean()),
        "margin_z": z,
        "misfit_closed": closed,
        "threshold_closed": AUTO_CLOSED,
        "chosen": chosen,
    }
    return chosen, evidence


def alignment(
    wide, narrow, seed: int = 0, method: str = "auto", max_tokens: int = MAX_SHARED
) -> tuple[Alignment | None, str, dict | None]:
    """(alignment of ``wide``'s residual basis onto ``narrow``'s, "", evidence) or (None, why it cannot be
    fitted, None).

    ``method``: ``permutation`` (units and signs, methods.md §L7.1), ``procrustes`` (any orthogonal map) or
    ``auto`` (the one held-out shared tokens support, :func:`choose_alignment`; its evidence is returned). Reads
    only the embedding rows of at most ``max_tokens`` sampled shared tokens, as float32 (methods.md §L7.2.3)."""
    ta, tb = wide.handle.tokenizer, narrow.handle.tokenizer
    if ta is None or tb is None:
        return None, "a model has no tokenizer.json (shared tokens unknown)", None
    ia, ib = shared_tokens(ta, tb, seed=seed, limit=max_tokens)
    need = max(MIN_SHARED, narrow.hidden_size)
    if ia.size < need:
        return None, f"only {ia.size} shared tokens (< {need} needed)", None
    with wide.handle.counting("alignment"), narrow.handle.counting("alignment"):
        E_A, E_B = wide.read_rows("embed", ia, np.float32), narrow.read_rows("embed", ib, np.float32)
    for lay, E in ((wide, E_A), (narrow, E_B)):
        why = problem(E)
        if why:
            return None, f"bad numbers: {lay.handle.name} embedding rows have {why}", None
    evidence = None
    if method == "auto":
        method, evidence = choose_alignment(E_A, E_B, seed)
    return ALIGNMENT_FITS[method](E_A, E_B), "", evidence


def residual_map(al: Alignment, d_wide: int):
    """The alignment as a matrix R [d_wide, d_narrow], x_narrow = x_wide R (what the circuits test applies)."""
    return permutation_map(al.perm, al.sign, d_wide) if al.rotation is None else al.rotation


def weight_tests(
    la, lb, tests: tuple[str, ...], seed: int = 0, align: str = "auto", config: LineageConfig | None = None
) -> tuple[list[TestResult], AlignmentFacts]:
    """The requested weight tests (awm, phi_u, circuits) for A = ``la`` and B = ``lb``, and how the bases were
    aligned.

    ``config``: the run's config, whose ``circuit_layers`` and budget fields bound what the tests read and
    compute (defaults if None)."""
    config = config or LineageConfig()
    swapped = lb.hidden_size > la.hidden_size
    wide, narrow = (lb, la) if swapped else (la, lb)
    al, why, evidence = alignment(wide, narrow, seed, align, config.max_tokens)
    qk_missing = _roles_missing(wide, ("q", "k")) or _roles_missing(narrow, ("q", "k"))

    def run_awm(a: Alignment) -> TestResult:
        return awm_test(wide, narrow, a, seed=seed, max_items=config.max_items, permutations=config.permutations)

    awm, looks = None, 1
    weak = al is None or al.mean_abs_corr < STORED_BASIS_BELOW
    if align == "auto" and weak and not qk_missing and wide.hidden_size == narrow.hidden_size:
        al, awm, looks, stored = _with_stored_basis(al, why, wide.hidden_size, run_awm)
        evidence = {**(evidence or {}), "stored_basis": stored}
        why = ""
    method = "stored" if al is not None and al.n_tokens == 0 else (align if al is None else al.method)
    facts = AlignmentFacts(
        method,
        swapped,
        None if al is None else al.n_tokens,
        None if al is None else al.mean_abs_corr,
        requested=align,
        evidence=evidence,
    )
    out = []
    if "awm" in tests or "phi_u" in tests:
        missing = qk_missing
        if awm is None:
            awm = (
                run_awm(al)
                if al is not None and not missing
                else TestResult.not_applicable("awm", why or missing or "")
            )
        if "awm" in tests:
            out.append(awm)
    if "phi_u" in tests:
        missing = _mlp_missing(wide) or _mlp_missing(narrow)
        if al is None or missing:
            out.append(TestResult.not_applicable("phi_u", why or missing or ""))
        elif not awm.applies or awm.layer_map is None:
            out.append(TestResult.not_applicable("phi_u", "no layer map (awm did not apply)"))
        else:
            out.append(
                phi_u_test(
                    wide,
                    narrow,
                    al,
                    awm.layer_map,
                    seed=seed,
                    max_units=config.max_units,
                    best_experts=config.best_experts,
                )
                or TestResult.not_applicable(
                    "phi_u", "no matched layer pair has the same MLP kind (dense or experts) on both"
                )
            )
    if "circuits" in tests:
        missing = _roles_missing(wide, ("q", "k", "v", "o")) or _roles_missing(narrow, ("q", "k", "v", "o"))
        if al is None or missing:
            out.append(TestResult.not_applicable("circuits", why or missing or ""))
        else:
            out.append(circuits_test(wide, narrow, residual_map(al, wide.hidden_size), config.circuit_layers))
    if looks > 1:
        for t in out:
            if t.applies and t.z is not None and np.isfinite(t.z):
                t.set_z(sidak_z(t.z, looks), t.null)
    return [t.turned() if swapped and t.applies else t for t in out], facts


STORED_BASIS_BELOW = 0.5  # embedding mean |corr| below which shared tokens do not fix a common residual basis


def stored_basis(d: int) -> Alignment:
    """The identity map: B's residual dimension l is A's dimension l, sign +1 (``n_tokens`` 0: no token fitted it)."""
    return Alignment(np.arange(d), np.ones(d), float("nan"), 0)


def _with_stored_basis(
    al: Alignment | None, why: str, d: int, run_awm
) -> tuple[Alignment | None, TestResult, int, dict]:
    """``--align auto`` when the shared tokens fix no common basis (methods.md §L7.1.4): also try the stored basis.

    A re-embedded model (new embedding and head trained against a frozen body, §A10) keeps the body's residual
    basis exactly while its embedding rows no longer resemble the original's, so the token-fitted map is noise and
    every weight test collapses; an unrelated tokenizer does the same to a body copied whole. Both candidates are
    measured by awm and the one with the larger z is kept. Choosing the larger of ``looks`` z-scores is paid for
    with Šidák's correction of every weight test's p (applied by the caller), so two independent models, whose
    z is null in any fixed basis, stay null."""
    candidates: dict[str, Alignment] = {"stored basis": stored_basis(d)}
    if al is not None:
        candidates = {"shared-token fit": al, **candidates}
    results = {name: run_awm(a) for name, a in candidates.items()}
    zs = {name: (r.z if r.applies and r.z is not None and np.isfinite(r.z) else -np.inf) for name, r in results.items()}
    chosen = max(zs, key=zs.__getitem__)
    evidence = {
        "tried": list(candidates),
        "awm_z": {k: (None if not np.isfinite(v) else float(v)) for k, v in zs.items()},
        "chosen": chosen,
        "looks": len(candidates),
        "reason": why or "embedding mean |corr| below " + str(STORED_BASIS_BELOW),
    }
    return candidates[chosen], results[chosen], len(candidates), evidence
