"""Residual alignment (spec §7.1): which hidden dimension of B is which of A, and with what sign.

Hidden units of a transformer can be permuted and sign-flipped without changing its function, so weight
comparisons first recover that map from the embedding columns of tokens both vocabularies share. Once norm gains
are folded away, any orthogonal rotation of the residual stream preserves the function too; ``procrustes`` then
recovers the rotation from the same rows (``scipy.linalg.orthogonal_procrustes``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from scipy.linalg import orthogonal_procrustes
from scipy.optimize import linear_sum_assignment

MAX_SHARED = 32_768
MIN_SHARED = 256
_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def canonical_token(tok: str, wordpiece: bool) -> str | None:
    """One spelling for a token across tokenizer conventions: "▁" marks a word start, bytes become bytes.

    GPT-2's "Ġ" and SentencePiece's "▁" both mean "preceded by a space"; WordPiece marks the opposite
    (continuations carry "##"), so its plain tokens are word starts. Specials ("[CLS]", "<s>") are dropped.
    """
    if re.fullmatch(r"\[[A-Z]+\]|<[^>\s]+>", tok) and not _BYTE.match(tok):
        return None
    m = _BYTE.match(tok)
    if m:
        return chr(int(m.group(1), 16))
    if wordpiece:
        return tok[2:] if tok.startswith("##") else "▁" + tok
    return tok.replace("Ġ", "▁").replace("Ċ", "\n")


def vocab(tokenizer) -> dict[str, int]:
    """Canonical spelling → token id (first id wins) for a ``tokenizers.Tokenizer``."""
    raw = tokenizer.get_vocab(with_added_tokens=False)
    wordpiece = any(t.startswith("##") for t in raw)
    out: dict[str, int] = {}
    for tok, i in sorted(raw.items(), key=lambda kv: kv[1]):
        c = canonical_token(tok, wordpiece)
        if c is not None and c not in out:
            out[c] = i
    return out


def shared_tokens(tok_a, tok_b, seed: int = 0, limit: int = MAX_SHARED) -> tuple[np.ndarray, np.ndarray]:
    """Ids (in A, in B) of tokens both vocabularies spell the same way, at most ``limit`` chosen by seed."""
    va, vb = vocab(tok_a), vocab(tok_b)
    common = sorted(set(va) & set(vb))
    if len(common) > limit:
        rng = np.random.default_rng(seed)
        common = sorted(rng.choice(common, size=limit, replace=False).tolist())
    ia = np.array([va[c] for c in common], dtype=np.int64)
    ib = np.array([vb[c] for c in common], dtype=np.int64)
    order = np.argsort(ia, kind="stable")
    return ia[order], ib[order]


ALIGN_METHODS = ("permutation", "procrustes")


@dataclass
class Alignment:
    """B-dim l ↔ A-dim perm[l] with sign[l]; or, with ``rotation`` R [d_A, d_B] (orthonormal columns),
    B's residual basis x_B ≈ Rᵀ x_A. Weights of A are brought into B's basis, never the other way round."""

    perm: np.ndarray      # [d_B] indices into A's residual dims
    sign: np.ndarray      # [d_B] ±1
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

    Equal widths: ``scipy.linalg.orthogonal_procrustes``, the exact minimiser of ‖E_A R − E_B‖_F. A narrower B
    has no closed form (zero-padding B biases the fit towards A's low-variance directions), so R is the polar
    factor of the least-squares map, which is exact whenever B is a rotated projection of A.
    """
    A = E_A - E_A.mean(axis=0)
    B = E_B - E_B.mean(axis=0)
    if A.shape[1] == B.shape[1]:
        R, _ = orthogonal_procrustes(A, B)
    else:
        T = np.linalg.lstsq(A, B, rcond=None)[0]
        U, _, Vt = np.linalg.svd(T, full_matrices=False)
        R = U @ Vt
    fitted = A @ R
    corr = np.sum(fitted * B, axis=0) / np.maximum(np.linalg.norm(fitted, axis=0) * np.linalg.norm(B, axis=0),
                                                   1e-300)
    d_b = B.shape[1]
    return Alignment(np.arange(d_b), np.ones(d_b), float(np.mean(np.abs(corr))), E_A.shape[0], rotation=R)
