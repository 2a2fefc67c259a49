"""Lineage benchmark: how well each statistic separates derived from independent pairs, and at what cost.

Pairs: every pair of the zoo (truth: same root in the manifest's ``parent`` chain) plus MiniLM and its
derived copies (fine-tuned, permuted, pruned; all derived). Per statistic — naive raw cosine, naive Pearson,
each sound test's z — ROC AUC over the pairs where it applies, the weakest positive and the strongest negative.
Per pair: seconds and bytes read. The peer baseline, PyPI ``weightscope`` (its lineage = fraction of unchanged
weights), runs on the same pairs from a throwaway venv given by ``--ws-python``.

    python benchmarks/bench_lineage.py [--profile test] [--act] [--ws-python PATH/TO/ws_venv/bin/python]
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import time
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

WS_SCRIPT = """
import json, sys, time
from weightscope.lineage import find_lineage
a, b = sys.argv[1], sys.argv[2]
t = time.time()
c = find_lineage(b, [a])[0]
print(json.dumps({"verdict": c.verdict, "sparsity": c.sparsity, "seconds": time.time() - t, "error": c.error}))
"""


def roc_auc(pos: list[float], neg: list[float]) -> float:
    """P(score_pos > score_neg) with ties counted ½ (Mann–Whitney U / (n₊n₋))."""
    if not pos or not neg:
        return float("nan")
    r = rankdata(np.r_[pos, neg])
    return float((r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def models(profile: str) -> tuple[dict[str, str], dict[str, str]]:
    """name → path, and name → lineage root (from the zoo manifest; MiniLM copies share the root "minilm")."""
    from lmsurgeon.demo.minilm import ensure_minilm_copies
    from lmsurgeon.zoo import ensure_zoo

    zoo_dir, manifest = ensure_zoo(profile)
    entries = manifest["models"]
    paths = {n: str(Path(zoo_dir) / e["path"]) for n, e in entries.items()}

    def root(n):
        while entries[n].get("parent") in entries:
            n = entries[n]["parent"]
        return n

    roots = {n: root(n) for n in entries}
    paths["minilm"], roots["minilm"] = "minilm", "minilm"
    for n, p in ensure_minilm_copies().items():
        paths[n], roots[n] = str(p), "minilm"
    return paths, roots


def weightscope(py: str | None, a: str, b: str) -> dict:
    if py is None:
        return {"verdict": "not run", "sparsity": None, "seconds": None}
    from lmsurgeon.io import minilm_path

    a, b = (str(minilm_path()) if x == "minilm" else x for x in (a, b))
    try:
        out = subprocess.run([py, "-c", WS_SCRIPT, a, b], capture_output=True, text=True, timeout=300, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, json.JSONDecodeError, IndexError) as e:
        return {"verdict": "failed", "sparsity": None, "seconds": None, "error": str(e)[:200]}


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="test")
    ap.add_argument(
        "--act", action="store_true", help="also run the activation tests phi_match and act_cka (load both models)"
    )
    ap.add_argument(
        "--ws-python", default=None, help="python of a throwaway venv with `pip install weightscope` (peer column)"
    )
    ap.add_argument("--json", default=None, help="write all rows to this file")
    args = ap.parse_args()
    from lmsurgeon.lineage import LineageConfig, compare

    ws_py = args.ws_python if args.ws_python and Path(args.ws_python).exists() else None
    if ws_py:
        ok = subprocess.run([ws_py, "-c", "import weightscope"], capture_output=True).returncode == 0
        ws_py = ws_py if ok else None
    if ws_py is None:
        print(
            "weightscope: not installed in --ws-python (pip install weightscope into a throwaway venv); "
            "peer column skipped"
        )
    paths, roots = models(args.profile)
    tests = ("awm", "phi_u") + (("phi_match", "act_cka") if args.act else ())
    config = LineageConfig(tests=tests)
    rows = []
    for a, b in itertools.combinations(sorted(paths), 2):
        t0 = time.time()
        r = compare([paths[a], paths[b]], config=config, write=False)
        p = r["pairs"][0]
        row = {
            "a": a,
            "b": b,
            "derived": roots[a] == roots[b],
            "verdict": p["verdict"],
            "seconds": time.time() - t0,
            "bytes_read": sum(m["bytes_read"] for m in r["models"]),
            "raw_cosine": p["naive"]["mean_raw_cosine"],
            "pearson": p["naive"]["mean_pearson"],
        }
        for t in p["tests"]:
            row[t["name"]] = t["z"] if t.get("applies") else None
        ws = weightscope(ws_py, paths[a], paths[b])
        row["weightscope"] = ws.get("sparsity") if ws.get("verdict") not in ("failed", "not run") else None
        row["weightscope_verdict"], row["weightscope_seconds"] = ws.get("verdict"), ws.get("seconds")
        rows.append(row)
        print(
            f"{a:>16} {b:>16} truth={'derived' if row['derived'] else 'indep':7} -> {row['verdict']:12} "
            + " ".join(f"{k}={_fmt(row.get(k))}" for k in ("raw_cosine", "pearson", *tests, "weightscope"))
            + f" {row['seconds']:.1f}s {row['bytes_read'] / 1e6:.1f}MB",
            flush=True,
        )
    print()
    print(f"{'statistic':>12} | {'AUC':>6} | {'applies':>8} | {'weakest +':>10} | {'strongest -':>11}")
    for k in ("raw_cosine", "pearson", *tests, "weightscope"):
        pos = [r[k] for r in rows if r["derived"] and r.get(k) is not None and np.isfinite(r[k])]
        neg = [r[k] for r in rows if not r["derived"] and r.get(k) is not None and np.isfinite(r[k])]
        print(
            f"{k:>12} | {roc_auc(pos, neg):6.3f} | {len(pos) + len(neg):>3}/{len(rows):<4} | "
            f"{min(pos, default=float('nan')):10.4g} | {max(neg, default=float('nan')):11.4g}"
        )
    pos = [r for r in rows if r["derived"]]
    neg = [r for r in rows if not r["derived"]]
    print(
        f"\nverdict: {sum(r['verdict'] == 'derived' for r in pos)}/{len(pos)} derived pairs called derived, "
        f"{sum(r['verdict'] == 'derived' for r in neg)}/{len(neg)} independent pairs called derived, "
        f"{sum(r['verdict'] == 'independent' for r in neg)}/{len(neg)} called independent"
    )
    if ws_py:
        wd = {"derived_from_base", "likely_descendant"}
        print(
            f"weightscope: {sum(r['weightscope_verdict'] in wd for r in pos)}/{len(pos)} derived pairs found, "
            f"{sum(r['weightscope_verdict'] in wd for r in neg)}/{len(neg)} independent pairs called descendants"
        )
        ws_t = [r["weightscope_seconds"] for r in rows if r["weightscope_seconds"]]
        print(
            f"seconds per pair: lmsurgeon median {np.median([r['seconds'] for r in rows]):.2f}, "
            f"weightscope median {np.median(ws_t) if ws_t else float('nan'):.2f}"
        )
    print(
        f"bytes read per pair (lmsurgeon): median {np.median([r['bytes_read'] for r in rows]) / 1e6:.1f} MB, "
        f"max {max(r['bytes_read'] for r in rows) / 1e6:.1f} MB"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    main()
