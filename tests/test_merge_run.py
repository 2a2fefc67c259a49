"""Stage A/B on real tiny models: identity donor, broken donor, in-place restore, single merge and resume."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from lmsurgeon.merge import MergeSession, run_merge
from lmsurgeon.merge.search import journal_path

EVERYTHING = {
    "target_emb_frac": 1.0,
    "min_tau_emb": -1.0,
    "alpha_cap_emb": 0.95,
    "alpha_floor_emb": 0.5,
    "target_head_rows": 10**6,
    "min_tau_head": -1.0,
    "alpha_cap_head": 0.95,
    "alpha_floor_head": 0.5,
}


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_donor_equal_to_base_gives_the_base_back(merge_pair, dtype, tmp_path):
    src = merge_pair["llama"]
    if dtype == "bf16":  # the checkpoint itself in bf16, so base and donor rows are the same numbers
        w = load_file(src / "model.safetensors")
        src = tmp_path / "bf16"
        shutil.copytree(merge_pair["llama"], src)
        torch_w = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in w.items()}
        from safetensors.torch import save_file as save_torch

        save_torch(torch_w, src / "model.safetensors", metadata={"format": "pt"})
    s = MergeSession(str(src), str(src), merge_pair["texts"][:16], dtype=dtype)
    before = _weights(s.model)
    st = s.trial(EVERYTHING, keep=True)
    assert st["stage_a"]["rows"] > 0
    assert st["stage_b"]["rows"] > 0
    assert st["r"] == pytest.approx(1.0, abs=1e-6)
    for k, v in s.model.state_dict().items():
        if dtype == "bf16":
            assert torch.equal(v, before[k]), k
        else:
            torch.testing.assert_close(v, before[k], rtol=1e-6, atol=1e-7)


def test_trials_restore_the_base_bit_for_bit(merge_pair):
    s = MergeSession(str(merge_pair["llama"]), str(merge_pair["gpt2"]), merge_pair["texts"][:16])
    before = _weights(s.model)
    st = s.trial(EVERYTHING)
    assert st["stage_a"]["outcome"] == "applied"
    assert st["sym_kl"] > 0
    for k, v in s.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_stage_b_from_kept_head_inputs_equals_a_full_evaluation(merge_pair):
    """Stage B touches only the head, so r_B from the body's kept outputs must be what a full forward gives."""
    s = MergeSession(str(merge_pair["llama"]), str(merge_pair["gpt2"]), merge_pair["texts"][:16])
    assert s.stage_b is not None
    assert s.head_only
    cautious = {**EVERYTHING, "alpha_cap_emb": 0.3, "alpha_floor_emb": 0.05, "alpha_cap_head": 0.3}
    st = s.trial(cautious, keep=True)
    assert st["stage_b"]["outcome"] == "applied"
    assert st["n_evals"] == 1  # Stage B reused the body's outputs of Stage A's evaluation
    full = s.evaluator.evaluate(s.model)
    assert st["stage_b"]["ppl"] == pytest.approx(full.ppl, rel=1e-5)
    s.restore()
    s.head_only = False
    again = s.trial(cautious)
    assert again["n_evals"] == 2
    assert again["r"] == pytest.approx(st["r"], rel=1e-5)
    assert again["sym_kl"] == pytest.approx(st["sym_kl"], rel=1e-4, abs=1e-7)


@pytest.fixture
def broken_donor(merge_pair, tmp_path):
    """The GPT-2 donor with its embeddings scaled by 1e3 and permuted: blending it wrecks perplexity."""
    d = tmp_path / "broken"
    shutil.copytree(merge_pair["gpt2"], d)
    w = load_file(d / "model.safetensors")
    E = w["transformer.wte.weight"]
    w["transformer.wte.weight"] = (np.random.default_rng(0).permutation(E) * 1e3).astype(E.dtype)
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})
    return d


