"""One token matching and one Procrustes for every capability: keys spell the text back in each tokenizer
family, specials never match, lineage and merge see the same shared set, and the orthogonal map is exact where
a closed form exists and unbiased where zero-padding is not."""

import json

import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes
from scipy.optimize import minimize_scalar
from scipy.stats import ortho_group
from tokenizers import Tokenizer, models, pre_tokenizers

from lmsurgeon.tokens import (
    BYTE_LEVEL,
    SENTENCEPIECE,
    WORDLEVEL,
    WORDPIECE,
    Key,
    canonical_key,
    canonical_vocab,
    fit_similarity,
    match_tokens,
    orthogonal_map,
    umeyama_scale,
)
from lmsurgeon.tokens.vocab import BYTE_TO_UNICODE, UnknownTokenizer, detect_family
from lmsurgeon.zoo.tokenizers import (
    bytelevel_spec,
    sentencepiece_spec,
    train_tokenizer,
    wordpiece_spec,
)

TRAIN = [
    "the cat sat on the mat, quietly. the dog did not.",
    "a café in paris serves crème brûlée and naïve tourists.",
    "tokens that start a word differ from tokens that continue one.",
    "numbers like 12 and 345 and 6789 appear in text too!",
    "the quick brown fox jumps over the lazy dog; the end.",
] * 20

SPECS = {
    BYTE_LEVEL: bytelevel_spec("bl", 400),
    SENTENCEPIECE: sentencepiece_spec("sp", 420),
    WORDPIECE: wordpiece_spec("wp", 200),
}


@pytest.fixture(scope="module")
def trained() -> dict[str, Tokenizer]:
    return {family: train_tokenizer(spec, TRAIN) for family, spec in SPECS.items()}


def _spell(keys: list[Key]) -> bytes:
    """The bytes a sequence of keys stands for: a space before each word start."""
    return b"".join((b" " if k.space else b"") + k.body for k in keys)


# --- canonicalisation ------------------------------------------------------------------------------------------


def test_byte_table_is_the_one_the_tokenizers_library_uses():
    assert set(BYTE_TO_UNICODE.values()) == set(pre_tokenizers.ByteLevel.alphabet())


@pytest.mark.parametrize("byte", range(256))
def test_every_character_of_the_byte_table_decodes_to_its_byte(byte):
    key = canonical_key(BYTE_TO_UNICODE[byte], BYTE_LEVEL)
    assert key == (Key(True, b"") if byte == 0x20 else Key(False, bytes([byte])))


@pytest.mark.parametrize("text", ["café naïve", "日本語のテキスト", "emoji 😀 here", "tab\there\nnew line", "a  b"])
def test_byte_level_pieces_spell_the_text_as_the_library_splits_it(text):
    pieces = [p for p, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)]
    keys = [canonical_key(p, BYTE_LEVEL) for p in pieces]
    assert _spell(keys) == text.encode("utf-8")


@pytest.mark.parametrize(
    "family,text,spelled",
    [
        (BYTE_LEVEL, "the café sat ☃ quietly.", "the café sat ☃ quietly."),
        (SENTENCEPIECE, "the café sat ☃ quietly.", " the café sat ☃ quietly."),  # ☃ only through byte fallback
        (WORDPIECE, "the cat sat, quietly.", " the cat sat, quietly."),  # punctuation is not word-initial
    ],
)
def test_trained_tokenizer_keys_spell_the_encoded_text_back(trained, family, text, spelled):
    tok = trained[family]
    ids = tok.encode(text, add_special_tokens=False).ids
    keys = [canonical_key(tok.id_to_token(i), family) for i in ids]
    assert _spell(keys) == spelled.encode("utf-8")


def test_sentencepiece_unknown_character_goes_through_byte_fallback(trained):
    tok = trained[SENTENCEPIECE]
    pieces = tok.encode("☃", add_special_tokens=False).tokens
    assert pieces[-3:] == ["<0xE2>", "<0x98>", "<0x83>"]


