"""Layer streaming at GLM-4.5-Air's real width: wall time, peak RSS and bytes read, streamed vs whole model.

Builds (once, cached in --dir) checkpoints with GLM-4.5-Air's published shapes (hidden 4096, 96 query heads and
8 KV heads of 128, 128 routed experts of 1408 and a shared one, dense first layer, vocabulary 151552, untied
head, q/k/v biases), sharded into 5 GB files in storage order as the hub's copy is. The tensors a forward reads
get seeded random data: norms, attention, routers, shared experts, the dense MLP, the first --experts-filled
routed experts of each layer and the first --vocab-filled rows of the embedding and the head; every other
tensor is a sparse hole (zeros that take no disk), so each checkpoint has its real apparent size and a few GB of
disk. Then it measures, each in a fresh process so that peak RSS (VmHWM) is its own:

* ``stream``: ``StreamedModel(mode="stream").nll(items)`` (one block in memory at a time);
* ``plain``: ``StreamedModel(mode="plain").nll(items)`` (every weight loaded once), where the whole model fits
  in the memory available now, with the largest difference from the streamed per-token NLL.

Default: a 1-layer slice (the dense layer with the real embedding and head, streamed and plain) and an 8-layer
slice (dense + 7 MoE layers, 36 GB: streamed; plain where it fits), about ten minutes on 2 cores once built
(building the 8-layer checkpoint takes about as long again, once). ``--full`` adds the 46-layer model (about
220 GB apparent; its forward reads all of it, holes included).

Usage: python benchmarks/bench_scale.py [--dir DIR] [--layers 1 8] [--full] [--items 4] [--tokens 64]

``lineage`` mode: the weight tests (awm, φ_U) of ``lineage A B C`` over HTTP range reads, on synthetic twins of the
two disputed checkpoints (``_lineage_twins.py``: a GLM-4.5-Air-shaped model, a derivation of it, and an
independent Solar-Open-100B-shaped model) served by the loopback hub server of the tests. In a fresh process it
prints the verdicts, the bytes read per model (and as a fraction of the checkpoint, and per test), wall time and
VmHWM.

    python benchmarks/bench_scale.py lineage [--layers 3] [--full] [--experts-filled 8] [--tests awm,phi_u]
                                             [--max-memory 6GiB]

With an activation test in ``--tests`` (``phi_match``, ``act_cka``; both are in the default test list) the twins
also get data in what running a block reads (values, outputs, gates; built once more, in a ``-forward`` folder)
and the text is documents of random words of the twins' word-level vocabulary. ``--max-memory 6GiB`` makes a
slice stream block by block as the full checkpoints would on a 24 GiB machine.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shapes import (  # noqa: E402
    GLM45_AIR,
    SOLAR_OPEN_100B,
    Glm4MoeShape,
    apparent_bytes,
    build_once,
)

SEED = 0


def filler(shape: Glm4MoeShape, experts_filled: int, vocab_filled: int, seed: int = SEED):
    """Seeded values for the tensors a forward reads (see the module doc); None leaves a hole.

    Each tensor's values depend only on (seed, name), so a checkpoint can be rebuilt or extended reproducibly.
    """
    import zlib

    import numpy as np

    expert = re.compile(r"\.mlp\.experts\.(\d+)\.")

    def fill(name: str, dims: tuple[int, ...]):
        m = expert.search(name)
        if m and int(m.group(1)) >= experts_filled:
            return None
        if name.endswith("e_score_correction_bias"):
            return None  # zeros, as an untrained router's bias
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        if len(dims) == 1:
            return (
                (1 + 0.1 * rng.standard_normal(dims, dtype=np.float32))
                if "norm" in name
                else 0.02 * rng.standard_normal(dims, dtype=np.float32)
            )
        rows = min(dims[0], vocab_filled) if dims[0] == shape.vocab else dims[0]
        return 0.02 * rng.standard_normal((rows, *dims[1:]), dtype=np.float32)

    return fill


def build(folder: Path, shape: Glm4MoeShape, experts_filled: int, vocab_filled: int) -> Path:
    """Write the checkpoint unless ``folder`` already holds this exact one (same config and fill)."""
    stamp = {"config": shape.config(), "experts_filled": experts_filled, "vocab_filled": vocab_filled, "seed": SEED}
    return build_once(folder, shape, filler(shape, experts_filled, vocab_filled), stamp)


def _status_bytes(key: str) -> int:
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


class AnonPeak:
    """Peak anonymous memory (RssAnon, sampled every 50 ms): what the run allocated, without the pages of the
    memory-mapped shards the model handle keeps open, which VmHWM also counts (clean page cache the kernel can
    drop under pressure)."""

    def __init__(self):
        import threading

        self.peak = _status_bytes("RssAnon")
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            self.peak = max(self.peak, _status_bytes("RssAnon"))

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(self.peak, _status_bytes("RssAnon"))


def items(n_items: int, n_tokens: int, vocab_filled: int):
    import torch

    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, vocab_filled, (n_items, n_tokens), generator=g)


def worker(mode: str, folder: Path, n_items: int, n_tokens: int, vocab_filled: int, dtype: str, out: Path) -> dict:
    """One run in this (fresh) process: build the skeleton, embed, all blocks, head; time, bytes, peak RSS."""
    import torch

    from lmsurgeon.io import open_model
    from lmsurgeon.streaming import StreamedModel

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    anon = AnonPeak()
    ids = items(n_items, n_tokens, vocab_filled)
    start = time.perf_counter()
    handle = open_model(folder)
    model = StreamedModel(handle, mode=mode, dtype=getattr(torch, dtype), batch_size=n_items)
    nll = model.nll(ids)
    seconds = time.perf_counter() - start
    torch.save(nll, out)
    hwm = _status_bytes("VmHWM")
    return {
        "mode": mode,
        "seconds": seconds,
        "bytes_read": handle.bytes_read,
        "peak_rss": hwm,
        "peak_anon": anon.stop(),
        "largest_block": model.plan.largest_block,
        "weights": model.plan.total,
        "mean_nll": float(nll.nanmean()),
    }


def measure(mode: str, folder: Path, args) -> dict:
    out = folder / f"nll-{mode}.pt"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        mode,
        "--dir",
        str(folder),
        "--items",
        str(args.items),
        "--tokens",
        str(args.tokens),
        "--vocab-filled",
        str(args.vocab_filled),
        "--dtype",
        args.dtype,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{mode} run on {folder.name} failed:\n{p.stderr[-3000:]}")
    row = json.loads(p.stdout.strip().splitlines()[-1])
    row["nll_file"] = str(out)
    return row


def fits_in_memory(folder: Path, dtype: str) -> tuple[bool, str]:
    import torch

    from lmsurgeon.io import open_model
    from lmsurgeon.streaming import plan_memory

    plan = plan_memory(open_model(folder), getattr(torch, dtype))
    return not plan.stream, plan.describe()


# -- lineage over range reads -------------------------------------------------------------------------------
ACTIVATION_TESTS = ("phi_match", "act_cka")


def word_text(path: Path, vocab: int, documents: int = 48, words: int = 120, seed: int = SEED) -> Path:
    """Documents of random words ``w<i>`` of the twins' word-level vocabulary (what their tokenizers know), one
    blank line between documents, for the activation tests."""
    import numpy as np

    g = np.random.default_rng(seed)
    docs = [" ".join(f"w{i}" for i in g.integers(1, vocab, words)) for _ in range(documents)]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def lineage_worker(repos: list[str], tests: str, out: Path, max_memory: str | None, text: str | None) -> dict:
    """``compare`` of the hub ids ``repos`` in this (fresh) process; what results.json says, plus time and VmHWM."""
    import torch

    from lmsurgeon.lineage import compare

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    start = time.perf_counter()
    r = compare(repos, out=out, tests=tuple(tests.split(",")), overwrite=True, max_memory=max_memory, text=text)
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss": _status_bytes("VmHWM"),
        "verdicts": {f"{p['a']} vs {p['b']}": p["verdict"] for p in r["pairs"]},
        "z": {f"{p['a']} vs {p['b']}": {t["name"]: t.get("z") for t in p["tests"]} for p in r["pairs"]},
        "runs": {f"{p['a']} vs {p['b']}": {t["name"]: t["run"] for t in p["tests"] if "run" in t} for p in r["pairs"]},
        "no_z": {
            f"{p['a']} vs {p['b']}": {t["name"]: t.get("reason") for t in p["tests"] if t.get("z") is None}
            for p in r["pairs"]
        },
        "timings": r.get("timings"),
        "models": [
            {"name": m["name"], "bytes_read": m["bytes_read"], "tensor_bytes": m["tensor_bytes"]} for m in r["models"]
        ],
    }


def lineage_bench(args) -> None:
    """Build the twins, serve them over loopback HTTP and run ``lineage`` on them in a fresh process."""
    import os
    import shutil
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _lineage_twins import build_twins
    from tests.hubserver import HubServer

    layers = "full" if args.full else args.layers[0]
    glm = GLM45_AIR if args.full else GLM45_AIR.with_layers(layers, mtp_layers=0)
    solar = SOLAR_OPEN_100B if args.full else SOLAR_OPEN_100B.with_layers(layers)
    forward = any(t in ACTIVATION_TESTS for t in args.tests.split(","))  # the blocks run: fill what they read
    root = args.dir / f"lineage-{layers}l{'-forward' if forward else ''}"
    folders = build_twins(root, glm, solar, args.experts_filled, forward)
    repos = {f"bench/{k}": v for k, v in folders.items()}
    cache = Path(tempfile.mkdtemp(prefix="bench-scale-ranges-"))
    try:
        with HubServer(repos) as server:
            env = {**os.environ, "HF_ENDPOINT": server.endpoint, "HF_HUB_OFFLINE": "0", "LMSURGEON_CACHE": str(cache)}
            cmd = [sys.executable, __file__, "--lineage-worker", ",".join(repos), "--tests", args.tests]
            cmd += ["--dir", str(cache / "run")]
            if args.max_memory:
                cmd += ["--max-memory", args.max_memory]
            if forward:
                cmd += ["--text", str(word_text(cache / "words.txt", min(glm.vocab, solar.vocab)))]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise SystemExit(f"lineage run failed:\n{p.stderr[-3000:]}")
        row = json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    sizes = {f"bench/{k}": apparent_bytes(v) for k, v in folders.items()}
    print(
        f"lineage over HTTP range reads, tests {args.tests}, {layers} layers, "
        f"{args.experts_filled} routed experts filled per layer\n"
    )
    for pair, label in row["verdicts"].items():
        print(f"{pair:<45} {label:<12} z: {row['z'][pair]}")
        for test, run in row["runs"][pair].items():
            print(f"{'':<45} {test}: {run}")
        for test, reason in row["no_z"][pair].items():
            print(f"{'':<45} {test}: no z ({reason})")
    print(f"\n{'model':<22}{'apparent GB':>12}{'read GB':>9}{'fraction':>10}  per test (MB)")
    for m in row["models"]:
        size = sizes[m["name"]] if m["name"] in sizes else sizes[f"bench/{m['name']}"]
        per = ", ".join(f"{k} {v / 1e6:.0f}" for k, v in m["tensor_bytes"].items())
        print(f"{m['name']:<22}{size / 1e9:>12.1f}{m['bytes_read'] / 1e9:>9.2f}{m['bytes_read'] / size:>10.2%}  {per}")
    print(f"\nwall {row['seconds'] / 60:.1f} min, VmHWM {row['peak_rss'] / 2**30:.2f} GiB")
    print(f"stage timings: {row['timings']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="stream", choices=["stream", "lineage"])
    ap.add_argument("--tests", default="awm,phi_u", help="lineage mode: the tests to run")
    ap.add_argument("--lineage-worker", help=argparse.SUPPRESS)
    ap.add_argument("--max-memory", help="lineage mode: the activation tests' memory budget (e.g. 6GiB)")
    ap.add_argument("--text", help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, default=Path(".bench-cache/scale"))
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 8], help="slices of the real depth to measure")
    ap.add_argument("--full", action="store_true", help="also the full 46-layer model (+ MTP layer), streamed")
    ap.add_argument("--items", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--experts-filled", type=int, default=8, help="routed experts per layer with data")
    ap.add_argument("--vocab-filled", type=int, default=32768, help="embedding/head rows with data")
    ap.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype (the checkpoint is bf16)"
    )
    ap.add_argument("--worker", choices=["stream", "plain"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lineage_worker:
        print(
            json.dumps(lineage_worker(args.lineage_worker.split(","), args.tests, args.dir, args.max_memory, args.text))
        )
        return
    if args.mode == "lineage":
        lineage_bench(args)
        return
    if args.worker:
        row = worker(
            args.worker,
            args.dir,
            args.items,
            args.tokens,
            args.vocab_filled,
            args.dtype,
            args.dir / f"nll-{args.worker}.pt",
        )
        print(json.dumps(row))
        return

    import torch

    models = [(f"{n} layers", GLM45_AIR.with_layers(n, mtp_layers=0)) for n in args.layers]
    if args.full:
        models.append(("46 layers + MTP", GLM45_AIR))
    print(
        f"GLM-4.5-Air shapes, bf16 checkpoints; {args.items} items × {args.tokens} tokens, compute {args.dtype}, "
        f"{torch.get_num_threads()} threads\n",
        flush=True,
    )
    header = (
        f"{'model':<18}{'path':<8}{'apparent GB':>12}{'read GB':>9}{'seconds':>9}{'VmHWM GiB':>11}"
        f"{'anon GiB':>10}{'stage GiB':>11}{'mean NLL':>10}{'max |Δ NLL|':>13}"
    )
    table = []
    for label, shape in models:
        folder = build(args.dir / f"glm45-air-{shape.n_layers}l", shape, args.experts_filled, args.vocab_filled)
        stream = measure("stream", folder, args)
        rows = [(label, "stream", folder, stream, "")]
        fits, why = fits_in_memory(folder, args.dtype)
        if fits:
            plain = measure("plain", folder, args)
            diff = (torch.load(stream["nll_file"]) - torch.load(plain["nll_file"])).abs().nan_to_num().max()
            rows.append((label, "plain", folder, plain, f"{float(diff):.2e}"))
        else:
            rows.append((label, "plain", folder, None, why))
        table += rows
        for row in rows:  # print as they come: the large runs take minutes
            print(format_row(*row, header=header if len(table) == len(rows) and row is rows[0] else None), flush=True)
    print(
        "\nVmHWM: peak RSS of the whole process (python, torch, transformers: about 0.5 GiB before any weight), "
        "including the pages of memory-mapped shards it read;\nanon: peak anonymous memory (what the run "
        "allocated); stage: the largest block, or embedding + head, in the compute dtype"
    )


def format_row(label: str, path: str, folder: Path, r: dict | None, note: str, header: str | None = None) -> str:
    lead = (header + "\n") if header else ""
    size = apparent_bytes(folder) / 1e9
    if r is None:
        return f"{lead}{label:<18}{path:<8}{size:>12.1f}  not run — {note}"
    return (
        f"{lead}{label:<18}{path:<8}{size:>12.1f}{r['bytes_read'] / 1e9:>9.1f}{r['seconds']:>9.1f}"
        f"{r['peak_rss'] / 2**30:>11.2f}{r['peak_anon'] / 2**30:>10.2f}{r['largest_block'] / 2**30:>11.2f}"
        f"{r['mean_nll']:>10.4f}{note:>13}"
    )


if __name__ == "__main__":
    main()
