"""``lmsurgeon inspect``: what a checkpoint holds, as the registry sees it, read from headers and norms only.

The first thing to run on an unknown checkpoint: it names the family, the layer count, which roles each
layer has, and summarises every norm gain (the vectors the naive lineage argument compares), while reading
only headers and norm tensors — so it is cheap even on a 100B-parameter sharded checkpoint.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np

from lmsurgeon.arch import Layout
from lmsurgeon.io import open_model
from lmsurgeon.report import Report, RunFolder, Section
from lmsurgeon.report.figures import new_figure


def summarise_vector(v: np.ndarray) -> dict:
    """mean/std/cv/min/max of a vector in float64; cv is undefined (None) for a zero mean."""
    v = np.asarray(v, dtype=np.float64)
    finite = bool(np.isfinite(v).all())
    mean, std = float(v.mean()), float(v.std())
    return {
        "n": int(v.size),
        "mean": mean,
        "std": std,
        "cv": std / abs(mean) if mean != 0 else None,
        "min": float(v.min()),
        "max": float(v.max()),
        "finite": finite,
    }


def describe(source: str | Path, **open_kwargs) -> tuple[dict, dict[str, list[np.ndarray]], object]:
    """Family, sizes, roles per layer and norm summaries; also the norm gains (for plotting) and the handle."""
    t0 = time.time()
    handle = open_model(source, **open_kwargs)
    layout = Layout(handle)
    roles_per_layer = Counter(tuple(layout.layer_roles(i)) for i in layout.layers)
    norms, gains = [], {}
    for role, layer in layout.norms_present():
        n = layout.norm(role, layer)
        norms.append(
            {
                "role": role,
                "layer": layer,
                "kind": n.kind,
                "placement": n.placement,
                "has_bias": n.bias is not None,
                **summarise_vector(n.gain),
            }
        )
        gains.setdefault(role, []).append(n.gain)
    header = handle.header() if handle.store.kind == "local" else {}
    dtypes = Counter(t.dtype for t in header.values())
    result = {
        "model": {
            "name": handle.name,
            "source": str(source),
            "revision": handle.revision,
            "family": layout.family.name,
            "model_type": handle.config.get("model_type"),
            "n_layers": layout.n_layers,
            "hidden_size": layout.hidden_size,
            "tied_head": layout.tied,
            "skipped_layers": layout.skipped_layers,
            "n_tensors": len(handle.names()),
            "norm_offset": layout.norm_offset,
            "parameters": int(sum(int(np.prod(t.shape)) for t in header.values())) if header else None,
            "dtypes": dict(dtypes),
        },
        "layer_roles": [{"roles": list(r), "layers": c} for r, c in roles_per_layer.items()],
        "norms": norms,
        "bytes_read": handle.bytes_read,
        "network_bytes": handle.network_bytes,
        "timings": {"describe_seconds": time.time() - t0},
    }
    return result, gains, handle


def _gain_figure(gains: dict[str, list[np.ndarray]]):
    fig, ax = new_figure(7, 4)
    for role, vecs in gains.items():
        if len(vecs) < 2:
            continue
        mean = np.array([v.mean() for v in vecs])
        std = np.array([v.std() for v in vecs])
        x = np.arange(len(vecs))
        ax.plot(x, mean, marker="o", ms=3, label=role)
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("layer")
    ax.set_ylabel("effective gain (mean ± std)")
    ax.set_title("Norm gains by depth")
    ax.legend(fontsize=8)
    return fig


def run(source: str | Path, out: str | Path | None = None, **open_kwargs) -> dict:
    """Describe ``source`` and write a run folder; returns what results.json holds."""
    result, gains, handle = describe(source, **open_kwargs)
    with RunFolder(out, command="inspect") as run_folder:
        fig = run_folder.save_figure(_gain_figure(gains), "norm_gains")
        body = run_folder.write_results(result, inputs=handle.inputs())
        m = result["model"]
        run_folder.write_report(
            Report(
                title=f"Checkpoint: {m['name']}",
                subtitle=f"family {m['family']} · {m['n_layers']} layers · hidden {m['hidden_size']}",
                summary={
                    "family": m["family"],
                    "model_type": m["model_type"],
                    "layers": m["n_layers"],
                    "hidden size": m["hidden_size"],
                    "tied head": m["tied_head"],
                    "skipped layers": ", ".join(map(str, m["skipped_layers"])) or "none",
                    "tensors": m["n_tensors"],
                    "bytes read": result["bytes_read"],
                },
                how_to_read=(
                    "Only headers and norm tensors were read. Roles are the registry's names for what a "
                    "tensor does (attn_norm, q, up, experts.up...); capabilities ask for roles, not names."
                    "\n\nNorm gains are shown as effective gains (Gemma's stored w is shown as 1 + w). Gains "
                    "near 1 with small spread are what makes raw cosine between unrelated models high."
                ),
                sections=[
                    Section(
                        "Roles per layer",
                        table=[{"layers": r["layers"], "roles": ", ".join(r["roles"])} for r in result["layer_roles"]],
                    ),
                    Section(
                        "Norm gains",
                        figures=[fig],
                        table=[
                            {
                                k: n[k]
                                for k in (
                                    "role",
                                    "layer",
                                    "kind",
                                    "placement",
                                    "has_bias",
                                    "mean",
                                    "std",
                                    "cv",
                                    "min",
                                    "max",
                                )
                            }
                            for n in result["norms"]
                        ],
                    ),
                ],
            )
        )
    body["out"] = str(run_folder.path)
    return body