@pytest.mark.parametrize("family", [BYTE_LEVEL, SENTENCEPIECE, WORDPIECE])
def test_trained_tokenizers_are_detected(trained, family):
    assert detect_family(json.loads(trained[family].to_str())) == family


@pytest.mark.parametrize("family", [BYTE_LEVEL, SENTENCEPIECE, WORDPIECE])
def test_special_tokens_never_get_a_key(trained, family):
    tok = trained[family]
    specials = set(SPECS[family].special.values())
    cv = canonical_vocab(tok)
    special_ids = {tok.token_to_id(s) for s in specials}
    assert not special_ids & set(cv.keys.values())
    assert cv.special == len(specials)


def test_control_pieces_are_excluded_even_when_not_declared_as_added_tokens():
    tj = {
        "model": {
            "type": "BPE",
            "vocab": {"<unk>": 0, "<pad>": 1, "<0x41>": 2, "▁a": 3, "<mask>": 4},
            "merges": [],
            "byte_fallback": True,
            "unk_token": "<unk>",
        },
        "added_tokens": [],
    }
    cv = canonical_vocab(tj)
    assert sorted(cv.keys.values()) == [2, 3]
    assert cv.special == 3


def test_wordpiece_brackets_are_control_pieces_and_continuations_carry_no_space():
    tj = {
        "model": {
            "type": "WordPiece",
            "vocab": {"[PAD]": 0, "[unused0]": 1, "[CLS]": 2, "play": 3, "##ing": 4, ",": 5},
        },
        "added_tokens": [{"id": 2, "content": "[CLS]"}],
    }
    cv = canonical_vocab(tj)
    assert cv.keys == {Key(True, b"play"): 3, Key(False, b"ing"): 4, Key(False, b","): 5}
    assert cv.special == 3


def test_regular_piece_wins_a_key_over_byte_fallback_and_the_tie_is_counted():
    tj = {
        "model": {
            "type": "BPE",
            "vocab": {"<unk>": 0, "<0x41>": 1, "<0x0A>": 2, "A": 3, "▁A": 4},
            "merges": [],
            "byte_fallback": True,
            "unk_token": "<unk>",
        },
        "added_tokens": [],
    }
    cv = canonical_vocab(tj)
    assert cv.keys[Key(False, b"A")] == 3
    assert cv.keys[Key(False, b"\n")] == 2
    assert cv.collisions == 1


@pytest.mark.parametrize(
    "byte_level,sentencepiece", [("Ġhello", "▁hello"), ("ĠcafÃ©", "▁café"), ("Ċ", "<0x0A>"), ("Ã", "<0xC3>")]
)
def test_byte_level_and_sentencepiece_spellings_of_the_same_bytes_meet(byte_level, sentencepiece):
    assert canonical_key(byte_level, BYTE_LEVEL) == canonical_key(sentencepiece, SENTENCEPIECE)


def test_word_level_words_are_word_initial_and_their_unknown_token_is_excluded():
    tj = Tokenizer(models.WordLevel({"<unk>": 0, "w1": 1, "hello": 2, ",": 3}, unk_token="<unk>")).to_str()
    cv = canonical_vocab(tj)
    assert cv.family == WORDLEVEL
    assert cv.keys == {Key(True, b"w1"): 1, Key(True, b"hello"): 2, Key(False, b","): 3}


def test_unknown_tokenizer_family_is_an_error_naming_the_file():
    tj = {"model": {"type": "BPE", "vocab": {"a</w>": 0}, "merges": []}, "pre_tokenizer": {"type": "Whitespace"}}
    with pytest.raises(
        UnknownTokenizer,
        match=r"^some/tokenizer.json: unknown tokenizer family \(model type "
        r"'BPE'\)",
    ):
        canonical_vocab(tj, where="some/tokenizer.json")


# --- the shared set ---------------------------------------------------------------------------------------------


def _bl(words: list[str]) -> dict:
    vocab = {"<|endoftext|>": 0, **{("Ġ" + w): i + 1 for i, w in enumerate(words)}}
    return {
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
        "pre_tokenizer": {"type": "ByteLevel"},
        "added_tokens": [{"id": 0, "content": "<|endoftext|>"}],
    }


