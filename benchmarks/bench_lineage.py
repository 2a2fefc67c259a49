"""Lineage benchmark: how well each statistic separates derived from independent pairs, and at what cost.

Pairs: every pair of the zoo (truth: same root in the manifest's ``parent`` chain) plus MiniLM and its
derived copies (fine-tuned, permuted, pruned; all derived), and the adversarial cases: zoo entries of kind
``adversarial`` (compared with the model they name, truth from the entry) and cases built here in memory from
the zoo's lineage root with ``lmsurgeon.zoo.launder`` (the full launder, and each transform alone, all derived)
and false accusations (an independent model with the root's norm gains, or its embedding and head, pasted in:
independent). All with default options.

Per statistic — naive raw cosine, naive Pearson, the weight-σ fingerprint, each sound test's z and the
verdict's decisive z — ROC AUC over the pairs where it applies, the weakest positive and the strongest negative.
Calibration: the one-sided p-values of every independent pair's z, per test, against the uniform distribution
(Kolmogorov–Smirnov; a z that is standard normal under independence gives uniform p). Verdict accuracy over all
pairs and over the adversarial cases. Per pair: seconds and bytes read. The peers, PyPI ``weightscope`` (its
lineage = fraction of unchanged weights) and ``cisco-ai-provenance-kit`` (``provenancekit compare``: its decision
and weight identity score), run on the same pairs from throwaway venvs given by ``--ws-python`` / ``--pk-python``.

    python benchmarks/bench_lineage.py [--profile test] [--weights-only] [--ws-python PATH/TO/ws_venv/bin/python]
        [--pk-python PATH/TO/pk_venv/bin/python]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import kstest, norm, rankdata

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


def zoo_adversarial(profile: str) -> list[tuple[str, str, str, bool]]:
    """(name, path, path of the model it is compared with, derived?) for every zoo entry of kind adversarial."""
    from lmsurgeon.zoo import ensure_zoo

    zoo_dir, manifest = ensure_zoo(profile)
    entries = manifest["models"]
    out = []
    for name, e in entries.items():
        if e.get("kind") != "adversarial":
            continue
        other = e.get("truth_relative_to")  # the truth is stated against this model (not its parent)
        truth = e.get("truth")
        if other not in entries or truth not in ("derived", "independent"):
            continue
        out.append(
            (name, str(Path(zoo_dir) / e["path"]), str(Path(zoo_dir) / entries[other]["path"]), truth == "derived")
        )
    return out


def built_adversarial(profile: str, folder: Path) -> list[tuple[str, str, str, bool]]:
    """Laundered copies of the zoo's lineage root and false accusations against it, written under ``folder``.

    Derived: the full launder (untie, fold, rotate, per-head maps, head and unit permutation, unit scaling,
    vocabulary permutation; function-preserving, no training) and each transform alone. Independent: an
    independent model of the same recipe with the root's norm gains pasted in, and one with its embedding and
    head pasted in.
    """
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from lmsurgeon.zoo import ensure_zoo, launder

    zoo_dir, manifest = ensure_zoo(profile)
    entries = manifest["models"]
    if "lin-base" not in entries or "lin-indep-1" not in entries:
        return []
    base_dir = Path(zoo_dir) / entries["lin-base"]["path"]
    indep_dir = Path(zoo_dir) / entries["lin-indep-1"]["path"]
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tok = Tokenizer.from_file(str(base_dir / "tokenizer.json"))

    def save(name, model, tokenizer=None):
        out = folder / name
        model.save_pretrained(out, safe_serialization=True)
        (tokenizer or tok).save(str(out / "tokenizer.json"))
        return str(out)

    cases = []
    laundered, new_tok, _ = launder.launder(base, seed=13, tokenizer=tok)
    cases.append(("laundered", save("laundered", laundered, new_tok), str(base_dir), True))
    folded = launder.fold_norm_gains(launder.untie_head(base)[0])[0]
    singles = {
        "rotated": launder.rotate_residual(folded, seed=1)[0],
        "qk-maps": launder.map_query_key(base, seed=2)[0],
        "vo-maps": launder.map_value_output(base, seed=3)[0],
        "heads-permuted": launder.permute_heads(base, seed=4)[0],
        "units-scaled": launder.scale_mlp_units(base, seed=5)[0] if launder.mlp_units_scale(base) else None,
    }
    for name, model in singles.items():
        if model is not None:
            cases.append((name, save(name, model), str(base_dir), True))
    vocab, step = launder.permute_vocabulary(launder.untie_head(base)[0], seed=6, n_tokens=tok.get_vocab_size())
    new = launder.permute_tokenizer(tok, step.truth["perm"])
    cases.append(("vocab-permuted", save("vocab-permuted", vocab, new), str(base_dir), True))
    for name, pattern in (("gains-pasted", "norm"), ("embedding-pasted", "embed_tokens|lm_head")):
        fake = AutoModelForCausalLM.from_pretrained(indep_dir).eval()
        donor = dict(base.named_parameters())
        with torch.no_grad():
            for n, p in fake.named_parameters():
                if re.search(pattern, n):
                    p.copy_(donor[n])
        cases.append(
            (name, save(name, fake, Tokenizer.from_file(str(indep_dir / "tokenizer.json"))), str(base_dir), False)
        )
    return cases


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


def provenancekit(py: str | None, a: str, b: str) -> dict:
    """The PyPI ``cisco-ai-provenance-kit`` peer: ``provenancekit compare A B --json`` from the venv of ``py`` (its
    wheel asks for Python 3.12 but runs on 3.11 when installed with ``--no-deps --ignore-requires-python`` beside
    its listed dependencies). Its decision, and its weight-level ``identity_score`` as the peer's statistic."""
    if py is None:
        return {"decision": "not run", "identity": None, "seconds": None}
    from lmsurgeon.io import minilm_path

    a, b = (str(minilm_path()) if x == "minilm" else x for x in (a, b))
    exe = str(Path(py).parent / "provenancekit")
    t0 = time.time()
    try:
        out = subprocess.run(
            [exe, "compare", a, b, "--json", "--no-cache"],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        body = json.loads(out.stdout[out.stdout.index("{") :])
        scores = body["scores"]
        return {
            "decision": scores.get("provenance_decision"),
            "identity": scores.get("identity_score"),
            "seconds": time.time() - t0,
        }
    except (subprocess.SubprocessError, json.JSONDecodeError, ValueError, KeyError) as e:
        return {"decision": "failed", "identity": None, "seconds": None, "error": str(e)[:200]}


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def pair_row(a: str, b: str, pa: str, pb: str, derived: bool, config, kind: str) -> dict:
    """One comparison with the benchmark's configuration: verdict, decisive z, every test's z, naive numbers."""
    from lmsurgeon.lineage import compare

    t0 = time.time()
    r = compare([pa, pb], config=config, write=False)
    p = r["pairs"][0]
    ws = p["naive"].get("weight_std") or {}
    row = {
        "a": a,
        "b": b,
        "kind": kind,
        "derived": derived,
        "verdict": p["verdict"],
        "decisive": p["decisive"]["z"],
        "decisive_test": p["decisive"]["test"],
        "strongest": p["strongest"]["z"],
        "evaded": p["evaded"],
        "suggested": p["suggested"],
        "alignment": p.get("alignment", {}).get("method"),
        "seconds": time.time() - t0,
        "bytes_read": sum(m["bytes_read"] for m in r["models"]),
        "raw_cosine": p["naive"]["mean_raw_cosine"],
        "pearson": p["naive"]["mean_pearson"],
        "weight_std": ws.get("fingerprint") if ws.get("applies") else None,
    }
    for t in p["tests"]:
        row[t["name"]] = t["z"] if t.get("applies") else None
    return row


def calibration(rows: list[dict], tests: tuple[str, ...]) -> list[dict]:
    """Per test, KS of the independents' one-sided p-values against uniform (z standard normal under the null)."""
    out = []
    for k in (*tests, "decisive"):
        z = np.array([r[k] for r in rows if not r["derived"] and r.get(k) is not None and np.isfinite(r[k])])
        if z.size < 3:
            continue
        ks = kstest(norm.sf(z), "uniform")
        out.append(
            {
                "test": k,
                "n": int(z.size),
                "ks": float(ks.statistic),
                "p": float(ks.pvalue),
                "mean_z": float(z.mean()),
                "std_z": float(z.std(ddof=1)),
                "max_z": float(z.max()),
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="test")
    ap.add_argument(
        "--weights-only", action="store_true", help="only the weight tests (awm, phi_u, circuits): no model is run"
    )
    ap.add_argument("--no-minilm", action="store_true", help="leave out MiniLM and its copies")
    ap.add_argument(
        "--adversarial-only", action="store_true", help="only the adversarial cases (not every pair of the zoo)"
    )
    ap.add_argument(
        "--ws-python", default=None, help="python of a throwaway venv with `pip install weightscope` (peer column)"
    )
    ap.add_argument(
        "--pk-python",
        default=None,
        help="python of a throwaway venv with cisco-ai-provenance-kit installed --no-deps (peer column)",
    )
    ap.add_argument("--json", default=None, help="write all rows to this file")
    args = ap.parse_args()
    from lmsurgeon.lineage import LineageConfig
    from lmsurgeon.lineage.config import ALL_TESTS

    ws_py = args.ws_python if args.ws_python and Path(args.ws_python).exists() else None
    if ws_py:
        ok = subprocess.run([ws_py, "-c", "import weightscope"], capture_output=True).returncode == 0
        ws_py = ws_py if ok else None
    if ws_py is None:
        print(
            "weightscope: not installed in --ws-python (pip install weightscope into a throwaway venv); "
            "peer column skipped"
        )
    pk_py = args.pk_python if args.pk_python and (Path(args.pk_python).parent / "provenancekit").exists() else None
    if pk_py is None:
        print("provenancekit: no --pk-python venv with cisco-ai-provenance-kit; peer column skipped")
    paths, roots = models(args.profile)
    if args.no_minilm:
        paths = {n: p for n, p in paths.items() if roots[n] != "minilm"}
    tests = ("awm", "phi_u", "circuits") if args.weights_only else tuple(ALL_TESTS)
    config = LineageConfig(tests=tests)  # every other option at its default (--align auto)
    rows = []
    scratch = tempfile.TemporaryDirectory()
    pairs = [
        (a, b, paths[a], paths[b], roots[a] == roots[b], "zoo") for a, b in itertools.combinations(sorted(paths), 2)
    ]
    if args.adversarial_only:
        pairs = []
    adversarial = zoo_adversarial(args.profile) + built_adversarial(args.profile, Path(scratch.name))
    pairs += [
        (name, Path(other).name, path, other, derived, "adversarial") for name, path, other, derived in adversarial
    ]
    for a, b, pa, pb, derived, kind in pairs:
        row = pair_row(a, b, pa, pb, derived, config, kind)
        ws = weightscope(ws_py, pa, pb)
        row["weightscope"] = ws.get("sparsity") if ws.get("verdict") not in ("failed", "not run") else None
        row["weightscope_verdict"], row["weightscope_seconds"] = ws.get("verdict"), ws.get("seconds")
        pk = provenancekit(pk_py, pa, pb)
        row["provenancekit"], row["provenancekit_decision"] = pk.get("identity"), pk.get("decision")
        row["provenancekit_seconds"] = pk.get("seconds")
        rows.append(row)
        print(
            f"{a:>16} {b:>16} truth={'derived' if derived else 'indep':7} -> {row['verdict']:12} "
            f"decisive={_fmt(row['decisive'])} ({row['decisive_test']}) "
            + " ".join(f"{k}={_fmt(row.get(k))}" for k in ("raw_cosine", "pearson", "weight_std", *tests))
            + (f" evaded={row['evaded']}" if row["evaded"] else "")
            + f" {row['seconds']:.1f}s {row['bytes_read'] / 1e6:.1f}MB",
            flush=True,
        )
    scratch.cleanup()
    print()
    stats = ("raw_cosine", "pearson", "weight_std", *tests, "decisive", "weightscope", "provenancekit")
    print(f"{'statistic':>12} | {'AUC':>6} | {'applies':>8} | {'weakest +':>10} | {'strongest -':>11}")
    for k in stats:
        pos = [r[k] for r in rows if r["derived"] and r.get(k) is not None and np.isfinite(r[k])]
        neg = [r[k] for r in rows if not r["derived"] and r.get(k) is not None and np.isfinite(r[k])]
        print(
            f"{k:>12} | {roc_auc(pos, neg):6.3f} | {len(pos) + len(neg):>3}/{len(rows):<4} | "
            f"{min(pos, default=float('nan')):10.4g} | {max(neg, default=float('nan')):11.4g}"
        )
    print("\ncalibration: one-sided p of the independents' z against uniform (KS)")
    print(f"{'test':>12} | {'n':>4} | {'KS D':>6} | {'KS p':>8} | {'mean z':>7} | {'std z':>6} | {'max z':>6}")
    for c in calibration(rows, tests):
        print(
            f"{c['test']:>12} | {c['n']:>4} | {c['ks']:6.3f} | {c['p']:8.2g} | {c['mean_z']:7.2f} | "
            f"{c['std_z']:6.2f} | {c['max_z']:6.2f}"
        )
    for label, subset in (("all pairs", rows), ("adversarial", [r for r in rows if r["kind"] == "adversarial"])):
        pos = [r for r in subset if r["derived"]]
        neg = [r for r in subset if not r["derived"]]
        right = sum(r["verdict"] == ("derived" if r["derived"] else "independent") for r in subset)
        print(
            f"\nverdict ({label}): {right}/{len(subset)} right; {sum(r['verdict'] == 'derived' for r in pos)}/"
            f"{len(pos)} derived pairs called derived, {sum(r['verdict'] == 'independent' for r in neg)}/{len(neg)} "
            f"independent pairs called independent, {sum(r['verdict'] == 'derived' for r in neg)} false accusations, "
            f"{sum(r['verdict'] == 'inconclusive' for r in subset)} inconclusive"
        )
    if ws_py:
        pos = [r for r in rows if r["derived"]]
        neg = [r for r in rows if not r["derived"]]
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
    if pk_py:
        pos = [r for r in rows if r["derived"]]
        neg = [r for r in rows if not r["derived"]]

        def match(r: dict) -> bool:
            return "Match" in str(r["provenancekit_decision"])

        pk_t = [r["provenancekit_seconds"] for r in rows if r["provenancekit_seconds"]]
        print(
            f"provenancekit: {sum(map(match, pos))}/{len(pos)} derived pairs called a match, "
            f"{sum(map(match, neg))}/{len(neg)} independent pairs called a match; seconds per pair median "
            f"{np.median(pk_t) if pk_t else float('nan'):.2f}"
        )
    print(
        f"seconds per pair (lmsurgeon): median {np.median([r['seconds'] for r in rows]):.2f}, "
        f"max {max(r['seconds'] for r in rows):.2f}; bytes read per pair: median "
        f"{np.median([r['bytes_read'] for r in rows]) / 1e6:.1f} MB, "
        f"max {max(r['bytes_read'] for r in rows) / 1e6:.1f} MB"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    main()
