"""Residual alignment (methods.md §L7.1): which hidden dimension of B is which of A, and with what sign.

Hidden units of a transformer can be permuted and sign-flipped without changing its function, so weight
comparisons first recover that map from the embedding columns of tokens both vocabularies share. Once norm gains
are folded away, any orthogonal rotation of the residual stream preserves the function too; ``procrustes`` then
recovers the rotation from the same rows (``lmsurgeon.tokens.procrustes``, shared with merge).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from lmsurgeon.tokens.procrustes import orthogonal_map
from lmsurgeon.tokens.vocab import (
    BYTE_FALLBACK,
    BYTE_LEVEL,
    SENTENCEPIECE,
    WORDPIECE,
    UnknownTokenizer,
    canonical_key,
    canonical_vocab,
    is_control_piece,
    match_tokens,
)

MAX_SHARED = 32_768
MIN_SHARED = 256


def canonical_token(tok: str, wordpiece: bool) -> str | None:
    """The readable spelling (``Key.text``) of one token, or None for a special piece.

    Kept for callers that have a bare string; the family is guessed from the token itself (WordPiece as told,
    else SentencePiece for ``▁``, ``<0xNN>`` and ``<…>`` pieces, else byte-level). Matching whole vocabularies
    goes through :func:`shared_tokens`, which reads the family from tokenizer.json.
    """
    if wordpiece:
        family = WORDPIECE
    elif "▁" in tok or BYTE_FALLBACK.match(tok) or is_control_piece(tok, SENTENCEPIECE):
        family = SENTENCEPIECE
    else:
        family = BYTE_LEVEL
    if is_control_piece(tok, family):
        return None
    key = canonical_key(tok, family)
    return None if key is None else key.text


def shared_tokens(tok_a, tok_b, seed: int = 0, limit: int = MAX_SHARED) -> tuple[np.ndarray, np.ndarray]:
    """Ids (in A, in B) of tokens both vocabularies spell the same way, at most ``limit`` chosen by seed,
    sorted by A's id.

    Matching is ``lmsurgeon.tokens`` (the same as merge's). A tokenizer of no known family shares no tokens,
    so the weight tests report too few shared tokens instead of failing the run.
    """
    try:
        va, vb = canonical_vocab(tok_a), canonical_vocab(tok_b)
    except UnknownTokenizer:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    S = match_tokens(va, vb, limit=limit, selection="seeded", seed=seed)
    order = np.argsort(S.ids_a, kind="stable")
    return S.ids_a[order], S.ids_b[order]


@dataclass
class Alignment:
    """B-dim l ↔ A-dim perm[l] with sign[l]; or, with ``rotation`` R [d_A, d_B] (orthonormal columns),
    B's residual basis x_B ≈ Rᵀ x_A. Weights of A are brought into B's basis, never the other way round."""

    perm: np.ndarray  # [d_B] indices into A's residual dims
    sign: np.ndarray  # [d_B] ±1
    mean_abs_corr: float  # mean |corr| of matched columns
    n_tokens: int
    rotation: np.ndarray | None = None

    @property
    def method(self) -> str:
        return "permutation" if self.rotation is None else "procrustes"

    def a_in(self, W: np.ndarray) -> np.ndarray:
        """A weight that reads the residual stream ([out, d_A]) as it reads B's basis: W[:, π] or W R."""
        return W[:, self.perm] if self.rotation is None else W @ self.rotation

    def b_in(self, W: np.ndarray) -> np.ndarray:
        """B's reader [out, d_B] with the recovered signs."""
        return W * self.sign[None, :]

    def a_out(self, W: np.ndarray) -> np.ndarray:
        """A weight that writes the residual stream ([d_A, in]) in B's basis: W[π, :] or Rᵀ W."""
        return W[self.perm, :] if self.rotation is None else self.rotation.T @ W

    def b_out(self, W: np.ndarray) -> np.ndarray:
        """B's writer [d_B, in] with the recovered signs."""
        return self.sign[:, None] * W


def column_cosines(E_A: np.ndarray, E_B: np.ndarray) -> np.ndarray:
    """C[k, l] = cosine of column k of E_A [n, d_A] and column l of E_B [n, d_B] (centered: Pearson)."""
    A = E_A - E_A.mean(axis=0)
    B = E_B - E_B.mean(axis=0)
    A = A / np.maximum(np.linalg.norm(A, axis=0), 1e-300)
    B = B / np.maximum(np.linalg.norm(B, axis=0), 1e-300)
    return A.T @ B


def paired_column_cosines(E_A: np.ndarray, E_B: np.ndarray) -> np.ndarray:
    """c[l] = cosine of column l of E_A with column l of E_B, both [n, d] (centered: Pearson): the diagonal of
    :func:`column_cosines` without the d × d product (O(n·d) instead of O(n·d²))."""
    A = E_A - E_A.mean(axis=0)
    B = E_B - E_B.mean(axis=0)
    norms = np.maximum(np.linalg.norm(A, axis=0) * np.linalg.norm(B, axis=0), 1e-300)
    return np.einsum("ij,ij->j", A, B) / norms


def align_residual(E_A: np.ndarray, E_B: np.ndarray) -> Alignment:
    """Linear assignment on 1 − |C| (d_B ≤ d_A): every B dimension gets a distinct A dimension and a sign."""
    C = column_cosines(E_A, E_B)
    rows, cols = linear_sum_assignment(1.0 - np.abs(C))
    perm = np.empty(E_B.shape[1], dtype=np.int64)
    perm[cols] = rows
    c = C[perm, np.arange(E_B.shape[1])]
    return Alignment(perm, np.where(c < 0, -1.0, 1.0), float(np.mean(np.abs(c))), E_A.shape[0])


def align_rotation(E_A: np.ndarray, E_B: np.ndarray) -> Alignment:
    """R [d_A, d_B] with orthonormal columns mapping A's centred rows onto B's: E_A R ≈ E_B (d_B ≤ d_A).

    R is ``lmsurgeon.tokens.procrustes.orthogonal_map``: the exact minimiser of ‖E_A R − E_B‖_F for equal widths,
    and for a narrower B the polar factor of the least-squares map (zero-padding B would bias the fit), which
    is exact whenever B is a rotated projection of A.
    """
    A = E_A - E_A.mean(axis=0)
    B = E_B - E_B.mean(axis=0)
    R = orthogonal_map(A, B)
    fitted = A @ R
    corr = np.sum(fitted * B, axis=0) / np.maximum(np.linalg.norm(fitted, axis=0) * np.linalg.norm(B, axis=0), 1e-300)
    d_b = B.shape[1]
    return Alignment(np.arange(d_b), np.ones(d_b), float(np.mean(np.abs(corr))), E_A.shape[0], rotation=R)