def test_broken_donor_trips_the_guard_and_rolls_back(merge_pair, broken_donor):
    s = MergeSession(str(merge_pair["llama"]), str(broken_donor), merge_pair["texts"][:16], ppl_cap=1.0001)
    before = _weights(s.model)
    st = s.trial({**EVERYTHING, "use_soft_clip": False}, keep=True)
    assert st["stage_a"]["outcome"] == "rolled_back"
    assert st["stage_b"]["outcome"] == "skipped_guard"
    assert st["r"] == 1.0
    assert st["sym_kl"] == 0.0
    for k, v in s.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_stage_b_alone_is_rolled_back_when_the_head_moves_too_far(merge_pair):
    """Stage A with α = 0 keeps r_A = 1 exactly; a strict cap then refuses the head blend, which is undone."""
    s = MergeSession(str(merge_pair["llama"]), str(merge_pair["gpt2"]), merge_pair["texts"][:16], ppl_cap=1.0001)
    head_before = s.model.lm_head.weight.detach().clone()
    st = s.trial({**EVERYTHING, "alpha_floor_emb": 0.0, "alpha_cap_emb": 0.0}, keep=True)
    assert st["stage_a"]["outcome"] == "applied"
    assert st["r_A"] == 1.0
    assert st["stage_b"]["outcome"] == "rolled_back"
    assert st["r_B"] > 1.0001
    assert torch.equal(s.model.lm_head.weight, head_before)
    assert st["r"] == 1.0


def test_single_merge_writes_the_run_folder(merge_pair, tmp_path):
    out = tmp_path / "one"
    res = run_merge(
        str(merge_pair["gpt2"]),
        str(merge_pair["llama"]),
        out,
        trials=0,
        prompts_file=str(merge_pair["prompts"]),
        params={"min_tau_emb": 0.0},
        max_prompts=12,
    )
    assert res["schema"] == "lmsurgeon/merge@1"
    assert res["tied"] is True
    assert res["out"] == str(out)
    assert json.loads((out / "results.json").read_text()) == {k: v for k, v in res.items() if k != "out"}
    for f in (
        "best_model/model.safetensors",
        "best_model/tokenizer.json",
        "pareto.png",
        "report.html",
        "pareto.json",
        "best.json",
        "trials.csv",
        "stats/trial_0000.json",
    ):
        assert (out / f).exists(), f
    assert res["best_stats"]["stage_b"]["outcome"] == "skipped_tied"


def test_results_report_bits_per_byte_of_base_donor_best_and_baselines_on_three_texts(merge_pair, tmp_path):
    out = tmp_path / "bpb"
    res = run_merge(
        str(merge_pair["llama"]),
        str(merge_pair["gpt2"]),
        out,
        trials=0,
        max_prompts=6,
        prompts_file=str(merge_pair["prompts"]),
        params={"target_emb_frac": 1.0, "min_tau_emb": -1.0},
    )
    bpb = res["bpb"]
    assert [b["name"] for b in bpb["baselines"]] == [
        "base",
        "seed-defaults",
        "linear-blend",
        "mean-of-subtokens",
        "omp-init",
    ]
    for entry in [bpb["base"], bpb["donor"], bpb["best"], bpb["best_trial"], *bpb["baselines"]]:
        assert set(entry) >= {"search", "heldout", "general", "heldout_by_class"}
    assert bpb["best_trial"]["search"] == pytest.approx(res["best_stats"]["bpb"], rel=1e-6)  # re-measured
    assert bpb["baselines"][0]["heldout"] == bpb["base"]["heldout"]
    # the seed's cautious gate (cosine ≥ 0.6) picks no row of these random tiny models; the others move rows
    moved = [b for b in bpb["baselines"] if b["name"] not in ("base", "seed-defaults")]
    assert [b["heldout"] != bpb["base"]["heldout"] for b in moved] == [True, True, True]
    assert res["texts"]["search"]["documents"] == 6
    assert res["texts"]["heldout"]["documents"] == 6
    assert res["texts"]["heldout"]["source"].endswith("(documents after the search text)")


