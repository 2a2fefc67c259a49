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

``swap`` and ``merge`` modes: the capabilities that run a model, on a GLM-4.5-Air-shaped twin cut to ``--layers``
(default 8: the dense layer and 7 MoE layers, 36 GB apparent) with data in everything a forward pass reads, the
LM head included (``_lineage_twins.build_forward_model``; built once, ~5 min, 6.7 GB of disk), read from the local
folder. Each run is a fresh process that prints wall time, VmHWM, the bytes read per model and the peak RSS of
each stage of the run (stage lines and streamed loads, sampled every 0.1 s), so the place of the peak is known.
Then the same run on the 2-layer twin (7.7 GB, which fits) streamed and in memory, and the largest difference of
their numbers.

    python benchmarks/bench_scale.py swap [--layers 8] [--max-memory 6GiB] [--swap-tokens 480]
    python benchmarks/bench_scale.py merge [--layers 2] [--max-memory 6GiB]
    python benchmarks/bench_scale.py save [--layers 4] [--max-memory 6GiB]

``swap``: ``analyze`` in bf16, forced ``--streaming stream`` within ``--max-memory`` (default 6GiB), on
``--swap-tokens`` fit and as many eval tokens of random words (rows of 128); prints δ, r and Δloss per pair.
At width 4096 the per-layer float64 d × d work (normal equations, A_i, Trans/Dep) costs as much as the blocks:
at 8 layers the eval pass ended after 14 min (30 block loads) and the tables' full SVDs took over 5 min more,
so the 8-layer default takes over 20 min on 2 shared cores; ``--layers 4`` halves it.
``merge``: a 2-trial ``run_merge`` into the twin (bf16, streamed) from a donor with Solar-Open-100B's width,
heads and expert width but one layer of 8 experts and a 32,768-word vocabulary, on 8 documents of 120 words per
text and at most 4,096 shared tokens. Default 2 layers: a merge streams the whole base for each of its ~20
evaluations: measured 18 min streamed (8 of them in the OMP baseline, since made cheaper) and 10 min in
memory at 2 layers, about an hour streamed at 8, on 2 shared cores. It prints bits per byte of the base,
donor, baselines and best trial and each trial's relative perplexity and symmetric KL. The donor is small
because the merge reads only its embedding and head, which with the real vocabulary are 2 × 3.2 GB in float32
(see docs/scale.md), and its own bits-per-byte pass runs it in float32. The merged checkpoint is not written
(``_save_models`` is stubbed in the worker): with a streamed base that writes every shard, 36 GB at 8 layers.
``save`` measures that write alone: the twin streamed, written with ``StreamedLM.save_pretrained`` (one output
shard of at most 1 GiB at a time), time, VmHWM, and every tensor compared with the source bit for bit.

The swap and merge workers log their stage lines and loads with RSS as they come (``<run>.log``), write the
Python stack there at every new 2 GiB of RSS from 6 GiB, and stop themselves past 18 GiB (a shared machine).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import replace
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


# -- swap and merge on a model larger than the memory budget ---------------------------------------------------
#: the merge's donor: Solar-Open-100B's width, heads and expert width, one layer of 8 experts and a 32,768-word
#: vocabulary (see merge_bench for why not the real 196,608)
MERGE_DONOR = replace(SOLAR_OPEN_100B.with_layers(1), experts=8, vocab=32768)


#: shared tokens the merge aligns on (--max-shared): at width 4096 its float64 Procrustes fits cost n·d² each,
#: minutes for the default 50,000 on 2 shared cores and seconds for this many
MERGE_SHARED = 4096


def forward_model(args, name: str, layers: int) -> Path:
    """``glm-a`` (GLM-4.5-Air's shapes, seed 0) cut to ``layers``, or the merge's donor, with data in everything a
    forward pass reads, LM head included (built once, cached under ``--dir``)."""
    from _lineage_twins import build_forward_model

    if name == "glm-a":
        return build_forward_model(
            args.dir / f"forward-{layers}l" / name,
            GLM45_AIR.with_layers(layers, mtp_layers=0),
            0,
            args.experts_filled,
        )
    return build_forward_model(args.dir / "forward-1l-donor" / "solar-v32k", MERGE_DONOR, 7, args.experts_filled)


#: RSS at which a worker's stack is first written to its log, and past which the worker stops itself
DUMP_FROM, RSS_CAP = 6 * 2**30, 18 * 2**30


