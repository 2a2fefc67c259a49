"""What a merge gains, measured fairly: bits per byte on search, held-out and general text, against baselines.

Bits per byte (methods.md §F1, §M9) does not depend on how a tokenizer cuts the text, so the base, the donor (its own
tokenizer) and every merge are compared in one unit. The best trial is chosen on the search text only; the
held-out text (same source, other documents) shows whether it generalises, the general text whether it costs
elsewhere. The baselines are the simple alternatives, measured on the same texts in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.merge.blend import blend_rows
from lmsurgeon.merge.config import DTYPES, MergeConfig
from lmsurgeon.merge.monitors import TOKEN_CLASSES, Evaluation, PromptEvaluator, relative_ppl, token_class
from lmsurgeon.streaming.spill import DiskTensors

TEXTS = ("search", "heldout", "general")
BASELINE_ALPHA = 0.5  # the fixed blend rate of the linear, mean-of-subtokens and OMP baselines
OMP_BASELINE_ROWS = 2000  # OMP baseline: at most this many non-shared rows (lowest ids ≈ most frequent)
OMP_BASELINE_K = 8  # OMP baseline: anchors per row (a cheap baseline; --omp-k sets --init-nonshared's OMP)
MEAN_CHUNK_ROWS = 8192  # mean-of-subtokens baseline: base tokens mapped at a time (bounds its float64 copies)
SPILL_BYTES = 32 << 20  # a baseline's original rows larger than this wait on disk until they are put back


@dataclass(frozen=True)
class MergeTexts:
    """The three texts of a merge and where each came from."""

    search: list[str]
    heldout: list[str]
    general: list[str]
    sources: dict[str, str]
    in_memory: tuple[str, ...] = ()  # texts given as documents, not files: the run folder keeps a copy

    def summary(self) -> dict:
        return {name: {"source": self.sources[name], "documents": len(getattr(self, name))} for name in TEXTS}


def in_memory_source(name: str) -> str:
    """Where a text given in memory is kept: inside the run folder, so the run can be read and redone later."""
    return f"texts/{name}.jsonl in the run folder (given in memory)"


def merge_texts(cfg: MergeConfig, documents: dict[str, list[str]] | None = None) -> MergeTexts:
    """Search text (`prompts_file` or the corpus validation split), held-out text (`eval_file`, else the next
    documents of the same source, else every fourth document of it taken out of the search text) and general
    text (`general_file` or the corpus test split); each at most `max_prompts` documents (0 = all).

    `documents` ({"search": [...], "heldout": [...]}) gives those two texts in memory instead of from files."""
    from lmsurgeon.data import load_texts

    def first(docs: list[str]) -> list[str]:
        return docs[: cfg.max_prompts] if cfg.max_prompts else docs

    if documents is not None:
        if set(documents) != {"search", "heldout"} or not all(documents.values()):
            raise LmsurgeonError("documents in memory must give non-empty 'search' and 'heldout' lists")
        general = first(load_texts(cfg.general_file, "test"))
        return MergeTexts(
            first(list(documents["search"])),
            first(list(documents["heldout"])),
            general,
            {
                "search": in_memory_source("search"),
                "heldout": in_memory_source("heldout"),
                "general": str(cfg.general_file or "corpus:test"),
            },
            in_memory=("search", "heldout"),
        )
    docs = load_texts(cfg.prompts_file, "validation")
    source = cfg.prompts_file or "corpus:validation"
    search = first(docs)
    if cfg.eval_file is not None:
        heldout, held_source = first(load_texts(cfg.eval_file)), str(cfg.eval_file)
    elif len(docs) > len(search):
        heldout, held_source = first(docs[len(search) :]), f"{source} (documents after the search text)"
    elif len(docs) >= 2:
        heldout, held_source = docs[3::4] or docs[-1:], f"{source} (every fourth document)"
        held = set(range(3, len(docs), 4)) if len(docs) > 3 else {len(docs) - 1}
        search = [d for i, d in enumerate(docs) if i not in held]
    else:
        raise LmsurgeonError(
            "the search text holds one document: nothing is left to hold out (pass --eval-file)", cfg.prompts_file
        )
    general = first(load_texts(cfg.general_file, "test"))
    return MergeTexts(
        search,
        heldout,
        general,
        {"search": str(source), "heldout": held_source, "general": str(cfg.general_file or "corpus:test")},
    )


def measure(evaluations: dict[str, Evaluation], base: dict[str, Evaluation] | None = None) -> dict:
    """One row of the `bpb` block: bits per byte on each text, per token class on the held-out text, and the
    held-out relative perplexity against `base`."""
    row: dict = {name: ev.bpb for name, ev in evaluations.items()}
    row["heldout_by_class"] = evaluations["heldout"].bpb_by_class()
    if base is not None:
        row["heldout_r"] = relative_ppl(evaluations["heldout"], base["heldout"])
    return row


def evaluate_texts(model, evaluators: dict[str, PromptEvaluator]) -> dict[str, Evaluation]:
    return {name: ev.evaluate(model) for name, ev in evaluators.items()}


def donor_bpb(session, texts: MergeTexts) -> dict:
    """The donor on the same texts with its own tokenizer: what a user would get by switching models.

    It runs in the dtype the base and the trials run in (``--dtype``), which makes the comparison like for like
    and keeps a layer-streamed 100B-class donor's resident embedding and head at 2 × 1.6 GB in bf16 instead of
    2 × 3.2 GB in float32 (Solar-Open-100B: 196,608 × 4,096 each)."""
    from lmsurgeon.arch import Layout
    from lmsurgeon.merge.streamed import load_lm

    cfg = session.config
    model = load_lm(session.donor_handle, cfg, DTYPES[cfg.dtype])
    pad = session.donor_handle.config.get("pad_token_id")
    max_length = min(cfg.max_length, Layout(session.donor_handle).max_positions or cfg.max_length)
    evaluators = {
        name: PromptEvaluator(
            session.donor_handle.tokenizer,
            getattr(texts, name),
            batch_size=cfg.batch_size,
            max_length=max_length,
            positions=cfg.kl_positions,
            pad_id=pad if isinstance(pad, int) else 0,
            device=cfg.device,
        )
        for name in TEXTS
    }
    row = measure(evaluate_texts(model, evaluators))
    del model
    return row


class RowPatch:
    """Rows of one weight matrix overwritten for a measurement and put back bit for bit afterwards.

    Original rows of more than ``spill_bytes`` wait on disk (``streaming.spill.DiskTensors``) until they are put
    back: the mean-of-subtokens baseline rewrites every row of the embedding and the head, and two copies of
    those (2 × 1.2 GB at GLM-4.5-Air's vocabulary in bf16) would sit beside the live ones through the baseline's
    three evaluations."""

    def __init__(self, weight: torch.Tensor, ids: np.ndarray, rows: np.ndarray, spill_bytes: int = SPILL_BYTES):
        self.weight = weight
        self.ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        original = weight.detach().index_select(0, self.ids).clone()
        self._kept: torch.Tensor | DiskTensors = original
        if original.numel() * original.element_size() > spill_bytes:
            self._kept = DiskTensors()
            self._kept.append(original)
        del original
        new = torch.from_numpy(np.asarray(rows, dtype=np.float32)).to(weight.dtype)
        with torch.no_grad():
            weight.index_copy_(0, self.ids, new)

    @property
    def original(self) -> torch.Tensor:
        """The rows as they were before the patch."""
        return self._kept if isinstance(self._kept, torch.Tensor) else self._kept[0].to(self.weight.device)

    def restore(self) -> None:
        original = self.original
        with torch.no_grad():
            self.weight.index_copy_(0, self.ids, original)
        if not torch.equal(self.weight.index_select(0, self.ids), original):
            raise LmsurgeonError("a baseline's rows did not come back bit for bit")


def _stages(session) -> list[tuple]:
    """(stage plan, donor matrix) for Stage A and, on an untied base, Stage B."""
    out = [(session.stage_a, session.E_D)]
    if session.stage_b is not None:
        out.append((session.stage_b, session.H_D))
    return out


def _vocab_rows(session) -> tuple[np.ndarray, list[str]]:
    """Every decodable base token (ids within the embedding matrix) and the text it spells."""
    ids, texts = [], []
    V_B = session.model.get_input_embeddings().weight.shape[0]
    for (space, body), i in sorted(session.base_vocab.keys.items(), key=lambda kv: kv[1]):
        if i >= V_B:
            continue
        try:
            texts.append((" " if space else "") + body.decode("utf-8"))
        except UnicodeDecodeError:
            continue
        ids.append(i)
    return np.asarray(ids, dtype=np.int64), texts


def linear_blend(session) -> list[RowPatch]:
    """Every shared row moved half-way to its Procrustes-mapped donor row: no gate, no clip, no search."""
    patches = []
    for stage, _donor in _stages(session):
        n = len(session.shared.base_ids)
        ids, rows = stage.idx[:n].numpy(), np.arange(n)
        blended = blend_rows(stage.Y_rows(rows), stage.E_rows(False, rows), np.full(n, BASELINE_ALPHA))
        patches.append(RowPatch(stage.weight, ids, blended))
    return patches


def mean_of_subtokens(session, chunk: int = MEAN_CHUNK_ROWS) -> list[RowPatch]:
    """tokensurgeon's mean initialisation: each base token's donor vector is the mean donor row of the donor's
    tokenisation of its text, mapped by the stage's Procrustes fit; every such row blended at the fixed rate.

    Every base token is a row, so the vocabulary is taken ``chunk`` tokens at a time (one patch each): whole, its
    float64 donor vectors and their mapped copies are several vocabulary × width matrices at once (over 18 GiB
    at GLM-4.5-Air's 151,552 × 4,096). Each row's numbers do not depend on the chunking."""
    from lmsurgeon.merge.omp import donor_vectors

    ids, texts = _vocab_rows(session)
    patches = []
    for stage, donor in _stages(session):
        for a in range(0, len(texts), chunk):
            V, ok = donor_vectors(texts[a : a + chunk], session.donor_handle.tokenizer, donor)
            rows = ids[a : a + chunk][ok]
            if not rows.size:
                continue
            Y = stage.weight.detach().index_select(0, torch.from_numpy(rows)).float().numpy()
            mapped = stage.alignment.map(V[ok]).astype(np.float32)
            patches.append(RowPatch(stage.weight, rows, blend_rows(Y, mapped, np.full(rows.size, BASELINE_ALPHA))))
    return patches


def omp_init(session) -> list[RowPatch]:
    """tokensurgeon's OMP initialisation: a non-shared token's donor vector (mean of its donor subtokens) is
    written as a sparse combination of `OMP_BASELINE_K` shared donor rows, and the same combination of the
    shared base rows is its candidate; blended at the fixed rate into the first `OMP_BASELINE_ROWS` non-shared
    rows."""
    from lmsurgeon.merge.omp import donor_vectors, omp_rows

    ids, texts = _vocab_rows(session)
    shared = set(session.shared.base_ids)
    keep = [j for j, i in enumerate(ids) if int(i) not in shared][:OMP_BASELINE_ROWS]
    ids, texts = ids[keep], [texts[j] for j in keep]
    patches = []
    for stage, donor in _stages(session):
        V, ok = donor_vectors(texts, session.donor_handle.tokenizer, donor)
        rows = ids[ok]
        if not rows.size:
            continue
        X_S = donor[np.asarray(session.shared.donor_ids)]
        Y_S = stage.weight.detach().index_select(0, torch.tensor(session.shared.base_ids)).float().numpy()
        candidates = omp_rows(X_S, Y_S, V[ok], OMP_BASELINE_K).astype(np.float32)
        Y = stage.weight.detach().index_select(0, torch.from_numpy(rows)).float().numpy()
        patches.append(RowPatch(stage.weight, rows, blend_rows(Y, candidates, np.full(rows.size, BASELINE_ALPHA))))
    return patches


BASELINES = {"linear-blend": linear_blend, "mean-of-subtokens": mean_of_subtokens, "omp-init": omp_init}


def blended_fraction_by_class(session, changed_ids: list[int]) -> dict[str, float | None]:
    """Per token class: the share of the base's rows of that class that the merge moved."""
    ids, texts = _vocab_rows(session)
    total = dict.fromkeys(TOKEN_CLASSES, 0)
    moved = dict.fromkeys(TOKEN_CLASSES, 0)
    changed = set(changed_ids)
    for i, text in zip(ids.tolist(), texts, strict=True):
        c = token_class(text)
        total[c] += 1
        moved[c] += i in changed
    return {c: moved[c] / total[c] if total[c] else None for c in TOKEN_CLASSES}


def recommend(base: dict, best: dict | None, cfg: MergeConfig) -> tuple[str, str]:
    """("trial" or "base", why): a trial is recommended only when it beats the base on held-out text and keeps
    general text within the tolerance; otherwise the base is, and the reason says so."""
    if best is None:
        if cfg.objective == "domain":
            return "base", (
                f"no trial kept general text within the tolerance ({cfg.tolerance:.1%} over the base's "
                f"{base['general']:.4f} bits per byte) under the guard; the base is recommended unchanged"
            )
        return "base", "no trial stayed under the guard; the base is recommended unchanged"
    if best["heldout"] >= base["heldout"]:
        return "base", (
            f"no trial beat the base on held-out text (best trial {best['heldout']:.4f} bits per byte "
            f"≥ base {base['heldout']:.4f}); the base is recommended unchanged"
        )
    limit = base["general"] * (1 + cfg.tolerance)
    if best["general"] > limit:
        return "base", (
            f"the best trial beats the base on held-out text but costs general text "
            f"({best['general']:.4f} > {limit:.4f} bits per byte); the base is recommended unchanged"
        )
    return "trial", (
        f"the best trial lowers held-out bits per byte from {base['heldout']:.4f} to "
        f"{best['heldout']:.4f} with general text at {best['general']:.4f} (base {base['general']:.4f})"
    )
