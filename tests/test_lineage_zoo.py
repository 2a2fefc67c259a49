"""Validation on the zoo: every lin-* pair gets the verdict its manifest lineage implies."""

from __future__ import annotations

from pathlib import Path

from lmsurgeon.lineage import compare

LIN = ["lin-base", "lin-finetune", "lin-permuted", "lin-pruned", "lin-gammafold", "lin-indep-1", "lin-indep-2",
       "lin-indep-3"]


def _root(entries, n):
    while entries[n].get("parent") in entries:
        n = entries[n]["parent"]
    return n


def test_zoo_lineage_pairs_get_the_verdict_of_their_manifest_lineage(test_zoo):
    zoo_dir, manifest = test_zoo
    entries = manifest["models"]
    r = compare([str(Path(zoo_dir) / entries[n]["path"]) for n in LIN], write=False,
                tests=("awm", "phi_u"), all_pairs=True)
    names = {m["name"]: n for m, n in zip(r["models"], LIN, strict=True)}
    for p in r["pairs"]:
        a, b = names[p["a"]], names[p["b"]]
        derived = _root(entries, a) == _root(entries, b)
        zs = [t["z"] for t in p["tests"]]
        if derived:
            assert p["verdict"] == "derived" and min(zs) >= 12, (a, b, zs)
        else:
            assert p["verdict"] == "independent" and max(zs) < 3, (a, b, zs)
            assert p["naive"]["mean_raw_cosine"] >= 0.9       # the seed's phenomenon on independents
