"""What a lineage run finds, as types: a z and its null, one test's result, one pair's verdict.

Layer convention, everywhere in these types: a layer is its 0-based index in the model (the checkpoint's
``layers.N``; :attr:`lmsurgeon.arch.Layout.layers` is ``range(n_layers)``), and a layer map is a list of
``(layer of A, layer of B)`` pairs, A being the first model of the pair as the caller named it. Tests that run
with the models the other way round (the weight tests put the wider model first) turn their result round once,
with :meth:`TestResult.turned`, before anyone else sees it.

``to_json()`` gives exactly the ``results.json`` shape (schema ``lmsurgeon/lineage@1``, methods.md §L8).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from lmsurgeon.lineage.stats import log_p_from_z, neg_log10_p, z_against

LayerMap = list[tuple[int, int]]
VerdictLabel = Literal["derived", "independent", "inconclusive"]


@dataclass(frozen=True)
class Null:
    """A stated null: the distribution a test's value takes when B does *not* derive from A.

    A test's z is ``null.z(value) = (value − mean)/max(std, 0.001)`` (methods.md §L7.5): how many of the null's
    standard deviations the value lies above the null's mean. The floor on ``std`` keeps a null measured on
    near-identical values from turning any difference into an infinite z. ``value`` is

    * awm: its statistic, the mean matched CKA; the null is the independents' (the shipped calibration or the
      ``--null`` models), or the pair's own wrong layer maps when the pair does not clear them
      (:func:`lmsurgeon.lineage.awm.guarded_z`);
    * φ_U, φ_MATCH: their analytic z (Fisher over layers; the analytic null is N(0, 1), so ``null.z`` of it is
      itself), and with ``--null`` models that analytic z is measured again against theirs;
    * act_cka: its statistic against random item permutations (shown, never decisive).

    ``source`` says in words which null it is, ``n`` how many values it was measured from.
    """

    source: str
    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values, source: str) -> Null:
        """The null measured from ``values`` (sample standard deviation, ddof = 1)."""
        v = np.asarray(values, dtype=np.float64)
        return cls(source, float(v.mean()), float(v.std(ddof=1)), int(v.size))

    @classmethod
    def of_finite(cls, values, source: str) -> Null | None:
        """:meth:`of` over the finite values, or None when fewer than two are left (no spread to measure)."""
        v = [x for x in values if x is not None and np.isfinite(x)]
        return cls.of(v, source) if len(v) >= 2 else None

    def z(self, value: float) -> float:
        """(value − mean)/max(std, 0.001); nan when any of them is not finite."""
        return z_against(value, self.mean, self.std)

    def to_json(self) -> dict:
        return {"source": self.source, "mean": self.mean, "std": self.std, "n": self.n}


@dataclass
class LayerCka:
    """CKA of one matched layer pair (awm: q/k weights; act_cka: hidden states)."""

    a: int
    b: int
    cka: float

    def turned(self) -> LayerCka:
        return LayerCka(self.b, self.a, self.cka)

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, "cka": self.cka}


@dataclass
class LayerRho:
    """φ_U / φ_MATCH in one matched layer pair (one block of it in MoE): ρ of the two unit matchings over
    ``n_units`` units, its analytic z = ρ√(n−1) and −log10 of the one-sided p."""

    a: int
    b: int
    rho: float
    n_units: int
    z: float
    neg_log10_p: float = float("nan")
    block: str | None = None  # "mlp", "experts i↔j (router cosine c)", "shared expert"; None: dense φ_MATCH

    def turned(self) -> LayerRho:
        return replace(self, a=self.b, b=self.a)

    def to_json(self) -> dict:
        head = {"a": self.a, "b": self.b} | ({"block": self.block} if self.block is not None else {})
        return head | {"rho": self.rho, "n_units": self.n_units, "z": self.z, "neg_log10_p": self.neg_log10_p}


@dataclass
class OtherNulls:
    """Nulls a test measured beside the one its z uses, for the report (serialised as ``nulls``).

    awm measures three: random residual permutations (with the z against it, which may overstate), its own
    wrong layer maps, and the independents. With ``--null`` models, ``own`` is the null (and ``own_z`` the z)
    the test had before the ``--null`` models replaced it.
    """

    permutation: Null | None = None
    unmatched_layers: Null | None = None
    independents: Null | None = None
    z_permutation: float | None = None
    own: Null | None = None
    own_z: float | None = None

    def to_json(self) -> dict:
        out: dict = {}
        if self.permutation is not None:
            out = {
                "permutation": self.permutation.to_json(),
                "unmatched_layers": _json(self.unmatched_layers),
                "independents": _json(self.independents),
                "z_permutation": self.z_permutation,
            }
        if self.own_z is not None:
            out["own"] = (self.own.to_json() if self.own else {}) | {"z": self.own_z}
        return out


def _json(x):
    return None if x is None else x.to_json()


@dataclass
class TestResult:
    """One sound test on one pair. ``applies`` False carries the one-line ``reason`` and no z.

    ``z`` is always measured against ``null`` (see :class:`Null`); ``neg_log10_p`` is −log10 of its one-sided
    p. ``layer_map`` and ``per_layer`` follow the module's layer convention (A's layer, B's layer).
    """

    __test__ = False  # not a pytest test class despite the name

    name: str
    applies: bool
    reason: str = ""
    statistic: float | None = None
    z: float | None = None
    neg_log10_p: float | None = None
    null: Null | None = None
    per_layer: list[LayerCka | LayerRho] = field(default_factory=list)
    layer_map: LayerMap | None = None
    matrix: np.ndarray | None = None  # [layers of A, layers of B]: the matrix the layer map was chosen on
    align: str | None = None  # awm: residual alignment method
    monotone: bool | None = None  # awm: the layer map keeps layer order
    decisive: bool | None = None  # act_cka: False (it never decides)
    n_items: int | None = None  # act_cka: shared word items read
    layer_map_from: str | None = None  # phi_match: the test whose layer map it used
    run: dict | None = None  # activation tests: blocks run of each model's depth, streamed, compute dtype
    nulls: OtherNulls | None = None

    @classmethod
    def not_applicable(cls, name: str, reason: str) -> TestResult:
        return cls(name, applies=False, reason=reason)

    def measure(self, value: float, null: Null) -> None:
        """Set z = ``null.z(value)`` with its null and −log10 p."""
        self.set_z(null.z(value), null)

    def set_z(self, z: float, null: Null | None) -> None:
        """Set z (already measured against ``null``) and its −log10 p."""
        self.z, self.null = z, null
        self.neg_log10_p = neg_log10_p(log_p_from_z(z)) if np.isfinite(z) else float("nan")

    @property
    def value_for_null(self) -> float | None:
        """What ``--null`` models measure this test by: the analytic z for φ tests, else the statistic."""
        return self.z if self.name in ANALYTIC_Z else self.statistic

    def invalidate(self, reason: str) -> None:
        """The test read bad numbers or gave a non-finite number: it no longer applies (its numbers stay)."""
        self.applies, self.reason, self.z, self.neg_log10_p = False, reason, None, None

    def turned(self) -> TestResult:
        """The same result with A and B exchanged (layer map, per-layer rows and matrix)."""
        return replace(
            self,
            per_layer=[p.turned() for p in self.per_layer],
            layer_map=None if self.layer_map is None else [(b, a) for a, b in self.layer_map],
            matrix=None if self.matrix is None else np.asarray(self.matrix).T,
            run=None if self.run is None else {k: v[::-1] if isinstance(v, list) else v for k, v in self.run.items()},
        )

    def to_json(self) -> dict:
        out: dict = {"name": self.name, "applies": self.applies}
        if self.decisive is not None:
            out["decisive"] = self.decisive
        out["reason"] = self.reason
        if self.align is not None:
            out["align"] = self.align
        out |= {"statistic": self.statistic, "z": self.z, "neg_log10_p": self.neg_log10_p, "null": _json(self.null)}
        nulls = self.nulls.to_json() if self.nulls else {}
        if nulls:
            out["nulls"] = nulls
        if self.n_items is not None:
            out["n_items"] = self.n_items
        out["per_layer"] = [p.to_json() for p in self.per_layer]
        if self.layer_map is not None:
            out["layer_map"] = [list(p) for p in self.layer_map]
        if self.monotone is not None:
            out["monotone"] = self.monotone
        if self.matrix is not None:
            out["matrix"] = np.asarray(self.matrix).tolist()
        if self.layer_map_from is not None:
            out["layer_map_from"] = self.layer_map_from
        if self.run is not None:
            out["run"] = self.run
        return out


ANALYTIC_Z = ("phi_u", "phi_match")  # tests whose z is analytic; --null models measure that z, not the statistic


@dataclass(frozen=True)
class Verdict:
    """derived / independent / inconclusive, and why (methods.md §L7.7)."""

    label: VerdictLabel
    reasons: list[str]
    decisive_test: str | None = None  # the test whose z the verdict rests on (the second strongest, §L7.7)
    decisive_z: float | None = None
    strongest_test: str | None = None
    strongest_z: float | None = None
    evaded: list[str] = field(default_factory=list)  # decisive tests below T_lo in a derived pair
    suggested: list[str] = field(default_factory=list)  # what the evidence suggests was done to the model

    def to_json(self) -> dict:
        return {
            "decisive": {"test": self.decisive_test, "z": self.decisive_z},
            "strongest": {"test": self.strongest_test, "z": self.strongest_z},
            "evaded": self.evaded,
            "suggested": self.suggested,
        }


@dataclass(frozen=True)
class AlignmentFacts:
    """How B's residual basis was matched to A's for the weight tests (None: it could not be)."""

    method: str
    swapped: bool  # the weight tests ran with B first (B is the wider model)
    shared_tokens: int | None
    embedding_mean_abs_corr: float | None
    requested: str | None = None  # --align as given (auto, permutation, procrustes); method is what was used
    evidence: dict | None = None  # --align auto: held-out fit of both maps and the margin z that chose

    def to_json(self) -> dict:
        out = {
            "method": self.method,
            "swapped": self.swapped,
            "shared_tokens": self.shared_tokens,
            "embedding_mean_abs_corr": self.embedding_mean_abs_corr,
        }
        if self.requested is not None:
            out["requested"] = self.requested
        if self.evidence is not None:
            out["evidence"] = self.evidence
        return out


@dataclass(frozen=True)
class NaiveSummary:
    """The pair's headline naive numbers: means over layers of the per-layer gain comparisons."""

    mean_raw_cosine: float
    mean_pearson: float
    mean_spearman: float
    mean_shuffled: float
    weight_std: dict | None = None  # the second dispute's weight-σ fingerprint (methods.md §L2.1); None: not read

    def to_json(self) -> dict:
        out = {
            "mean_raw_cosine": self.mean_raw_cosine,
            "mean_pearson": self.mean_pearson,
            "mean_spearman": self.mean_spearman,
            "mean_shuffled": self.mean_shuffled,
        }
        if self.weight_std is not None:
            out["weight_std"] = self.weight_std
        return out


