"""Re-measure the independents' null that ships in ``lmsurgeon/lineage/calibration.json``.

The awm statistic (mean matched q/k CKA) of two models trained from different seeds on the same text is well
above a random basis's: same-data models share structure in a privileged basis. The verdict measures z against
these values, per residual alignment (``permutation`` and ``procrustes``: a fitted rotation has more freedom,
so its null is its own). Pairs: every pair of the zoo's independently initialised models (no ``parent``).

    python benchmarks/calibrate_lineage.py [--profile full] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
from pathlib import Path

import numpy as np

from lmsurgeon.lineage.awm import CALIBRATION_FILE, calibration_key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="full")
    ap.add_argument("--write", action="store_true", help="replace the shipped calibration with these values")
    args = ap.parse_args()
    from lmsurgeon.lineage import LineageConfig, compare
    from lmsurgeon.zoo import ensure_zoo

    zoo_dir, manifest = ensure_zoo(args.profile)
    roots = sorted(n for n, e in manifest["models"].items() if not e.get("parent"))
    paths = {n: str(Path(zoo_dir) / manifest["models"][n]["path"]) for n in roots}
    shipped = json.loads(CALIBRATION_FILE.read_text())
    for method in ("permutation", "procrustes"):
        values = []
        config = LineageConfig(tests=("awm",), align=method)
        for a, b in itertools.combinations(roots, 2):
            p = compare([paths[a], paths[b]], config=config, write=False)["pairs"][0]
            t = p["tests"][0]
            if t.get("applies"):
                values.append(t["statistic"])
            print(f"{method:>11} {a:>12} {b:>12} awm={t.get('statistic')}", flush=True)
        v = np.asarray(values)
        print(f"{method}: n={v.size} mean={v.mean():.4f} std={v.std(ddof=1):.4f} max={v.max():.4f}\n")
        shipped[calibration_key(method)] = {
            "source": f"shipped: all {v.size} applicable pairs of the {len(roots)} independently initialised "
            f"{args.profile}-profile zoo models ({', '.join(roots)}; same corpus), {method} alignment, "
            f"measured {datetime.date.today().isoformat()}",
            "values": v.tolist(),
        }
    if args.write:
        CALIBRATION_FILE.write_text(json.dumps(shipped, indent=2) + "\n")
        print(f"wrote {CALIBRATION_FILE}")


if __name__ == "__main__":
    main()
