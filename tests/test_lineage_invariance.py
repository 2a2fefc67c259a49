"""Each invariance claim of methods.md §L7.7.1 for the weight tests, checked with a function-preserving transform.

A small random GPT-2 (LayerNorm, ReLU MLP, tied head) and a small random Llama (RMSNorm, rotary, grouped-query
attention, SwiGLU) are rewritten by one transform of ``lmsurgeon.zoo.launder`` at a time, the copy is written as a
checkpoint with its (possibly permuted) tokenizer, and the weight tests compare it with the original. A test that
claims invariance must give the statistic it gives the original against itself (the function did not change, so a
derived pair stays exactly as derived); awm's claimed failure under general per-head q/k maps is checked too.
"""

from __future__ import annotations

import pytest
import torch

from lmsurgeon.io import open_model
from lmsurgeon.lineage.checks import CheckedLayout
from lmsurgeon.lineage.sound import weight_tests
from lmsurgeon.zoo import launder
from tests.lineage_models import VOCAB, word_tokenizer
from tests.test_zoo_launder import one_thread, randomise  # noqa: F401 (one_thread: an autouse fixture)

TESTS = ("awm", "phi_u", "circuits")
SAME = 2e-3  # statistics of float32 checkpoints after a float64 rewrite


def small_model(kind: str):
    """Three layers (the circuits test needs three for its wrong-layer null), width 64, 400 word tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(
            n_embd=64, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=32, activation_function="relu"
        )
        return randomise(GPT2LMHeadModel(config))
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return randomise(LlamaForCausalLM(config))


def word_tokenizer_object():
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_word_tokenizer_json())


def _word_tokenizer_json() -> str:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        word_tokenizer(Path(d))
        return (Path(d) / "tokenizer.json").read_text()


def save(model, folder, tokenizer=None) -> CheckedLayout:
    folder.mkdir(parents=True)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is None:
        word_tokenizer(folder)
    else:
        tokenizer.save(str(folder / "tokenizer.json"))
    return CheckedLayout(open_model(str(folder)))


def folded(model):
    """Untied and gains folded: what a rotation needs first (each step checked on logits in test_zoo_launder)."""
    return launder.fold_norm_gains(launder.untie_head(model)[0])[0]


def transformed(name: str, model):
    """(copy, its tokenizer or None): one §A transform, after folding where the transform needs it."""
    if name == "fold":
        return folded(model), None
    if name == "rotate":  # the table's row: a rotation of a folded model, compared with that folded model
        return launder.rotate_residual(folded(model), seed=3)[0], None
    if name == "vocabulary":
        untied = launder.untie_head(model)[0]
        out, step = launder.permute_vocabulary(untied, seed=4)
        return out, launder.permute_tokenizer(word_tokenizer_object(), step.truth["perm"])
    transform = {
        "query_key": launder.map_query_key,
        "value_output": launder.map_value_output,
        "heads": launder.permute_heads,
        "units": launder.permute_mlp_units,
        "scale_units": launder.scale_mlp_units,
    }[name]
    return transform(model, seed=5)[0], None


# transform → tests claimed invariant (methods.md §L7.7.1); phi_u does not read attention, awm and circuits not MLPs
CLAIMS = {
    "fold": ("awm", "phi_u", "circuits"),
    "rotate": ("awm", "phi_u", "circuits"),
    "query_key": ("circuits",),
    "value_output": ("awm", "circuits"),
    "heads": ("awm", "circuits"),
    "units": ("phi_u",),
    "scale_units": ("phi_u",),
    "vocabulary": ("awm", "phi_u", "circuits"),
}


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict:
    """Per family: the model, its checkpoint's layout and every test's statistic against itself."""
    out = {}
    for kind in ("gpt2", "llama"):
        model = small_model(kind)
        layout = save(model, tmp_path_factory.mktemp(kind) / "original")
        results, _ = weight_tests(layout, layout, TESTS)
        out[kind] = (model, layout, {t.name: t.statistic for t in results})
    return out


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("name", list(CLAIMS))
def test_each_claimed_invariance_holds_under_its_transform(originals, tmp_path, kind, name):
    model, layout, self_stats = originals[kind]
    copy, tokenizer = transformed(name, model)
    copy_layout = save(copy, tmp_path / name, tokenizer)
    if name == "rotate":
        layout = save(folded(model), tmp_path / "folded")
    results, facts = weight_tests(layout, copy_layout, TESTS)  # the default: --align auto
    got = {t.name: t for t in results}
    for test in CLAIMS[name]:
        t = got[test]
        assert t.applies, (test, t.reason)
        assert t.statistic == pytest.approx(self_stats[test], rel=SAME, abs=SAME), (test, facts)
        assert t.z >= 12, (test, t.z)
    if name == "rotate":
        assert facts.method == "procrustes" and facts.evidence["margin_z"] >= 3, facts
    else:
        assert facts.method == "permutation", facts


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_awm_is_defeated_by_general_query_key_maps_while_circuits_are_not(originals, tmp_path, kind):
    """The ✗ of the table: invertible per-head maps on q/k keep every attention score yet move the q/k weights."""
    model, layout, self_stats = originals[kind]
    copy, _ = transformed("query_key", model)
    results, _ = weight_tests(layout, save(copy, tmp_path / "qk"), TESTS)
    got = {t.name: t for t in results}
    assert got["awm"].statistic < self_stats["awm"] - 0.1, got["awm"].statistic
    assert got["circuits"].statistic == pytest.approx(self_stats["circuits"], rel=SAME, abs=SAME)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_only_circuits_see_through_folding_and_rotation_together(originals, tmp_path, kind):
    """Fold then rotate, compared with the unfolded original: the gains are mixed into the rotated basis, which
    no per-dimension scale undoes, so awm's unit item rows no longer cancel them; circuits carry the gain."""
    model, layout, self_stats = originals[kind]
    copy, _ = transformed("rotate", model)
    results, facts = weight_tests(layout, save(copy, tmp_path / "fold_rotate"), TESTS)
    got = {t.name: t for t in results}
    assert facts.method == "procrustes"
    assert got["circuits"].statistic == pytest.approx(self_stats["circuits"], rel=SAME, abs=SAME)
    assert got["awm"].statistic < self_stats["awm"] - 0.02, got["awm"].statistic


