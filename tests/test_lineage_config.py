"""LineageConfig is the one place lineage options live: the CLI, compare's keywords and results.json follow it."""

from __future__ import annotations

import dataclasses
import statistics

import numpy as np
import pytest
from click.testing import CliRunner

from lmsurgeon.cli.lineage import lineage
from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.lineage import LineageConfig
from lmsurgeon.lineage.results import LayerCka, LayerRho, Null, TestResult


def test_every_config_field_is_a_cli_option_with_its_help():
    help_text = " ".join(CliRunner().invoke(lineage, ["--help"]).output.split())
    for f in dataclasses.fields(LineageConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in help_text, flag
        assert " ".join(f.metadata["help"].split())[:40] in help_text, flag


def test_cli_options_parse_into_the_config_that_compare_receives(monkeypatch):
    seen = {}

    def fake_compare(sources, out, config, **kw):
        seen["config"] = config
        return {"pairs": [], "out": "somewhere"}

    monkeypatch.setattr("lmsurgeon.lineage.compare", fake_compare)
    result = CliRunner().invoke(
        lineage,
        [
            "A",
            "B",
            "--tests",
            "awm,phi_u",
            "--null",
            "I1",
            "--null",
            "I2",
            "--align",
            "procrustes",
            "--seed",
            "3",
            "--all-pairs",
        ],
    )
    assert result.exit_code == 0, result.output
    assert seen["config"] == LineageConfig(
        tests=("awm", "phi_u"), null=("I1", "I2"), align="procrustes", seed=3, all_pairs=True
    )


def test_keyword_options_replace_the_fields_of_a_given_config():
    base = LineageConfig(seed=4, align="procrustes")
    built = LineageConfig.build(base, tests=["awm"], null=["x"])
    assert built == LineageConfig(seed=4, align="procrustes", tests=("awm",), null=("x",))


def test_unknown_keyword_option_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="naive"):
        LineageConfig.build(naive=True)


@pytest.mark.parametrize(
    "field,value,flag",
    [("tests", ("awm", "huref"), "--tests"), ("align", "rotation", "--align"), ("depth", "deep", "--depth")],
)
def test_unknown_choice_fails_naming_the_option(field, value, flag):
    with pytest.raises(LmsurgeonError, match=flag):
        LineageConfig(**{field: value})


def test_null_z_is_the_distance_from_the_mean_in_sample_standard_deviations():
    values = [0.11, 0.08, 0.13, 0.09, 0.1]
    null = Null.of(values, "five independents")
    assert null.mean == pytest.approx(statistics.fmean(values), abs=1e-15)
    assert null.std == pytest.approx(statistics.stdev(values), abs=1e-15)  # ddof = 1
    assert null.n == 5
    assert null.z(0.5) == pytest.approx((0.5 - statistics.fmean(values)) / statistics.stdev(values), abs=1e-12)


def test_null_z_floors_the_standard_deviation_at_a_thousandth():
    assert Null("same values", 0.2, 0.0, 3).z(0.25) == pytest.approx(50.0)


def test_null_of_finite_values_needs_two_of_them():
    assert Null.of_finite([0.1, float("nan"), None], "one finite") is None
    assert Null.of_finite([0.1, float("nan"), 0.3], "two finite") == Null.of([0.1, 0.3], "two finite")


def test_turning_a_result_exchanges_a_and_b_in_map_rows_and_matrix():
    M = np.arange(6.0).reshape(2, 3)
    t = TestResult(
        "awm", applies=True, layer_map=[(0, 2), (1, 0)], matrix=M, per_layer=[LayerCka(0, 2, 2.0), LayerCka(1, 0, 3.0)]
    )
    turned = t.turned()
    assert turned.layer_map == [(2, 0), (0, 1)]
    assert [(p.a, p.b) for p in turned.per_layer] == [(2, 0), (0, 1)]
    np.testing.assert_array_equal(turned.matrix, M.T)
    rho = LayerRho(1, 3, 0.5, 10, 1.5, block="mlp").turned()
    assert (rho.a, rho.b, rho.block) == (3, 1, "mlp")


def test_every_alignment_choice_has_a_fit_and_every_fit_is_a_choice():
    from lmsurgeon.lineage.config import ALIGN_METHODS
    from lmsurgeon.lineage.sound import ALIGNMENT_FITS

    assert sorted(ALIGNMENT_FITS) == sorted(m for m in ALIGN_METHODS if m != "auto")  # auto picks one of them