def _sp(words: list[str]) -> dict:
    vocab = {"<unk>": 0, **{("▁" + w): i + 1 for i, w in enumerate(words)}}
    return {
        "model": {"type": "BPE", "vocab": vocab, "merges": [], "unk_token": "<unk>"},
        "pre_tokenizer": {"type": "Metaspace"},
        "added_tokens": [{"id": 0, "content": "<unk>"}],
    }


WORDS = [f"w{i}" for i in range(50)]


def test_shared_set_pairs_ids_by_key_and_counts_everything_before_the_limit():
    a, b = canonical_vocab(_bl(WORDS)), canonical_vocab(_sp(WORDS[::-1] + ["only_b"]))
    S = match_tokens(a, b)
    assert S.n_shared == 50
    assert S.n_used == 50
    assert all(a.keys[k] == i for k, i in zip(S.keys, S.ids_a.tolist(), strict=True))
    assert all(b.keys[k] == i for k, i in zip(S.keys, S.ids_b.tolist(), strict=True))
    assert S.raw_string_shared == 0  # Ġ and ▁ spellings never meet as raw strings
    assert S.jaccard == pytest.approx(50 / 51)


def test_lowest_ids_selection_keeps_the_pairs_with_the_smallest_max_id():
    a, b = canonical_vocab(_bl(WORDS)), canonical_vocab(_sp(WORDS[::-1]))
    S = match_tokens(a, b, limit=10, selection="lowest_ids")
    all_pairs = sorted(
        zip(match_tokens(a, b).ids_a.tolist(), match_tokens(a, b).ids_b.tolist(), strict=True),
        key=lambda p: (max(p), p[0]),
    )
    assert list(zip(S.ids_a.tolist(), S.ids_b.tolist(), strict=True)) == all_pairs[:10]
    assert S.n_shared == 50


def test_seeded_selection_is_a_reproducible_sample_of_the_shared_set():
    a, b = canonical_vocab(_bl(WORDS)), canonical_vocab(_sp(WORDS))
    full = set(match_tokens(a, b).keys)
    first = match_tokens(a, b, limit=10, selection="seeded", seed=3)
    again = match_tokens(a, b, limit=10, selection="seeded", seed=3)
    other = match_tokens(a, b, limit=10, selection="seeded", seed=4)
    assert first.keys == again.keys
    assert first.keys != other.keys
    assert set(first.keys) <= full
    assert first.n_used == 10


# --- lineage and merge agree -------------------------------------------------------------------------------------


def _lineage_shared_count(a: str, b: str) -> int:
    from lmsurgeon.lineage import compare

    return compare([a, b], write=False, tests=("awm",))["pairs"][0]["alignment"]["shared_tokens"]


def _merge_overlap(base: str, donor: str, texts: list[str]) -> dict:
    from lmsurgeon.merge import MergeSession

    return MergeSession(base, donor, texts).shared.overlap


def test_lineage_and_merge_report_the_same_shared_token_count_for_the_zoo_cross_tokenizer_pair(test_zoo):
    zoo_dir, _ = test_zoo
    gpt2, llama = str(zoo_dir / "gpt2-bpe"), str(zoo_dir / "llama-sp")
    overlap = _merge_overlap(llama, gpt2, TRAIN[:4])
    assert overlap["shared_used"] == overlap["shared"]  # below both capabilities' limits
    assert _lineage_shared_count(gpt2, llama) == overlap["shared"]
    assert overlap["shared"] > overlap["raw_string_shared"]


def test_lineage_and_merge_report_the_same_shared_token_count_for_minilm_and_a_zoo_model(test_zoo):
    zoo_dir, _ = test_zoo
    gpt2 = str(zoo_dir / "gpt2-bpe")
    overlap = _merge_overlap(gpt2, "minilm", TRAIN[:4])
    assert overlap["family_donor"] == WORDPIECE
    assert overlap["shared_used"] == overlap["shared"]
    assert _lineage_shared_count("minilm", gpt2) == overlap["shared"]


