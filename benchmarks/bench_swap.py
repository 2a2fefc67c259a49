"""Cached-input δ (spec §8) vs the naive way: physically swap each adjacent pair and re-run the whole model.

Both compute δ(i, i+1) for every pair of a random deep Llama on the same right-padded batch; the script prints
wall times, their ratio and the largest |Δδ| between the two. Cached: 1 forward + 2(L−1) block calls; naive:
1 forward for the normal order + L−1 whole forwards of the swapped model (each L blocks, embedding and head).

    python benchmarks/bench_swap.py                 # 36 layers (GPT-2-Large depth), d = 256, vocab 32k, CPU
    python benchmarks/bench_swap.py --layers 24 --hidden 128 --device cuda
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
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                      vocab_size=vocab, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).to(device).eval()


def batch(rows: int, seq: int, vocab: int, device: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    mask = torch.ones(rows, seq, dtype=torch.long)
    for k in range(rows):  # ragged rows, right padding
        mask[k, seq - (k * seq) // (2 * rows):] = 0
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


def timed(fn, device, *args, repeat: int = 1):
    """Result and median wall time over ``repeat`` runs (single runs of a few seconds vary by ±20% on a CPU)."""
    times = []
    for _ in range(repeat):
        _sync(device)
        t = time.perf_counter()
        res = fn(*args)
        _sync(device)
        times.append(time.perf_counter() - t)
    return res, float(sorted(times)[len(times) // 2])


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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.layers, args.hidden, args.vocab, args.device)
    ids, mask = batch(args.rows, args.seq, args.vocab, args.device)
    cached_deltas(model, ids[:1, :16], mask[:1, :16])  # warm-up (kernels, allocator)
    fast, t_fast = timed(cached_deltas, args.device, model, ids, mask, repeat=args.repeat)
    slow, t_slow = timed(naive_deltas, args.device, model, ids, mask, repeat=args.repeat)
    L = args.layers
    diff = max(abs(a - b) for a, b in zip(fast, slow, strict=True))
    rel = max(abs(a - b) / abs(b) for a, b in zip(fast, slow, strict=True))
    print(f"model: random Llama, {L} layers, d = {args.hidden}, vocab {args.vocab}; batch {args.rows}×{args.seq} "
          f"({int(mask.sum())} real tokens), device {args.device}, {torch.get_num_threads()} threads")
    print(f"{'method':<44}{'block calls':>12}{'seconds':>10}   (median of {args.repeat})")
    print(f"{'cached inputs (1 forward + 2(L-1) blocks)':<44}{L + 2 * (L - 1):>12}{t_fast:>10.3f}")
    print(f"{'naive (1 forward + swapped forward per pair)':<44}{L + (L - 1) * L:>12}{t_slow:>10.3f}")
    print(f"time ratio naive/cached: {t_slow / t_fast:.1f}x   max |Δδ| = {diff:.2e}   max relative {rel:.2e}   "
          f"(pairs: {L - 1}, δ range {min(fast):.3g}…{max(fast):.3g})")


if __name__ == "__main__":
    main()
