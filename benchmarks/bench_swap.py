"""Swap benchmarks: cached layer inputs against the naive way, and drop plans against the oracle.

Default: cached-input δ (methods.md §S8) vs physically swapping each adjacent pair and re-running the whole model, on
a random deep Llama and one right-padded batch; prints wall times, their ratio and the largest |Δδ|. Cached:
1 forward + 2(L−1) block calls; naive: 1 forward for the normal order + L−1 whole forwards of the swapped model.

``--plans MODEL``: (1) scoring drop plans from cached inputs vs writing each pruned checkpoint, loading it with
transformers and running it (wall and CPU time ratio, block calls, largest loss difference); ``--plan-set greedy``
(default) is the planner's own workload, the whole greedy search at 25 % depth, ``greedy-step`` one step of it,
``random`` random plans; (2) the whole planner at ``--plan-drop`` (default 25 %; ``--streaming`` and
``--max-memory`` as for ``swap``): each strategy's held-out bits per byte at the largest k against the greedy
oracle, and with ``--unseen gpt2:LAYERS:STEPS`` the same on a GPT-2-shaped model built and trained here.

    python benchmarks/bench_swap.py                 # 36 layers (GPT-2-Large depth), d = 256, vocab 32k, CPU
    python benchmarks/bench_swap.py --layers 24 --hidden 128 --device cuda
    python benchmarks/bench_swap.py --plans ~/.cache/lmsurgeon/zoo/test-*/deep-llama --tokens 8192
    python benchmarks/bench_swap.py --plans ZOO/deep-llama --unseen gpt2:12:300 --streaming stream
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmsurgeon.swap import capture, delta_from_cache
from lmsurgeon.swap.capture import first, token_delta

PATHS = ["model.layers"]


def build(layers: int, hidden: int, vocab: int, device: str):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        vocab_size=vocab,
        max_position_embeddings=4096,
    )
    return LlamaForCausalLM(cfg).to(device).eval()


def batch(rows: int, seq: int, vocab: int, device: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    mask = torch.ones(rows, seq, dtype=torch.long)
    for k in range(rows):  # ragged rows, right padding
        mask[k, seq - (k * seq) // (2 * rows) :] = 0
    return ids.to(device), mask.to(device)


def cached_deltas(model, ids, mask) -> list[float]:
    cap = capture(model, PATHS, input_ids=ids, attention_mask=mask)
    return delta_from_cache(model.model.layers, cap, mask.bool())


def naive_deltas(model, ids, mask) -> list[float]:
    """One plain forward for the normal order, then per pair the physically swapped model, whole forward."""
    layers = model.model.layers
    ref = capture(model, PATHS, input_ids=ids, attention_mask=mask)
    out = []
    for i in range(len(layers) - 1):
        layers[i], layers[i + 1] = layers[i + 1], layers[i]
        try:
            swapped = _output_of(model, ids, mask, i + 1)
        finally:
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
        out.append(float(token_delta(ref.h[i], ref.h[i + 2], swapped)[mask.bool()].mean()))
    return out


def _output_of(model, ids, mask, k: int) -> torch.Tensor:
    """One whole forward (embedding, all layers, head); the output of position k of the layer list."""
    got = {}
    hook = model.model.layers[k].register_forward_hook(lambda m, a, o: got.setdefault("out", first(o)))
    try:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        hook.remove()
    return got["out"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, *args, repeat: int = 1, cpu: list | None = None):
    """Result and median wall time over ``repeat`` runs (single runs of a few seconds vary by ±20% on a CPU).

    ``cpu``, if given, receives the median process CPU time too: on a shared machine wall time includes other
    processes' turns, CPU time does not."""
    times, cpu_times = [], []
    for _ in range(repeat):
        _sync(device)
        t, c = time.perf_counter(), time.process_time()
        res = fn(*args)
        _sync(device)
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    if cpu is not None:
        cpu.append(float(sorted(cpu_times)[len(cpu_times) // 2]))
    return res, float(sorted(times)[len(times) // 2])


def plan_cache_vs_reload(
    model_dir: str, tokens: int, seq_len: int, n_plans: int, repeat: int, plan_set: str = "random"
) -> None:
    """Score drop plans at 25 % depth both ways on the corpus test split; print times and differences.

    ``random``: ``n_plans`` random sets of k layers; ``greedy-step``: the candidates of the greedy search's last
    step (k−1 layers already dropped, every remaining layer tried), the planner's own workload.
    """
    import random
    import tempfile
    from pathlib import Path

    from lmsurgeon.arch import Layout, find_module
    from lmsurgeon.data import load_texts
    from lmsurgeon.io import open_model
    from lmsurgeon.swap.e2e import find_head
    from lmsurgeon.swap.plan import PlanEvaluator, plan_order, predicted_bytes
    from lmsurgeon.swap.run import _pad_id, make_batches, tokenize_rows

    handle = open_model(model_dir)
    layout = Layout(handle)
    model = handle.load_model("causal-lm", dtype=torch.float32)
    tok = handle.load_tokenizer()
    paths = layout.family.modules["layers"]
    layers = find_module(model, paths)
    L = len(layers)
    rows = tokenize_rows(tok, load_texts(None, "test"), seq_len, tokens)
    batches = make_batches(rows, 8192, seq_len, _pad_id(tok), "cpu")
    n_bytes = predicted_bytes(tok, rows)
    rng = random.Random(0)
    k = max(1, round(0.25 * L))
    head = find_head(model, layout.family)
    if plan_set == "greedy":
        from lmsurgeon.swap.plan import greedy

        def cached():  # the planner's own workload: the whole greedy search, one evaluator (one capture)
            evaluator = PlanEvaluator(model, layers, paths, head, batches, n_bytes)
            return [s.loss for _, s in greedy(evaluator, L, k)]

        def reloaded():
            out, current = [], ()
            with tempfile.TemporaryDirectory() as tmp:
                for step in range(k):
                    cands = [tuple(sorted((*current, j))) for j in range(L) if j not in current]
                    losses = [
                        _reload_loss(handle, layout, Path(tmp) / f"s{step}c{n}", plan_order(L, c), batches)
                        for n, c in enumerate(cands)
                    ]
                    best = min(range(len(cands)), key=lambda c: (losses[c], cands[c]))
                    current = cands[best]
                    out.append(losses[best])
            return out

        n_plans = sum(L - s for s in range(k))
    else:
        if plan_set == "greedy-step":
            base = sorted(rng.sample(range(L), k - 1))
            drops = [sorted([*base, j]) for j in range(L) if j not in base]
        else:
            drops = [sorted(rng.sample(range(L), k)) for _ in range(n_plans)]
        orders = [plan_order(L, d) for d in drops]
        n_plans = len(orders)

        def cached():
            evaluator = PlanEvaluator(model, layers, paths, head, batches, n_bytes)
            return [s.loss for s in evaluator.scores(orders)]  # includes the capture forward of every batch

        def reloaded():
            with tempfile.TemporaryDirectory() as tmp:
                return [_reload_loss(handle, layout, Path(tmp) / f"p{n}", o, batches) for n, o in enumerate(orders)]

    calls = {"n": 0}
    hooks = [layer.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1)) for layer in layers]
    cpu_fast: list[float] = []
    cpu_slow: list[float] = []
    fast, t_fast = timed(cached, "cpu", repeat=repeat, cpu=cpu_fast)
    for hk in hooks:
        hk.remove()
    cached_calls = calls["n"] // repeat
    slow, t_slow = timed(reloaded, "cpu", repeat=repeat, cpu=cpu_slow)
    diff = max(abs(a - b) for a, b in zip(fast, slow, strict=True))
    print(
        f"plan scoring on {model_dir}: {L} layers, {n_plans} {plan_set} plans dropping up to {k} layers, "
        f"{sum(len(r) for r in rows)} held-out tokens, {torch.get_num_threads()} threads"
    )
    print(f"{'method':<52}{'wall s':>10}{'CPU s':>10}{'block calls':>13}   (median of {repeat})")
    reload_calls = n_plans * L - sum(L - len(o) for o in ([] if plan_set == "greedy" else orders))
    print(
        f"{'cached layer inputs (1 capture + blocks after the cut)':<52}{t_fast:>10.3f}{cpu_fast[0]:>10.3f}"
        f"{cached_calls:>13}"
    )
    print(
        f"{'write, reload with transformers, full forwards':<52}{t_slow:>10.3f}{cpu_slow[0]:>10.3f}"
        f"{reload_calls if plan_set != 'greedy' else '':>13}"
    )
    print(
        f"ratio reload/cached: wall {t_slow / t_fast:.1f}x, CPU {cpu_slow[0] / cpu_fast[0]:.1f}x   "
        f"max |Δloss| = {diff:.2e} (losses {min(fast):.4f}…{max(fast):.4f} nats)"
    )


def _reload_loss(handle, layout, dest, order, batches) -> float:
    """Write the rewired checkpoint, load it with transformers, mean NLL of whole forwards."""
    from lmsurgeon.io import open_model
    from lmsurgeon.swap.apply import nll_total, write_rewired

    path = write_rewired(handle, layout, dest, order)
    pruned = open_model(path).load_model("causal-lm", dtype=torch.float32)
    total, count = nll_total(pruned, batches)
    return total / count


def plan_strategies(
    model_dir: str, plan_drop: str, tokens: int, seq_len: int, streaming: str = "auto", max_memory: str | None = None
) -> None:
    """The whole planner; each strategy's held-out bits per byte at the largest k beside the oracle's."""
    import tempfile
    from pathlib import Path

    from lmsurgeon.swap import analyze

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        res = analyze(
            model_dir,
            tokens=tokens,
            seq_len=seq_len,
            plan_drop=plan_drop,
            streaming=streaming,
            max_memory=max_memory,
            out=Path(tmp) / "run",
        )
        seconds = time.perf_counter() - t
    s = res["plan_summary"]
    K = s["k_max"]
    oracle = s["at_k_max"]["oracle_bpb"]
    print(
        f"drop plans on {model_dir}: k = {K} of {s['n_layers']} layers, {res['tokens']['heldout']} held-out "
        f"tokens, no drop {s['baseline']['heldout_bpb']:.4f} bpb; analysis {seconds:.0f} s"
    )
    st = res["model"]["streaming"]
    print(f"streaming {st['mode']}: streamed {st['streamed']}, block loads {st.get('block_loads')}, {st['memory']}")
    print(f"{'strategy':<20}{'layers dropped':<22}{'held-out bpb':>14}{'vs oracle':>11}{'validation loss':>17}")
    for r in sorted((r for r in res["plans"] if r["k"] == K), key=lambda r: r["heldout_bpb"]):
        val = "" if r["validation_loss"] is None else f"{r['validation_loss']:.4f}"
        print(
            f"{r['strategy']:<20}{','.join(map(str, r['layers'])):<22}{r['heldout_bpb']:>14.4f}"
            f"{100 * (r['heldout_bpb'] / oracle - 1):>+10.1f}%{val:>17}"
        )
    a = s["at_k_max"]
    print(
        f"recommended: {a['recommended']} ({a['recommended_bpb']:.4f} bpb, {100 * a['gap_to_oracle']:+.1f} % vs "
        f"oracle; within 5 %: {a['within_5_percent_of_oracle']}; at least as good as BI and angular: "
        f"{a['at_least_as_good_as_baselines']}); best non-oracle on held-out: {a['best_non_oracle_on_heldout']}"
    )
    sp = res["spearman"]["r_vs_delta"]
    print(f"Spearman r vs δ = {sp['rho']:.3f} [{sp['ci'][0]:.3f}, {sp['ci'][1]:.3f}] (n = {sp['n']}; paper 0.91)")


def build_unseen(spec: str, tokenizer_from: str, out: str) -> str:
    """A model the planner has not been developed on: ``family:layers:steps`` (e.g. ``gpt2:12:300``), randomly
    initialised with d = 64 and trained for ``steps`` steps (batch 16 × 128 tokens) on the built-in corpus's train
    split with the zoo's trainer, using the tokenizer of ``tokenizer_from``; saved to ``out``; returns ``out``."""
    import shutil
    from pathlib import Path

    from tokenizers import Tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmsurgeon.data import load_texts
    from lmsurgeon.zoo.training import TrainPlan, encode_stream, train

    family, layers, steps = spec.split(":")
    if family != "gpt2":
        raise SystemExit(f"--unseen {spec}: only gpt2:LAYERS:STEPS is built")
    dest = Path(out)
    if (dest / "model.safetensors").exists():
        return out
    tok = Tokenizer.from_file(str(Path(tokenizer_from) / "tokenizer.json"))
    torch.manual_seed(1)
    cfg = GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=128, n_embd=64, n_layer=int(layers), n_head=2, bos_token_id=0
    )
    cfg.eos_token_id = 0
    model = GPT2LMHeadModel(cfg)
    stream = encode_stream(tok, load_texts(None, "train"), eos_id=0)
    train(model, stream, TrainPlan(steps=int(steps), batch=16, seq_len=128, lr=1e-3, seed=1))
    model.save_pretrained(dest, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_from) / name, dest / name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="median of this many timed runs per method")
    ap.add_argument("--plans", metavar="MODEL", default=None, help="benchmark drop plans on this model instead")
    ap.add_argument("--plan-drop", default="25%")
    ap.add_argument("--n-plans", type=int, default=8, help="random plans for the cache-vs-reload timing")
    ap.add_argument("--plan-set", choices=["random", "greedy-step", "greedy"], default="greedy")
    ap.add_argument("--tokens", type=int, default=8192, help="held-out (and eval) tokens for --plans")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--skip-strategies", action="store_true", help="only the cache-vs-reload timing")
    ap.add_argument(
        "--unseen",
        metavar="gpt2:LAYERS:STEPS",
        default=None,
        help="with --plans MODEL: also plan on a model built and trained here (MODEL's tokenizer), saved under "
        "--unseen-dir",
    )
    ap.add_argument("--unseen-dir", default="bench-unseen-model")
    ap.add_argument("--streaming", choices=["auto", "stream", "plain"], default="auto", help="for the strategies")
    ap.add_argument("--max-memory", default=None, help="memory limit for the strategies run, e.g. 20MB")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.plans:
        plan_cache_vs_reload(args.plans, args.tokens, args.seq_len, args.n_plans, args.repeat, args.plan_set)
        if not args.skip_strategies:
            plan_strategies(args.plans, args.plan_drop, args.tokens, args.seq_len, args.streaming, args.max_memory)
        if args.unseen:
            unseen = build_unseen(args.unseen, args.plans, args.unseen_dir)
            plan_strategies(unseen, args.plan_drop, args.tokens, args.seq_len, args.streaming, args.max_memory)
        return
    model = build(args.layers, args.hidden, args.vocab, args.device)
    ids, mask = batch(args.rows, args.seq, args.vocab, args.device)
    cached_deltas(model, ids[:1, :16], mask[:1, :16])  # warm-up (kernels, allocator)
    fast, t_fast = timed(cached_deltas, args.device, model, ids, mask, repeat=args.repeat)
    slow, t_slow = timed(naive_deltas, args.device, model, ids, mask, repeat=args.repeat)
    L = args.layers
    diff = max(abs(a - b) for a, b in zip(fast, slow, strict=True))
    rel = max(abs(a - b) / abs(b) for a, b in zip(fast, slow, strict=True))
    print(
        f"model: random Llama, {L} layers, d = {args.hidden}, vocab {args.vocab}; batch {args.rows}×{args.seq} "
        f"({int(mask.sum())} real tokens), device {args.device}, {torch.get_num_threads()} threads"
    )
    print(f"{'method':<44}{'block calls':>12}{'seconds':>10}   (median of {args.repeat})")
    print(f"{'cached inputs (1 forward + 2(L-1) blocks)':<44}{L + 2 * (L - 1):>12}{t_fast:>10.3f}")
    print(f"{'naive (1 forward + swapped forward per pair)':<44}{L + (L - 1) * L:>12}{t_slow:>10.3f}")
    print(
        f"time ratio naive/cached: {t_slow / t_fast:.1f}x   max |Δδ| = {diff:.2e}   max relative {rel:.2e}   "
        f"(pairs: {L - 1}, δ range {min(fast):.3g}…{max(fast):.3g})"
    )


if __name__ == "__main__":
    main()