def test_the_recommended_model_is_never_worse_than_the_base_on_held_out_text(merge_pair, broken_donor, tmp_path):
    """A broken donor let through a lax guard makes the merge worse: the base is recommended and saved as is."""
    out = tmp_path / "rec"
    res = run_merge(
        str(merge_pair["llama"]),
        str(broken_donor),
        out,
        trials=0,
        max_prompts=6,
        prompts_file=str(merge_pair["prompts"]),
        params={**EVERYTHING, "use_soft_clip": False},
        ppl_cap=1e9,
    )
    assert res["best_stats"]["stage_a"]["outcome"] == "applied"
    bpb = res["bpb"]
    assert bpb["best_trial"]["heldout"] > bpb["base"]["heldout"]
    assert bpb["recommended"] == "base"
    assert "no trial beat the base" in bpb["reason"]
    assert bpb["best"]["heldout"] == bpb["base"]["heldout"]
    saved = load_file(out / "best_model" / "model.safetensors")
    base = load_file(merge_pair["llama"] / "model.safetensors")
    assert sorted(saved) == sorted(base)
    for name, tensor in base.items():
        np.testing.assert_array_equal(saved[name], tensor, err_msg=name)


def test_recommendation_needs_a_held_out_gain_and_general_text_within_tolerance():
    from lmsurgeon.merge import MergeConfig
    from lmsurgeon.merge.quality import recommend

    base = {"heldout": 2.0, "general": 3.0}
    cfg = MergeConfig(tolerance=0.01)
    assert recommend(base, None, cfg)[0] == "base"
    assert recommend(base, {"heldout": 2.0, "general": 3.0}, cfg)[0] == "base"  # a tie is no gain
    assert recommend(base, {"heldout": 1.9, "general": 3.0301}, cfg)[0] == "base"
    assert recommend(base, {"heldout": 1.9, "general": 3.0299}, cfg)[0] == "trial"


