"""How much the weight tests' budgets move z: every zoo pair ``lin-base`` vs the others, without a binding budget
(the defaults; the zoo's models are narrower than every default) and with budgets that bind hard at the zoo's
width (hidden 64, 128 MLP units): a quarter of the residual dimensions as awm items, a quarter of the units,
5 permutations, 512 shared tokens. Prints z of awm and φ_U both ways and the verdicts (methods.md §L7.2.3).

    python benchmarks/budget_z.py [--profile test]
"""

from __future__ import annotations

import argparse
from pathlib import Path

TIGHT = {"max_items": 16, "max_units": 32, "permutations": 5, "max_tokens": 512}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="test")
    args = ap.parse_args()

    from lmsurgeon.lineage import compare
    from lmsurgeon.zoo import ensure_zoo

    zoo_dir, manifest = ensure_zoo(args.profile)
    names = [n for n in manifest["models"] if n.startswith("lin-")]
    base = str(Path(zoo_dir) / manifest["models"]["lin-base"]["path"])
    print(f"budgets {TIGHT}\n")
    print(f"{'pair':<28}{'awm z':>10}{'budget':>10}{'phi_u z':>10}{'budget':>10}  verdicts")
    worst = {"awm": 0.0, "phi_u": 0.0}
    for other in names:
        if other == "lin-base":
            continue
        path = str(Path(zoo_dir) / manifest["models"][other]["path"])
        runs = [compare([base, path], write=False, tests=("awm", "phi_u"), **kw)["pairs"][0] for kw in ({}, TIGHT)]
        z = [{t["name"]: t.get("z") for t in p["tests"]} for p in runs]
        for t in worst:
            if z[0].get(t) is not None and z[1].get(t) is not None:
                worst[t] = max(worst[t], abs(z[1][t] - z[0][t]) / max(abs(z[0][t]), 1.0))
        print(
            f"lin-base vs {other:<16}{z[0]['awm']:>10.2f}{z[1]['awm']:>10.2f}{z[0]['phi_u']:>10.2f}"
            f"{z[1]['phi_u']:>10.2f}  {runs[0]['verdict']} / {runs[1]['verdict']}",
            flush=True,
        )
    print(f"\nlargest |Δz| / max(|z|, 1): awm {worst['awm']:.2f}, phi_u {worst['phi_u']:.2f}")


if __name__ == "__main__":
    main()