@pytest.mark.parametrize(("hidden", "n_layers"), [(32, 3), (96, 6)])
def test_the_circuits_null_comes_from_the_pair_and_carries_to_other_widths_and_depths(tmp_path, hidden, n_layers):
    """Independent random models of a width and depth the zoo does not have: the wrong-layer null is measured on
    the pair itself, so its spread follows the width (cosines of unrelated d×d circuits shrink like 1/d) and the
    z of an independent pair stays below T_lo, while a function-preserving copy (heads permuted) is far above."""
    from transformers import LlamaForCausalLM

    from tests.lineage_models import llama_config

    layouts = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = randomise_seeded(LlamaForCausalLM(llama_config(n_layers, hidden)), seed)
        layouts.append(save(model, tmp_path / f"m{seed}"))
        if seed == 1:
            copy = save(launder.permute_heads(model, seed=9)[0], tmp_path / "copy")
    independent = {t.name: t for t in weight_tests(*layouts, ("circuits",))[0]}["circuits"]
    derived = {t.name: t for t in weight_tests(layouts[0], copy, ("circuits",))[0]}["circuits"]
    assert abs(independent.z) < 3, independent.z
    assert derived.z >= 12, derived.z
    assert independent.null.std < 3.0 / hidden, independent.null  # the null's spread scales with the width


def randomise_seeded(model, seed: int):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_((1.0 + 0.2 * noise) if "norm" in name else 0.15 * noise)
    return model.eval()
