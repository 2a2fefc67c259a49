"""Reading every layer's norm vectors from a large sharded MoE checkpoint: lmsurgeon vs loading every shard.

Generates (once, cached in --dir) a synthetic GLM-4.5-Air-shaped checkpoint in bf16 — dense layer 0, MoE layers
with routed + shared experts and a sigmoid router, an extra MTP layer, one shard per layer — then measures, each
in a fresh process so peak RSS is its own:

* lmsurgeon: ``Layout(open_model(dir)).norm(role, layer)`` for every norm (headers + norm tensors only);
* naive: read every shard into memory and deserialize it (``safetensors.torch.load(bytes)``, as ``torch.load``
  or a download-then-load script does), then pick the norm tensors. (``load_file`` alone would not be a fair
  naive way: it memory-maps, so untouched tensors are never read.)

Usage: python benchmarks/bench_io.py [--dir DIR] [--gb 2.0] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shapes import Glm4MoeShape  # noqa: E402  (benchmarks/ is not a package)

#: GLM-4.5-Air's layout at half its width and a fifth of its experts, so a 2 GB checkpoint has a dozen layers
SHAPE = Glm4MoeShape(
    n_layers=1,
    hidden=2048,
    heads=16,
    kv_heads=4,
    head_dim=128,
    experts=24,
    moe_inter=704,
    dense_inter=5632,
    vocab=32000,
)


def layer_bytes() -> int:
    """bf16 bytes of one MoE layer's matrices (attention, router, routed and shared experts)."""
    first_moe = SHAPE.first_dense
    return sum(2 * math.prod(s) for s in SHAPE.layer_shapes(first_moe).values() if len(s) > 1)


def config(n_layers: int) -> dict:
    return SHAPE.with_layers(n_layers).config()


def layer_tensors(i: int):
    import torch

    t = {}
    for name, dims in SHAPE.layer_shapes(i).items():
        if name.endswith("layernorm.weight"):
            t[name] = torch.randn(dims) * 0.1 + 1
        elif name.endswith("e_score_correction_bias"):
            t[name] = torch.zeros(dims)
        else:
            t[name] = torch.empty(dims)
    return {k: v.normal_(0, 0.02).to(torch.bfloat16) if v.ndim > 1 else v.to(torch.bfloat16) for k, v in t.items()}