def test_baselines_change_rows_and_give_the_base_back_bit_for_bit(merge_pair):
    from lmsurgeon.merge.quality import BASELINES

    s = MergeSession(str(merge_pair["llama"]), str(merge_pair["gpt2"]), merge_pair["texts"][:8])
    before = _weights(s.model)
    for name, build in BASELINES.items():
        patches = build(s)
        changed = [k for k, v in s.model.state_dict().items() if not torch.equal(v, before[k])]
        assert sorted(changed) == ["lm_head.weight", "model.embed_tokens.weight"], name
        for patch in reversed(patches):
            patch.restore()
        for k, v in s.model.state_dict().items():
            assert torch.equal(v, before[k]), (name, k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_patch_larger_than_its_limit_keeps_the_original_rows_on_disk_and_puts_them_back_bit_for_bit(dtype):
    from lmsurgeon.merge.quality import RowPatch
    from lmsurgeon.streaming.spill import DiskTensors

    weight = torch.nn.Parameter(torch.randn(50, 12, generator=torch.Generator().manual_seed(4)).to(dtype))
    before = weight.detach().clone()
    ids = np.arange(3, 40, 2)
    rows = np.random.default_rng(5).normal(size=(ids.size, 12)).astype(np.float32)
    patch = RowPatch(weight, ids, rows, spill_bytes=0)
    assert isinstance(patch._kept, DiskTensors)  # not held in memory
    folder = patch._kept.folder
    assert torch.equal(weight.detach()[ids], torch.from_numpy(rows).to(dtype))
    patch.restore()
    assert torch.equal(weight.detach(), before)
    del patch
    assert not folder.exists()
    small = RowPatch(weight, ids, rows)  # under the limit: kept in memory
    assert isinstance(small._kept, torch.Tensor)
    small.restore()
    assert torch.equal(weight.detach(), before)


def test_mean_of_subtokens_taken_in_chunks_gives_every_row_the_float64_mean_mapped_and_blended(merge_pair):
    """The baseline maps the vocabulary a chunk at a time (its whole float64 copies do not fit at 150k × 4096);
    each row must still be y + ½(s (mean of the donor rows of its donor tokens − μ_X) R + μ_Y − y), computed
    here in float64 numpy for every row, whatever the chunk size."""
    from lmsurgeon.merge.quality import _vocab_rows, mean_of_subtokens

    s = MergeSession(str(merge_pair["llama"]), str(merge_pair["gpt2"]), merge_pair["texts"][:8])
    ids, texts = _vocab_rows(s)
    tok = s.donor_handle.tokenizer
    for stage, donor in ((s.stage_a, s.E_D), (s.stage_b, s.H_D)):
        ali, original = stage.alignment, stage.weight.detach().float().numpy().copy()
        patches = mean_of_subtokens(s, chunk=7)
        got = stage.weight.detach().float().numpy()
        want, checked = original.copy(), 0
        for i, text in zip(ids, texts, strict=True):
            donor_ids = [j for j in tok.encode(text, add_special_tokens=False).ids if j < donor.shape[0]]
            if donor_ids:
                v = donor[donor_ids].astype(np.float64).mean(0)
                mapped = ali.s * (v - ali.mu_X) @ ali.R + ali.mu_Y
                want[i] = original[i] + 0.5 * (mapped - original[i])
                checked += 1
        assert checked > 100
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        for patch in reversed(patches):
            patch.restore()
        assert np.array_equal(stage.weight.detach().float().numpy(), original)


def test_domain_objective_keeps_general_text_within_tolerance(merge_pair, tmp_path):
    res = run_merge(
        str(merge_pair["llama"]),
        str(merge_pair["gpt2"]),
        tmp_path / "domain",
        trials=4,
        seed=1,
        max_prompts=6,
        prompts_file=str(merge_pair["prompts"]),
        objective="domain",
        tolerance=0.05,
    )
    base_general = res["bpb"]["base"]["general"]
    stats = [json.loads(p.read_text()) for p in sorted((tmp_path / "domain" / "stats").glob("trial_*.json"))]
    assert len(stats) == 4
    # general text is measured for every trial that lowered the search text's bits per byte (the others cannot win)
    base_search = res["bpb"]["base"]["search"]
    # (or than the best feasible trial before it: a trial that does not beat that cannot be chosen)
    bar = base_search
    for st in stats:
        assert isinstance(st["general_bpb"], float) == (st["bpb"] < bar or st["n_evals"] == 0)
        if st["general_bpb"] is not None and st["general_bpb"] <= base_general * 1.05 and st["r"] <= res["ppl_cap"]:
            bar = min(bar, st["bpb"])
    feasible = [
        st
        for st in stats
        if st["general_bpb"] is not None and st["general_bpb"] <= base_general * 1.05 and st["r"] <= res["ppl_cap"]
    ]
    if feasible:
        assert res["best_stats"]["bpb"] == min(st["bpb"] for st in feasible)
    else:
        assert res["best"] is None


def test_held_out_text_is_disjoint_from_the_search_text(tmp_path):
    from lmsurgeon.errors import LmsurgeonError
    from lmsurgeon.merge import MergeConfig
    from lmsurgeon.merge.quality import merge_texts

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n\n".join(f"document number {i}" for i in range(10)))
    texts = merge_texts(MergeConfig(prompts_file=str(prompts), max_prompts=4))
    assert texts.search == [f"document number {i}" for i in range(4)]
    assert texts.heldout == [f"document number {i}" for i in range(4, 8)]
    every = merge_texts(MergeConfig(prompts_file=str(prompts), max_prompts=0))
    assert every.heldout == ["document number 3", "document number 7"]
    assert set(every.search) & set(every.heldout) == set()
    assert len(every.search) == 8
    default = merge_texts(MergeConfig(max_prompts=16))
    assert set(default.search) & set(default.heldout) == set()
    assert len(default.heldout) == 16
    assert set(default.general) & (set(default.search) | set(default.heldout)) == set()  # the test split
    prompts.write_text("only one document")
    with pytest.raises(LmsurgeonError, match="--eval-file"):
        merge_texts(MergeConfig(prompts_file=str(prompts)))


class _Interrupt(Exception):
    pass


def test_interrupted_study_resumes_with_the_next_trial_number(merge_pair, tmp_path):
    out = tmp_path / "study"
    kw = dict(prompts_file=str(merge_pair["prompts"]), max_prompts=8, seed=3)

    def stop_after_two(study, trial):
        if trial.number == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run_merge(str(merge_pair["llama"]), str(merge_pair["gpt2"]), out, trials=5, callbacks=[stop_after_two], **kw)
    assert journal_path(out).exists()
    assert not out.exists()
    res = run_merge(str(merge_pair["llama"]), str(merge_pair["gpt2"]), out, trials=5, resume=True, **kw)
    numbers = sorted(int(p.stem.split("_")[1]) for p in (out / "stats").glob("trial_*.json"))
    assert numbers == [0, 1, 2, 3, 4]
    assert res["n_trials"] == 5
    assert (out / "study.journal").exists()
    assert not journal_path(out).exists()
    assert res["best"] is not None
    assert res["best"]["r"] <= 2.5


def test_study_fingerprint_of_default_settings_is_the_one_studies_were_started_with():
    """A study started before MergeConfig existed must still resume: the old positional fingerprint."""
    from lmsurgeon.merge import MergeConfig
    from lmsurgeon.merge.config import fingerprint, study_fingerprint
    from lmsurgeon.merge.search import SPACE

    inputs_b, inputs_d, texts = [{"file": "b"}], [{"file": "d"}], ["one prompt", "another"]
    legacy = fingerprint(
        inputs_b, inputs_d, texts, 2.5, 512, "tail:8", 50_000, "fp32", 12.0, "rollback", SPACE, None, 64
    )
    assert study_fingerprint(inputs_b, inputs_d, texts, MergeConfig(), SPACE) == legacy
    assert study_fingerprint(inputs_b, inputs_d, texts, MergeConfig(trials=3, seed=9, batch_size=2), SPACE) == legacy
    assert study_fingerprint(inputs_b, inputs_d, texts, MergeConfig(max_length=64), SPACE) != legacy
    assert study_fingerprint(inputs_b, inputs_d, texts, MergeConfig(ppl_cap=2.0), SPACE) != legacy


def test_resuming_with_another_guard_is_refused(merge_pair, tmp_path):
    from lmsurgeon.errors import LmsurgeonError

    out = tmp_path / "study"
    kw = dict(prompts_file=str(merge_pair["prompts"]), max_prompts=4, seed=3)

    def stop_at_once(study, trial):
        raise _Interrupt

    with pytest.raises(_Interrupt):
        run_merge(str(merge_pair["llama"]), str(merge_pair["gpt2"]), out, trials=3, callbacks=[stop_at_once], **kw)
    with pytest.raises(LmsurgeonError, match="fingerprint"):
        run_merge(str(merge_pair["llama"]), str(merge_pair["gpt2"]), out, trials=3, resume=True, ppl_cap=2.0, **kw)


def test_config_and_keywords_give_the_same_settings():
    from lmsurgeon.merge import MergeConfig

    assert MergeConfig().with_overrides(trials=3, ppl_cap=2.0) == MergeConfig(trials=3, ppl_cap=2.0)
    with pytest.raises(TypeError, match="donor_on_cpu"):
        MergeConfig().with_overrides(donor_on_cpu=True)


def test_bad_settings_name_the_option():
    from lmsurgeon.errors import LmsurgeonError
    from lmsurgeon.merge import MergeConfig

    with pytest.raises(LmsurgeonError, match="--ppl-cap"):
        MergeConfig(ppl_cap=1.0)
    with pytest.raises(LmsurgeonError, match="--dtype 'fp8'"):
        MergeConfig(dtype="fp8")


def test_the_donor_is_read_by_the_rows_the_merge_uses_not_whole(merge_pair):
    """A capped shared vocabulary reads a few donor rows: the donor's table is never loaded whole (a 100B-class
    donor's is 3.2 GB), and the rows read are the stored rows, in the order asked for, repeats included."""
    from lmsurgeon.io import open_model

    s = MergeSession(str(merge_pair["llama"]), str(merge_pair["gpt2"]), merge_pair["texts"][:8], max_shared=16)
    donor = open_model(merge_pair["gpt2"])
    table = s.E_D.name
    assert s.donor_handle.bytes_read < donor.info(table).nbytes / 4
    ids = np.array([5, 3, 3, 200, 0, 5])
    np.testing.assert_array_equal(s.E_D[ids], donor.tensor(table, np.float32)[ids])