@dataclass
class PairResult:
    """One compared pair: naive numbers beside the sound tests and the verdict they give.

    ``layer_map`` is awm's (else act_cka's) when one applies. ``alignment``, ``seconds`` and ``bytes_read`` are
    None for ``--naive-only``. ``matrices`` (naive layer×layer heatmaps), ``gamma_fold`` and ``naive_table`` (the
    same-layer rows) feed the report and the top-level ``naive`` section, not the pair's entry.
    """

    a: str
    b: str
    naive: NaiveSummary
    verdict: Verdict
    tests: list[TestResult] = field(default_factory=list)
    layer_map: LayerMap | None = None
    alignment: AlignmentFacts | None = None
    seconds: float | None = None
    bytes_read: dict[str, int] | None = None
    matrices: dict = field(default_factory=dict, repr=False)
    gamma_fold: dict | None = None
    naive_table: dict = field(default_factory=dict, repr=False)

    def test(self, name: str) -> TestResult | None:
        return next((t for t in self.tests if t.name == name), None)

    def to_json(self) -> dict:
        out: dict = {
            "a": self.a,
            "b": self.b,
            "naive": self.naive.to_json(),
            "verdict": self.verdict.label,
            "reasons": self.verdict.reasons,
            **self.verdict.to_json(),
            "tests": [t.to_json() for t in self.tests],
        }
        if self.alignment is not None:
            out["alignment"] = self.alignment.to_json()
        out["layer_map"] = None if self.layer_map is None else [list(p) for p in self.layer_map]
        if self.seconds is not None:
            out |= {"seconds": self.seconds, "bytes_read": self.bytes_read}
        return out