def generate(folder: Path, gb: float) -> Path:
    """Write the checkpoint shard by shard (bounded memory); reuse it when its config already matches."""
    import torch
    from safetensors.torch import save_file

    n_layers = max(3, round(gb * 1e9 / layer_bytes()))
    cfg = config(n_layers)
    if (folder / "config.json").exists() and json.loads((folder / "config.json").read_text()) == cfg:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    weight_map = {}
    n_shards = n_layers + 2  # one per layer, the MTP layer, and embeddings + final norm + head

    def shard(k: int) -> dict:
        if k <= n_layers:  # k == n_layers is the MTP layer
            return layer_tensors(k)
        outside = SHAPE.outside_shapes()
        return {
            "model.embed_tokens.weight": torch.randn(outside["model.embed_tokens.weight"]).to(torch.bfloat16),
            "model.norm.weight": (torch.randn(outside["model.norm.weight"]) * 0.1 + 1).to(torch.bfloat16),
            "lm_head.weight": torch.randn(outside["lm_head.weight"]).to(torch.bfloat16),
        }

    for k in range(n_shards):  # one shard in memory at a time
        tensors = shard(k)
        fname = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, folder / fname)
        weight_map.update(dict.fromkeys(tensors, fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def worker(method: str, folder: Path) -> dict:
    """One measurement in this (fresh) process: time (imports excluded, both sides), bytes read, peak RSS."""
    import numpy as np
    from safetensors.torch import load

    from lmsurgeon.arch import Layout
    from lmsurgeon.io import open_model

    start = time.perf_counter()
    if method == "lmsurgeon":
        handle = open_model(folder)
        layout = Layout(handle)
        norms = {(r, i): layout.norm(r, i).gain for r, i in layout.norms_present()}
        bytes_read = handle.bytes_read
    else:
        norms, bytes_read = {}, 0
        for shard in sorted(folder.glob("*.safetensors")):
            tensors = load(shard.read_bytes())  # what every non-mmap loader (and a hub download) does
            bytes_read += shard.stat().st_size
            norms.update({k: v.float().numpy().astype(np.float64) for k, v in tensors.items() if "norm" in k})
            del tensors
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "seconds": seconds, "bytes_read": bytes_read, "peak_rss": rss, "n_norms": len(norms)}


def norm_and_header_bytes(folder: Path) -> int:
    from lmsurgeon.arch import Layout
    from lmsurgeon.io import open_model

    handle = open_model(folder)
    layout = Layout(handle)
    total = sum(handle.info(layout.name(r, i)).nbytes for r, i in layout.norms_present())
    for shard in set(handle.weight_map.values()):
        with open(folder / shard, "rb") as f:
            total += 8 + int.from_bytes(f.read(8), "little")
    return total


def measure(method: str, folder: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", method, "--dir", str(folder)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def generate_in_subprocess(folder: Path, gb: float) -> None:
    """Generate in a child, so this process stays small and its children's peak RSS is their own."""
    subprocess.run(
        [sys.executable, __file__, "--worker", "generate", "--dir", str(folder), "--gb", str(gb)], check=True
    )


def larger_than_memory(folder: Path) -> None:
    """The same extraction on a Llama-70B-shaped checkpoint larger than this machine's RAM (sparse files)."""
    import os

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.tiny_checkpoints import write_sparse_llama

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    layers = 16
    while (size := write_sparse_llama(folder, n_layers=layers)) <= ram:
        layers *= 2
    r = measure("lmsurgeon", folder)
    print(f"\nlarger than memory: {size / 2**30:.0f} GiB apparent ({layers} layers, sparse), RAM {ram / 2**30:.0f} GiB")
    print(
        f"lmsurgeon: {r['n_norms']} norms, {r['bytes_read']:,} bytes read, {r['seconds']:.3f} s, "
        f"peak RSS {r['peak_rss'] / 2**20:.0f} MiB (target < 1024); the naive way cannot run here"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path(".bench-cache/glm45-air-like"))
    ap.add_argument("--gb", type=float, default=2.0, help="approximate checkpoint size to generate")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--worker", choices=["lmsurgeon", "naive", "generate"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "generate":
        generate(args.dir, args.gb)
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.dir)))
        return
    generate_in_subprocess(args.dir, args.gb)
    folder = args.dir
    files = list(folder.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    floor = norm_and_header_bytes(folder)
    print(f"checkpoint: {folder} — {total / 1e9:.2f} GB in {len(files)} shards (bf16, GLM-4.5-Air-shaped)")
    print(f"norm tensors + headers: {floor:,} bytes\n")
    rows = {
        m: min((measure(m, folder) for _ in range(args.repeat)), key=lambda r: r["seconds"])
        for m in ("lmsurgeon", "naive")
    }
    assert rows["lmsurgeon"]["n_norms"] == rows["naive"]["n_norms"] - 2, "both must see the same norms"
    print(f"{'method':<12}{'bytes read':>16}{'seconds':>10}{'peak RSS MB':>13}  (page cache warm for both)")
    for m, r in rows.items():
        print(f"{m:<12}{r['bytes_read']:>16,}{r['seconds']:>10.4f}{r['peak_rss'] / 2**20:>13.0f}")
    lm, nv = rows["lmsurgeon"], rows["naive"]
    print(f"\nbytes read / (norms + headers): {lm['bytes_read'] / floor:.3f}  (target ≤ 1.05)")
    print(
        f"naive / lmsurgeon: time {nv['seconds'] / lm['seconds']:.0f}×  (target ≥ 100×), "
        f"bytes {nv['bytes_read'] / lm['bytes_read']:.0f}×, peak RSS {nv['peak_rss'] / lm['peak_rss']:.1f}×"
    )
    larger_than_memory(args.dir.parent / "sparse-llama")


if __name__ == "__main__":
    main()
