"""The merge guard, its quality numbers and compare-generation on a layer-streamed base equal the in-memory path."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from lmsurgeon.merge import MergeSession, compare_generation
from lmsurgeon.merge.config import MergeConfig
from lmsurgeon.streaming import weight_bytes

PARAMS = {"target_emb_frac": 1.0, "min_tau_emb": -1.0, "alpha_cap_emb": 0.9, "min_tau_head": -1.0}


def _budget_below(folder) -> str:
    """A memory budget under half the model's own weights: ``auto`` must stream."""
    import torch

    from lmsurgeon.io import open_model

    total = sum(weight_bytes(open_model(folder), torch.float32).values())
    return f"{total // 2000}KB"


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_streamed_guard_trial_and_saved_model_equal_in_memory(merge_pair, tmp_path, model):
    """A trial's perplexity, KL and bits per byte, and the saved merged weights, agree to 1e-5 when the base
    (untied Llama, tied GPT-2) is streamed under a memory budget below its size."""
    base, donor = merge_pair[model], merge_pair["gpt2" if model == "llama" else "llama"]
    texts = merge_pair["texts"][:10]
    cfg = MergeConfig(batch_size=4, max_length=64)
    plain = MergeSession(str(base), str(donor), texts, cfg, general_texts=texts[:4], streaming="plain")
    streamed = MergeSession(str(base), str(donor), texts, cfg, general_texts=texts[:4], max_memory=_budget_below(base))
    assert streamed.streamed and not plain.streamed
    assert streamed.head_only == plain.head_only
    np.testing.assert_allclose(streamed.base_eval.nll_sum, plain.base_eval.nll_sum, rtol=1e-5)
    a, b = plain.trial(PARAMS, keep=True), streamed.trial(PARAMS, keep=True)
    assert a["stage_a"]["rows"] == b["stage_a"]["rows"] > 0
    for key in ("r", "sym_kl", "bpb", "general_bpb"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7)
    plain.save(tmp_path / "plain")
    streamed.save(tmp_path / "streamed")
    want, got = (
        load_file(tmp_path / "plain" / "model.safetensors"),
        load_file(tmp_path / "streamed" / "model.safetensors"),
    )
    for name, value in got.items():
        np.testing.assert_allclose(value, want[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert set(got) <= set(want)


def test_streamed_generation_gives_the_in_memory_answers(merge_pair, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Return the list of\nSelf-attention lets each token\n", encoding="utf-8")
    llama = str(merge_pair["llama"])
    runs = {
        way: compare_generation(
            llama, llama, prompts, tmp_path / way, max_new_tokens=10, streaming=way, max_memory="10KB"
        )
        for way in ("plain", "auto")
    }
    assert runs["auto"]["streamed"] == {"base": True, "merged": True}
    assert runs["plain"]["streamed"] == {"base": False, "merged": False}
    lines = {w: (tmp_path / w / "results.jsonl").read_text().splitlines() for w in runs}
    assert [json.loads(x)["base"]["text"] for x in lines["auto"]] == [
        json.loads(x)["base"]["text"] for x in lines["plain"]
    ]
    assert lines["auto"] == lines["plain"]
    assert all(json.loads(x)["base"]["n_tokens"] == 10 for x in lines["plain"])