# --- Procrustes and Umeyama ------------------------------------------------------------------------------------


def _padded_procrustes(X_c: np.ndarray, Y_c: np.ndarray) -> np.ndarray:
    """Reference for the zero-padding alternative: both sides padded to one width, the square problem solved."""
    n, d = X_c.shape[0], max(X_c.shape[1], Y_c.shape[1])
    Xp, Yp = np.zeros((n, d)), np.zeros((n, d))
    Xp[:, : X_c.shape[1]], Yp[:, : Y_c.shape[1]] = X_c, Y_c
    Q, _ = orthogonal_procrustes(Xp, Yp)
    return Q[: X_c.shape[1], : Y_c.shape[1]]


def _correlated_rows(n: int, d: int, seed: int) -> np.ndarray:
    """Centred rows with standard deviations 3 … 0.5 along random axes: no coordinate subspace is invariant
    under their covariance. The mixing depends on the seed only, not on n."""
    mixing = np.diag(np.linspace(3.0, 0.5, d)) @ ortho_group.rvs(d, random_state=seed)
    X = np.random.default_rng(seed).standard_normal((n, d)) @ mixing
    return X - X.mean(axis=0)


def test_equal_widths_give_scipys_orthogonal_procrustes():
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((300, 16)), rng.standard_normal((300, 16))
    np.testing.assert_allclose(orthogonal_map(X, Y), orthogonal_procrustes(X, Y)[0], atol=1e-12)


def test_proper_rotation_has_determinant_one_and_matches_the_sign_corrected_svd():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((300, 8))
    Y = X @ np.diag([1, 1, 1, 1, 1, 1, 1, -1.0]) + 0.01 * rng.standard_normal((300, 8))  # a reflection
    U, _, Vt = np.linalg.svd(X.T @ Y)
    D = np.diag([1.0] * 7 + [np.sign(np.linalg.det(U @ Vt))])
    R = orthogonal_map(X, Y, proper_rotation=True)
    assert np.linalg.det(R) == pytest.approx(1.0)
    np.testing.assert_allclose(R, U @ D @ Vt, atol=1e-12)


def test_embedding_into_a_wider_space_is_the_svd_solution_which_padding_also_finds():
    """d_X < d_Y: ‖X R‖ does not depend on R, so U Vᵀ is the least-squares minimiser; padding changes nothing."""
    X = _correlated_rows(400, 12, seed=2)
    Y = np.random.default_rng(3).standard_normal((400, 20))
    U, _, Vt = np.linalg.svd(X.T @ Y, full_matrices=False)
    R = orthogonal_map(X, Y)
    np.testing.assert_allclose(R, U @ Vt, atol=1e-10)
    np.testing.assert_allclose(R, _padded_procrustes(X, Y), atol=1e-10)
    np.testing.assert_allclose(R @ R.T, np.eye(12), atol=1e-12)


def test_projection_recovers_a_rotated_projection_that_zero_padding_misses():
    """d_X > d_Y with Y an exact rotated projection of X: the polar factor of the least-squares map finds R₀;
    the zero-padded fit (U Vᵀ of X_cᵀ X_c R₀) is pulled towards X's high-variance directions."""
    X = _correlated_rows(2000, 32, seed=4)
    R0 = ortho_group.rvs(32, random_state=5)[:, :16]
    Y = 1.7 * X @ R0
    R = orthogonal_map(X, Y)
    np.testing.assert_allclose(R, R0, atol=1e-10)
    assert umeyama_scale(X, Y, R) == pytest.approx(1.7, rel=1e-12)
    padded = _padded_procrustes(X, Y)
    assert np.linalg.norm(padded - R0) > 0.5
    resid = np.linalg.norm(umeyama_scale(X, Y, padded) * X @ padded - Y) / np.linalg.norm(Y)
    assert resid > 0.05