class Timeline:
    """Resident memory (VmRSS) sampled every 0.1 s, with the run's stage lines and every block load, so a peak is
    placed in the stage that made it; and the largest weight set a streamed model held."""

    def __init__(self, log: Path):
        import faulthandler
        import signal
        import threading

        self.log = log.open("w", buffering=1)  # the stage lines as they come, to follow a run that takes minutes
        faulthandler.register(signal.SIGUSR1, file=self.log, all_threads=True)  # kill -USR1: where it is now
        self.start = time.perf_counter()
        self.events: list[tuple[float, str]] = [(0.0, "start")]
        self.samples: list[tuple[float, int]] = []
        self.most_resident = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import faulthandler
        import os

        dump_at = DUMP_FROM
        while not self._done.wait(0.1):
            rss = _status_bytes("VmRSS")
            self.samples.append((time.perf_counter() - self.start, rss))
            if rss >= dump_at or rss >= RSS_CAP:  # where the memory goes: the stack at each new 2 GiB of RSS
                self.log.write(f"{self.samples[-1][0]:8.1f} s  RSS {rss / 2**30:.2f} GiB reached here:\n")
                faulthandler.dump_traceback(self.log, all_threads=True)
                dump_at = rss + 2 * 2**30
            if rss >= RSS_CAP:  # the machine is shared: stop before the kernel's OOM killer picks a process
                self.log.write(f"stopped: RSS over {RSS_CAP / 2**30:.0f} GiB\n")
                os._exit(3)

    def event(self, label: str) -> None:
        self.events.append((time.perf_counter() - self.start, label))
        self.log.write(f"{self.events[-1][0]:8.1f} s  {_status_bytes('VmRSS') / 2**30:6.2f} GiB  {label}\n")

    def stop(self) -> list[dict]:
        """Per event: its time, label and the peak RSS until the next event (consecutive block loads merged)."""
        self._done.set()
        self._thread.join()
        ends = [t for t, _ in self.events[1:]] + [float("inf")]
        rows: list[dict] = []
        for (t, label), end in zip(self.events, ends, strict=True):
            peak = max((r for s, r in self.samples if t <= s < end), default=0)
            if rows and label.startswith("block ") and rows[-1]["label"].startswith("block "):
                rows[-1]["peak"] = max(rows[-1]["peak"], peak)
                rows[-1]["n"] += 1
                continue
            rows.append({"t": t, "label": label, "peak": peak, "n": 1})
        return rows


def instrument(timeline: Timeline) -> list:
    """Hook the run before the capability is imported: stage lines and streamed loads go to ``timeline``; every
    opened model handle is collected (its ``bytes_read`` counts what the run read). Benchmark-only patches."""
    from lmsurgeon.io import model as io_model
    from lmsurgeon.report import progress
    from lmsurgeon.streaming import model as streamed

    handles: list = []
    stage, init, load = progress.stage, io_model.ModelHandle.__init__, streamed.StreamedModel.load

    def traced_stage(message: str) -> None:
        timeline.event(message)
        stage(message)

    def traced_init(self, store) -> None:
        init(self, store)
        handles.append(self)

    def traced_load(self, stages) -> None:
        load(self, stages)
        if not stages:
            return
        resident = self.resident_bytes()
        timeline.most_resident = max(timeline.most_resident, resident)
        what = "block " if all(isinstance(s, int) for s in stages) else ""
        timeline.event(f"{what}load {list(stages)} of {self.handle.name}: weights resident {resident / 2**30:.2f} GiB")

    progress.stage, io_model.ModelHandle.__init__, streamed.StreamedModel.load = traced_stage, traced_init, traced_load
    return handles


def run_row(timeline: Timeline, handles: list, start: float) -> dict:
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss": _status_bytes("VmHWM"),
        "bytes_read": {h.name: h.bytes_read for h in handles},
        "most_resident": timeline.most_resident,
        "timeline": timeline.stop(),
    }


def swap_worker(folder: str, text: str, streaming: str, max_memory: str | None, tokens: int, out: Path) -> dict:
    """``swap`` of ``folder`` in this (fresh) process; the numbers the in-memory comparison needs, time, memory."""
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    timeline = Timeline(Path(f"{out}.log"))
    handles = instrument(timeline)
    from lmsurgeon.swap import analyze

    start = time.perf_counter()
    r = analyze(
        folder,
        out=out,
        overwrite=True,
        data=text,
        tokens=tokens,
        fit_tokens=tokens,
        seq_len=128,
        dtype="bfloat16",
        streaming=streaming,
        max_memory=max_memory,
        bootstrap=200,
    )
    row = run_row(timeline, handles, start)
    keys = ("delta", "delta_linear", "r", "trans_i", "dep_ij", "dep_ji", "dloss", "kl")
    row.update(
        {
            "streamed": r["model"]["streaming"]["streamed"],
            "block_loads": r["model"]["streaming"].get("block_loads"),
            "memory": r["model"]["streaming"]["memory"],
            "timings": r["timings"],
            "pairs": [{k: p[k] for k in keys} for p in r["pairs"]],
            "layers": [{k: x[k] for k in ("trans", "r2_fit", "bi", "dloss_drop", "kl_drop")} for x in r["layers"]],
            "loss": r["loss"],
            "spearman": {k: v.get("rho") if isinstance(v, dict) else v for k, v in r["spearman"].items()},
        }
    )
    return row


