"""Issue-level acceptance on the zoo's adversarial family (methods.md §A7–§A11), with default options: every
derived case ``derived`` and every false accusation ``independent``, nothing inconclusive, derived pairs decided at
z ≥ 12 and independents' decisive z ≤ 3; and the stored-basis candidate of ``--align auto`` (§L7.1.4)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from lmsurgeon.lineage import compare
from lmsurgeon.lineage.stats import sidak_z
from lmsurgeon.zoo import model_dir


def _adversarial(manifest) -> dict[str, list[tuple[str, str]]]:
    """reference model → [(adversarial model, truth)]"""
    out: dict[str, list[tuple[str, str]]] = {}
    for name, e in manifest["models"].items():
        if e.get("kind") == "adversarial":
            out.setdefault(e["truth_relative_to"], []).append((name, e["truth"]))
    return out


def test_every_adversarial_case_gets_its_truth_with_default_options(test_zoo):
    zoo_dir, manifest = test_zoo
    cases = _adversarial(manifest)
    assert sum(len(v) for v in cases.values()) >= 13
    seen = []
    for ref, models in cases.items():
        paths = [str(model_dir(zoo_dir, n, manifest)) for n in (ref, *(m for m, _ in models))]
        r = compare(paths, write=False)
        for (name, truth), pair in zip(models, r["pairs"], strict=True):
            zs = {t["name"]: t["z"] for t in pair["tests"] if t.get("z") is not None}
            seen.append((name, truth, pair["verdict"], pair["decisive"]["z"], zs))
    wrong = [s for s in seen if s[1] != s[2]]
    assert not wrong, wrong
    derived = [s[3] for s in seen if s[1] == "derived"]
    independent = [s[3] for s in seen if s[1] == "independent"]
    assert min(derived) >= 12, seen
    assert max(independent) <= 3, seen


def test_a_re_embedded_model_is_found_in_the_stored_basis_and_the_choice_is_reported(test_zoo, tmp_path):
    zoo_dir, manifest = test_zoo
    paths = [str(model_dir(zoo_dir, n, manifest)) for n in ("llama-sp", "adv-llama-reembedded", "adv-llama-indep")]
    r = compare(paths, out=tmp_path / "run", tests=("awm", "phi_u"))
    html = (tmp_path / "run" / "report.html").read_text()
    assert "stored basis tried" in html and "Šidák over 2 looks" in html
    reembedded, indep = r["pairs"]
    assert reembedded["alignment"]["method"] == "stored"
    stored = reembedded["alignment"]["evidence"]["stored_basis"]
    assert stored["looks"] == 2 and stored["chosen"] == "stored basis"
    assert stored["awm_z"]["stored basis"] > 12 > 3 > stored["awm_z"]["shared-token fit"]
    assert any("re-embedding" in s for s in reembedded["suggested"])
    assert reembedded["verdict"] == "derived"
    # the independent twin also had a weak embedding fit, so it was given the same two looks, and stays null
    assert indep["alignment"]["evidence"]["stored_basis"]["looks"] == 2
    assert indep["verdict"] == "independent"
    assert all(t["z"] < 3 for t in indep["tests"] if t.get("z") is not None)
    # an explicit --align is an override: no stored-basis look, so the re-embedded body is missed
    forced = compare(paths[:2], write=False, tests=("awm", "phi_u"), align="permutation")["pairs"][0]
    assert "stored_basis" not in (forced["alignment"].get("evidence") or {})
    assert forced["verdict"] != "derived"


@pytest.mark.parametrize("z", [-4.0, -1.0, 0.0, 0.5, 2.0, 3.0, 5.0, 7.9])
@pytest.mark.parametrize("looks", [2, 3])
def test_sidak_z_matches_the_direct_formula(z, looks):
    """Against scipy in float64: Φ(z') = Φ(z)^k, by ppf on the lower side and by isf of 1 − (1 − p)^k (through
    log1p/expm1) on the upper side, each where it is accurate."""
    if z <= 0:
        expected = stats.norm.ppf(stats.norm.cdf(z) ** looks)
    else:
        expected = stats.norm.isf(-np.expm1(looks * np.log1p(-stats.norm.sf(z))))
    assert sidak_z(z, looks) == pytest.approx(expected, abs=1e-6)


def test_sidak_z_is_monotone_and_finite_far_in_the_tail():
    zs = np.linspace(-10, 80, 400)
    out = np.array([sidak_z(float(z), 2) for z in zs])
    assert np.all(np.isfinite(out)) and np.all(np.diff(out) > 0)
    assert np.all(out < zs) and out[-1] > 79.9  # a correction, small in the far tail
    assert sidak_z(5.0, 1) == 5.0