def test_projection_with_noise_converges_with_more_rows_while_zero_padding_stays_biased():
    R0 = ortho_group.rvs(24, random_state=6)[:, :12]
    err, err_padded = {}, {}
    for n in (500, 20_000):
        X = _correlated_rows(n, 24, seed=7)
        Y = X @ R0 + 0.5 * np.random.default_rng(8).standard_normal((n, 12))
        err[n] = np.linalg.norm(orthogonal_map(X, Y) - R0)
        err_padded[n] = np.linalg.norm(_padded_procrustes(X, Y) - R0)
    assert err[20_000] < err[500] / 4  # ~1/√n: 40× the rows, about 6× closer
    assert err[20_000] < 0.1
    assert err_padded[20_000] > 1.0
    assert err_padded[20_000] > 0.8 * err_padded[500]  # the padded fit's error does not shrink


def test_umeyama_scale_minimises_the_residual_for_a_given_rotation():
    rng = np.random.default_rng(9)
    X, Y = rng.standard_normal((200, 10)), rng.standard_normal((200, 6))
    R = orthogonal_map(X, Y)
    best = minimize_scalar(lambda s: np.linalg.norm(s * X @ R - Y) ** 2, bracket=(-10.0, 10.0), tol=1e-12)
    assert umeyama_scale(X, Y, R) == pytest.approx(best.x, rel=1e-6)


@pytest.mark.parametrize("d_X,d_Y", [(16, 16), (10, 16), (16, 10)])
def test_similarity_map_centres_and_maps_a_known_transform_exactly(d_X, d_Y):
    X = _correlated_rows(500, d_X, seed=10) + 3.0
    R0 = ortho_group.rvs(max(d_X, d_Y), random_state=11)[:d_X, :d_Y]
    R0 = R0 if d_X <= d_Y else np.linalg.qr(R0)[0]  # semi-orthogonal either way
    nu = np.random.default_rng(12).standard_normal(d_Y)
    Y = 0.4 * (X - X.mean(axis=0)) @ R0 + nu
    fit = fit_similarity(X, Y)
    assert fit.s == pytest.approx(0.4, rel=1e-10)
    np.testing.assert_allclose(fit.map(X), Y, atol=1e-9)
    assert fit.residual < 1e-10


@pytest.mark.parametrize("d_X,d_Y", [(16, 16), (10, 16), (16, 10)])
def test_a_fit_taken_a_block_of_rows_at_a_time_equals_the_whole_fit(d_X, d_Y):
    """The merge fits 50,000 × 4,096 rows in blocks: the moments summed per block give the same map, and float32
    rows fitted in float64 give what their float64 copies give."""
    rng = np.random.default_rng(31)
    X = (_correlated_rows(301, d_X, seed=32) + 2.0).astype(np.float32)
    Y = (X.astype(np.float64) @ rng.standard_normal((d_X, d_Y)) + rng.standard_normal((301, d_Y))).astype(np.float32)
    whole = fit_similarity(X.astype(np.float64), Y.astype(np.float64), chunk_rows=10**6)
    blocks = fit_similarity(X, Y, dtype=np.float64, chunk_rows=7)
    assert blocks.R.dtype == np.float64 and blocks.n == 301
    np.testing.assert_allclose(blocks.R, whole.R, atol=1e-10)
    np.testing.assert_allclose(blocks.mu_X, whole.mu_X, atol=1e-12)
    for field in ("s", "residual", "retained_energy"):
        assert getattr(blocks, field) == pytest.approx(getattr(whole, field), rel=1e-10)
    # and the whole fit is the direct one: R from the rows themselves, Umeyama's s, the residual as defined
    X_c, Y_c = X.astype(np.float64) - whole.mu_X, Y.astype(np.float64) - whole.mu_Y
    R = orthogonal_map(X_c, Y_c)
    np.testing.assert_allclose(whole.R, R, atol=1e-9)
    s = umeyama_scale(X_c, Y_c, R)
    assert whole.s == pytest.approx(s, rel=1e-10)
    assert whole.residual == pytest.approx(np.linalg.norm(s * X_c @ R - Y_c) / np.linalg.norm(Y_c), rel=1e-10)