def merge_worker(base: str, donor: str, texts: str, streaming: str, max_memory: str | None, out: Path) -> dict:
    """A 2-trial ``merge`` in this (fresh) process: the guard's numbers (bits per byte, relative perplexity and
    symmetric KL of each trial), time, memory. The merged checkpoint is not written (see merge_bench)."""
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    timeline = Timeline(Path(f"{out}.log"))
    handles = instrument(timeline)
    from lmsurgeon.merge import run as merge_run

    merge_run._save_models = lambda *a, **k: None  # writing a 36 GB checkpoint is not what is measured here
    search, heldout, general = texts.split(",")
    start = time.perf_counter()
    r = merge_run.run_merge(
        base,
        donor,
        out,
        trials=2,
        dtype="bf16",
        streaming=streaming,
        max_memory=max_memory,
        prompts_file=search,
        eval_file=heldout,
        general_file=general,
        max_prompts=8,
        max_length=128,
        max_shared=MERGE_SHARED,
    )
    row = run_row(timeline, handles, start)
    trials = [json.loads(f.read_text()) for f in sorted((Path(out) / "stats").glob("trial_*.json"))]
    bpb = r["bpb"]
    row.update(
        {
            "streamed": r["streamed"],
            "base_ppl": r["base_ppl"],
            "bpb": {
                "base": {k: bpb["base"][k] for k in ("search", "heldout", "general")},
                "donor": {k: bpb["donor"][k] for k in ("search", "heldout", "general")},
                **{b["name"]: {k: b[k] for k in ("search", "heldout", "general")} for b in bpb["baselines"][1:]},
                **(
                    {"best trial": {k: bpb["best_trial"][k] for k in ("search", "heldout", "general", "heldout_r")}}
                    if bpb["best_trial"]
                    else {}
                ),
            },
            "trials": [
                {"number": t["number"], **{k: t.get(k) for k in ("r", "sym_kl", "ppl", "a_r", "b_r")}} for t in trials
            ],
            "trial_stats": trials,
        }
    )
    return row


def save_worker(base: str, max_memory: str | None, out: Path) -> dict:
    """What a streamed merge does to write its model, in this (fresh) process: the base streamed (bf16) within
    ``max_memory``, written with its resident embedding and head as the merged rows; then every tensor compared
    with the source, bit for bit."""
    import shutil

    import torch

    from lmsurgeon.io import open_model
    from lmsurgeon.merge.streamed import StreamedLM

    handle = open_model(base)
    lm = StreamedLM(handle, dtype=torch.bfloat16, device="cpu", batch_size=8, max_memory=max_memory)
    names = lm.parameter_names()
    rows = {names["embed"]: lm.get_input_embeddings().weight}
    if "lm_head" in names:
        rows[names["lm_head"]] = lm.get_output_embeddings().weight
    start = time.perf_counter()
    lm.save_pretrained(out, rows)
    seconds, peak = time.perf_counter() - start, _status_bytes("VmHWM")
    written = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    files = len(list(Path(out).glob("*.safetensors")))
    del lm, rows
    copy = open_model(out)
    same = sorted(copy.names()) == sorted(handle.names()) and all(
        torch.equal(copy.stored_tensor(n), handle.stored_tensor(n)) for n in handle.names()
    )
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "peak_rss": peak, "bytes_written": written, "files": files, "bit_exact": same}


def save_bench(args) -> None:
    """The merge's save of a streamed base (``--layers``-layer GLM twin) under ``--max-memory``: time, VmHWM,
    bytes written, and whether every tensor came back bit for bit. Needs the twin's size free on disk."""
    import shutil
    import tempfile

    layers = args.layers[0] if args.layers else 4
    big = forward_model(args, "glm-a", layers)
    work = Path(tempfile.mkdtemp(prefix="bench-scale-save-"))
    try:
        row = fresh("--save-worker", [str(big), "--dir", str(work / "out"), "--max-memory", args.max_memory])
        print(
            f"{layers} layers ({apparent_bytes(big) / 1e9:.1f} GB apparent), streamed merge save within "
            f"{args.max_memory}: wrote {row['bytes_written'] / 1e9:.1f} GB in {row['files']} shards, "
            f"{row['seconds']:.0f} s, VmHWM {row['peak_rss'] / 2**30:.2f} GiB; every tensor bit for bit: "
            f"{row['bit_exact']}",
            flush=True,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fresh(flag: str, payload: list[str], env: dict | None = None) -> dict:
    """Run this file's ``flag`` worker in a fresh process (its own VmHWM); its last stdout line is the JSON row."""
    cmd = [sys.executable, __file__, flag, *payload]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        log = Path(f"{payload[payload.index('--dir') + 1]}.log")
        tail = log.read_text()[-6000:] if log.exists() else ""
        raise SystemExit(f"{flag} run failed (exit {p.returncode}):\n{p.stderr[-3000:]}\nits log:\n{tail}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def largest_difference(a, b, path: str = "") -> tuple[float, float, str]:
    """(largest |a − b|, largest |a − b| / max(|a|, |b|), where) over every number of two equal-shaped records."""
    if isinstance(a, dict):
        rows = [largest_difference(a[k], b[k], f"{path}.{k}") for k in a if k in b]
    elif isinstance(a, list):
        rows = [largest_difference(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True))]
    elif isinstance(a, int | float) and not isinstance(a, bool) and b is not None:
        gap = abs(a - b)
        return gap, gap / max(abs(a), abs(b), 1e-300), path
    else:
        rows = []
    rows = [r for r in rows if r[0] == r[0]]  # NaN (no Spearman over one pair) is equal to itself
    if not rows:
        return 0.0, 0.0, path
    return max(r[0] for r in rows), max(r[1] for r in rows), max(rows, key=lambda r: r[1])[2]


def print_memory(row: dict) -> None:
    """Wall time, VmHWM, bytes read, and the peak RSS of each stage of the run."""
    read = ", ".join(f"{Path(k).name} {v / 1e9:.2f} GB" for k, v in row["bytes_read"].items())
    print(
        f"wall {row['seconds'] / 60:.1f} min, VmHWM {row['peak_rss'] / 2**30:.2f} GiB, read: {read}; "
        f"largest weight set resident at once {row['most_resident'] / 2**30:.2f} GiB"
    )
    print("  peak RSS by stage (GiB):")
    for e in row["timeline"]:
        times = f" ×{e['n']}" if e["n"] > 1 else ""
        print(f"  {e['t']:7.1f} s  {e['peak'] / 2**30:6.2f}  {e['label'][:110]}{times}")


def swap_bench(args) -> None:
    """Swap on the ``--layers``-layer GLM twin streamed under ``--max-memory``; then streamed vs in memory on the
    2-layer twin, which fits."""
    import shutil
    import tempfile

    layers = args.layers[0] if args.layers else 8
    big, small = forward_model(args, "glm-a", layers), forward_model(args, "glm-a", 2)
    work = Path(tempfile.mkdtemp(prefix="bench-scale-swap-"))
    try:
        text = word_text(work / "words.txt", GLM45_AIR.vocab, documents=2 * (args.swap_tokens // 120 + 1))
        common = [str(text), "--tokens", str(args.swap_tokens), "--dir"]

        def run(folder: Path, mode: str, budget: str | None) -> dict:
            payload = [str(folder), mode, *common, str(work / f"{folder.parent.name}-{mode}")]
            return fresh("--swap-worker", payload + (["--max-memory", budget] if budget else []))

        print(
            f"swap of the GLM-4.5-Air-shaped twin (local folder, bf16 compute), {args.swap_tokens} fit and "
            f"{args.swap_tokens} eval tokens of random words, 128 per row\n",
            flush=True,
        )
        row = run(big, "stream", args.max_memory)
        print(f"{layers} layers ({apparent_bytes(big) / 1e9:.1f} GB apparent), streamed within {args.max_memory}")
        print(f"  {row['memory']}; block loads {row['block_loads']}; stage seconds {row['timings']}")
        print_memory(row)
        print(f"  per pair (δ, r, Δloss): {[(p['delta'], p['r'], p['dloss']) for p in row['pairs']]}")
        print(f"  Spearman ρ: {row['spearman']}\n", flush=True)
        if not args.no_compare:
            streamed_vs_plain(
                run,
                row,
                layers,
                small,
                args.max_memory,
                ("pairs", "layers", "loss"),
                lambda r: f"δ, r, Δloss {[(p['delta'], p['r'], p['dloss']) for p in r['pairs']]}",
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def streamed_vs_plain(
    run, row: dict, layers: int, small: Path, max_memory: str, numbers: tuple[str, ...], show
) -> None:
    """The 2-layer twin streamed (``row`` itself when the main run was that twin) and in memory; prints their
    time and VmHWM, the largest difference of ``numbers`` between them, and ``show(run)`` of each."""
    stream = row if layers == 2 else run(small, "stream", max_memory)
    plain = run(small, "plain", None)
    for label, r in (("streamed", stream), ("in memory", plain)):
        print(f"2 layers, {label}: wall {r['seconds'] / 60:.1f} min, VmHWM {r['peak_rss'] / 2**30:.2f} GiB")
    gap, rel, where = largest_difference({k: stream[k] for k in numbers}, {k: plain[k] for k in numbers})
    print(f"  largest difference streamed vs in memory: {gap:.3g} absolute, {rel:.3g} relative (at {where})")
    print(f"  {show(stream)} streamed")
    print(f"  {show(plain)} in memory")


def merge_bench(args) -> None:
    """A 2-trial merge into the ``--layers``-layer GLM twin streamed under ``--max-memory``, then the same on the
    2-layer twin streamed and in memory."""
    import shutil
    import tempfile

    layers = args.layers[0] if args.layers else 2  # ~20 streamed evaluations: ~1 h at 8 layers on 2 cores
    big, small = forward_model(args, "glm-a", layers), forward_model(args, "glm-a", 2)
    donor = forward_model(args, "donor", 1)
    work = Path(tempfile.mkdtemp(prefix="bench-scale-merge-"))
    try:
        texts = ",".join(
            str(word_text(work / f"{name}.txt", MERGE_DONOR.vocab, documents=8, seed=SEED + 1 + k))
            for k, name in enumerate(("search", "heldout", "general"))
        )

        def run(folder: Path, mode: str, budget: str | None) -> dict:
            payload = [str(folder), str(donor), texts, mode, "--dir", str(work / f"{folder.parent.name}-{mode}")]
            return fresh("--merge-worker", payload + (["--max-memory", budget] if budget else []))

        print(
            "2-trial merge: base the GLM-4.5-Air-shaped twin (local folder, bf16), donor Solar-Open-100B's width "
            f"with {MERGE_DONOR.vocab} words, 1 layer of {MERGE_DONOR.experts} experts; 8 documents of 120 random "
            "words per text\n",
            flush=True,
        )
        row = run(big, "stream", args.max_memory)
        print(f"{layers} layers ({apparent_bytes(big) / 1e9:.1f} GB apparent), streamed within {args.max_memory}")
        print_memory(row)
        print(f"  bits per byte: {json.dumps(row['bpb'])}")
        print(f"  trials: {row['trials']}\n", flush=True)
        if not args.no_compare:
            streamed_vs_plain(
                run,
                row,
                layers,
                small,
                args.max_memory,
                ("bpb", "trials", "base_ppl"),
                lambda r: f"bits per byte {json.dumps(r['bpb'])}",
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="stream", choices=["stream", "lineage", "swap", "merge", "save"])
    ap.add_argument("--tests", default="awm,phi_u", help="lineage mode: the tests to run")
    ap.add_argument("--lineage-worker", help=argparse.SUPPRESS)
    ap.add_argument("--swap-worker", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--merge-worker", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--save-worker", help=argparse.SUPPRESS)
    ap.add_argument(
        "--no-compare", action="store_true", help="swap/merge: skip the 2-layer streamed vs in-memory comparison"
    )
    ap.add_argument("--swap-tokens", type=int, default=480, help="swap mode: fit and eval tokens each")
    ap.add_argument(
        "--max-memory", help="lineage, swap, merge: the memory budget (e.g. 6GiB; swap and merge default 6GiB)"
    )
    ap.add_argument("--text", help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, default=Path(".bench-cache/scale"))
    ap.add_argument(
        "--layers", type=int, nargs="+", help="slices of the real depth to measure [stream: 1 8; swap: 8; merge: 2]"
    )
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
    if args.swap_worker:
        folder, mode, text = args.swap_worker
        print(json.dumps(swap_worker(folder, text, mode, args.max_memory, args.tokens, args.dir)))
        return
    if args.merge_worker:
        base, donor, texts, mode = args.merge_worker
        print(json.dumps(merge_worker(base, donor, texts, mode, args.max_memory, args.dir)))
        return
    if args.save_worker:
        print(json.dumps(save_worker(args.save_worker, args.max_memory, args.dir)))
        return
    if args.mode in ("swap", "merge", "save"):
        args.max_memory = args.max_memory or "6GiB"
        {"swap": swap_bench, "merge": merge_bench, "save": save_bench}[args.mode](args)
        return
    args.layers = args.layers or [1, 8]
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
