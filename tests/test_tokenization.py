"""minillm.tokenization: characters, byte-level BPE from scratch, and the `tokenizers` library helpers.

References: our BPE trainer is checked against a naive trainer (a full pair recount per merge,
written out below independently of the fast one's index and heap), our encoder against a naive
encoder (every merge applied in rank order) and against the `tokenizers` library's BPE model
loaded with our merges, and our GPT-2 split regex (standard `re`) against the library's ByteLevel
pre-tokenizer (GPT-2's original `\\p{L}`/`\\p{N}` regex in Rust). All comparisons are exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from minillm import MinillmError, data, datasets
from minillm.tokenization import (
    SPECIAL_TOKENS,
    BPETokenizer,
    CharTokenizer,
    UnknownCharacterError,
    bpe_vocab_overlap,
    bytes_to_unicode,
    compression,
    load_library_tokenizer,
    pretokenize,
    save_library_tokenizer,
    special_token_ids,
    train_library_bpe,
    train_wordpiece,
)

EOT = "<|endoftext|>"
SHAKESPEARE = data.read_text_file(datasets.data_path("tinyshakespeare.txt"))
MULTILINGUAL = "Ça va? Naïve café — straße, ĳ, ﬁne. 日本語のテキスト。 Привет, мир! 😀👍🏽👨‍👩‍👧 x² ½ ⅻ e\u0301\u0302 \t\n"


# ---------------------------------------------------------------------------------------------
# Independent slow references
# ---------------------------------------------------------------------------------------------


def naive_merge(ids, pair, new_id):
    """Left-to-right, non-overlapping replacement, written with a list copy instead of a scan."""
    out = list(ids)
    i = 0
    while i < len(out) - 1:
        if (out[i], out[i + 1]) == pair:
            out[i: i + 2] = [new_id]
        i += 1
    return out


def naive_train(text, vocab_size, min_frequency=2):
    """Sennrich et al.'s loop as written in the paper: recount every pair over every chunk occurrence, each merge.

    Ties: the smallest (left id, right id) among the most frequent pairs (the documented rule)."""
    words = [list(chunk.encode("utf-8")) for chunk in pretokenize(text)]
    merges = []
    while len(merges) < vocab_size - 256:
        counts = {}
        for word in words:
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = max(counts.values())
        pair = min(p for p, c in counts.items() if c == best)
        if best < min_frequency:
            break
        merges.append(pair)
        words = [naive_merge(word, pair, 255 + len(merges)) for word in words]
    return merges


def naive_encode(tokenizer, text):
    """Apply every merge, in rank order, to every chunk."""
    ids = []
    for chunk in pretokenize(text):
        chunk_ids = list(chunk.encode("utf-8"))
        for pair, new_id in tokenizer.merges.items():  # dicts keep insertion (= rank) order
            chunk_ids = naive_merge(chunk_ids, pair, new_id)
        ids.extend(chunk_ids)
    return ids


def library_bpe_with_our_merges(tokenizer):
    """The `tokenizers` library's BPE model loaded with our vocabulary and merges (GPT-2 string form)."""
    byte_char = bytes_to_unicode()

    def spell(i):
        return "".join(byte_char[b] for b in tokenizer.vocab[i])

    vocab = {spell(i): i for i in range(256 + len(tokenizer.merges))}
    library = Tokenizer(models.BPE(vocab=vocab, merges=[(spell(a), spell(b)) for a, b in tokenizer.merges]))
    library.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    library.decoder = decoders.ByteLevel()
    return library


@pytest.fixture(scope="module")
def bpe():
    """500 tokens from Shakespeare plus multilingual text, with a special token (trains in ~0.2 s)."""
    return BPETokenizer.train([SHAKESPEARE[:100_000], MULTILINGUAL * 20], vocab_size=500, special_tokens=[EOT])


# ---------------------------------------------------------------------------------------------
# Characters
# ---------------------------------------------------------------------------------------------


def test_char_tokenizer_vocabulary_is_the_sorted_distinct_characters():
    tokenizer = CharTokenizer.train(SHAKESPEARE)
    assert tokenizer.id_to_char == sorted(set(SHAKESPEARE)) and len(tokenizer) == tokenizer.vocab_size == 65
    assert tokenizer.encode("\n !") == [0, 1, 2]


@given(text=st.text(alphabet=sorted(set(SHAKESPEARE))))
def test_char_tokenizer_round_trips_text_over_its_vocabulary(text):
    tokenizer = CharTokenizer.train(SHAKESPEARE)
    ids = tokenizer.encode(text)
    assert len(ids) == len(text) and tokenizer.decode(ids) == text


def test_char_tokenizer_unknown_character_error_names_the_character_and_position():
    tokenizer = CharTokenizer.train("abc")
    with pytest.raises(UnknownCharacterError, match=r"'é' \(U\+00E9\) at position 2 .* unknown='unk'"):
        tokenizer.encode("abé")
    with pytest.raises(MinillmError):  # a MinillmError: scripts show it as one line
        tokenizer.encode("z")


def test_char_tokenizer_unk_mode_reserves_id_zero():
    tokenizer = CharTokenizer.train("abc", unknown="unk")
    assert len(tokenizer) == 4 and tokenizer.encode("abzc") == [1, 2, 0, 3]
    assert tokenizer.decode([1, 0, 3]) == "a\ufffdc"


def test_char_tokenizer_saves_and_loads_as_json(tmp_path):
    for unknown in ("error", "unk"):
        tokenizer = CharTokenizer.train(MULTILINGUAL, unknown=unknown)
        tokenizer.save(tmp_path / "chars.json")
        loaded = CharTokenizer.load(tmp_path / "chars.json")
        assert loaded.id_to_char == tokenizer.id_to_char and loaded.encode(MULTILINGUAL) == tokenizer.encode(MULTILINGUAL)
    assert json.loads((tmp_path / "chars.json").read_text())["type"] == "CharTokenizer"


def test_char_tokenizer_rejects_bad_ids_options_and_files(tmp_path):
    tokenizer = CharTokenizer.train("abc")
    for bad in (3, -1):
        with pytest.raises(ValueError, match=f"id {bad} is outside"):
            tokenizer.decode([0, bad])
    with pytest.raises(ValueError, match="'error' or 'unk'"):
        CharTokenizer.train("abc", unknown="skip")
    with pytest.raises(MinillmError, match="does not exist"):
        CharTokenizer.load(tmp_path / "missing.json")
    BPETokenizer([]).save(tmp_path / "bpe.json")
    with pytest.raises(MinillmError, match="not a saved CharTokenizer"):
        CharTokenizer.load(tmp_path / "bpe.json")


# ---------------------------------------------------------------------------------------------
# GPT-2 pre-tokenization
# ---------------------------------------------------------------------------------------------


@given(text=st.text())
def test_pretokenize_chunks_concatenate_back_to_any_text(text):
    assert "".join(pretokenize(text)) == text


# Python's \s also matches U+001C-U+001F (information separators), which Unicode's White_Space
# and so the Rust regex do not; characters unassigned in Python's Unicode database are left out
# because the Rust crate may know a newer Unicode version.
GPT2_COMPARABLE = st.characters(max_codepoint=0x2FFF, exclude_categories=("Cs", "Cn"), exclude_characters="\x1c\x1d\x1e\x1f")


@given(text=st.text(alphabet=st.one_of(GPT2_COMPARABLE, st.sampled_from(list("'sdmtlvre 😀👍🏽\u200d"))), max_size=40))
def test_pretokenize_splits_exactly_as_gpt2s_regex_in_the_tokenizers_library(text):
    reference = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str(text)
    assert pretokenize(text) == [text[start:end] for _, (start, end) in reference]


def test_pretokenize_examples():
    assert pretokenize("Hello  world's 42x²!\n\n") == ["Hello", " ", " world", "'s", " 42", "x", "²", "!", "\n\n"]


# ---------------------------------------------------------------------------------------------
# BPE training and encoding against references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [SHAKESPEARE[:6000], MULTILINGUAL * 3, "aaaaaaa aaa aa a " * 5, "abab abab ab"])
def test_bpe_training_learns_the_same_merges_as_a_naive_full_recount(text):
    assert list(BPETokenizer.train(text, vocab_size=340).merges) == naive_train(text, vocab_size=340)


@given(text=st.text(alphabet="ab c\nd", max_size=60), vocab_size=st.integers(256, 280), min_frequency=st.integers(1, 3))
def test_bpe_training_matches_the_naive_trainer_on_random_small_texts(text, vocab_size, min_frequency):
    fast = BPETokenizer.train(text, vocab_size=vocab_size, min_frequency=min_frequency)
    assert list(fast.merges) == naive_train(text, vocab_size, min_frequency)


def test_bpe_ties_go_to_the_smallest_pair():
    # chunks "cd", "\n", "ab", ...: "ab" and "cd" both occur twice; (97, 98) < (99, 100), so "ab" is merged first.
    tokenizer = BPETokenizer.train("cd\nab\ncd\nab", vocab_size=258)
    assert list(tokenizer.merges)[:2] == [(97, 98), (99, 100)]


def test_bpe_merges_stop_at_the_vocabulary_size_and_the_minimum_frequency():
    assert len(BPETokenizer.train(SHAKESPEARE[:20_000], vocab_size=300)) == 300
    assert len(BPETokenizer.train(SHAKESPEARE[:20_000], vocab_size=300, special_tokens=[EOT])) == 300
    rare = BPETokenizer.train("abcdef", vocab_size=300)  # every pair occurs once: nothing to merge at min_frequency 2
    assert len(rare) == 256 and len(BPETokenizer.train("abcdef", vocab_size=300, min_frequency=1)) == 261


def test_bpe_never_merges_across_chunk_boundaries(bpe):
    for token in bpe.token_strings(range(256, 256 + len(bpe.merges))):
        assert len(pretokenize(token)) <= 1 or "\ufffd" in token, token


@given(text=st.text(max_size=80))
def test_bpe_encoding_applies_merges_in_rank_order_like_the_naive_encoder(bpe, text):
    assert bpe.encode(text.replace(EOT, "")) == naive_encode(bpe, text.replace(EOT, ""))


def test_bpe_encoding_equals_the_tokenizers_library_loaded_with_our_merges(bpe):
    library = library_bpe_with_our_merges(bpe)
    for text in (SHAKESPEARE[-50_000:], MULTILINGUAL):
        assert bpe.encode(text) == library.encode(text).ids
    assert bpe_vocab_overlap(bpe, library) == {"ours": 243, "library": 243, "shared": 243}


# ---------------------------------------------------------------------------------------------
# Round trips, special tokens, decoding partial characters, files
# ---------------------------------------------------------------------------------------------

EMOJI = ["😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "🧑🏿‍🚀"]
COMBINING = st.characters(categories=("Mn", "Mc", "Me"))
unicode_text = st.one_of(
    st.text(),  # any code point except surrogates
    st.lists(st.one_of(st.sampled_from(EMOJI), COMBINING, st.sampled_from(list("ae ")))).map("".join),
    st.text(alphabet=" \t\n\r\u00a0\u2003\u3000\x0b\x0c"),  # whitespace runs
    st.lists(st.sampled_from(["the", " king", "'s", "  ", "\n\n", "😀", "e\u0301", "42", "!!"])).map("".join),
)


@given(text=unicode_text)
def test_bpe_round_trips_any_unicode_string(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text and bpe.decode_bytes(ids) == text.encode("utf-8")
    assert all(0 <= i < len(bpe) for i in ids)


def test_bpe_round_trips_the_empty_string(bpe):
    assert bpe.encode("") == [] and bpe.decode([]) == ""


@given(left=st.text(max_size=30), right=st.text(max_size=30))
def test_special_tokens_encode_to_one_id_and_round_trip(bpe, left, right):
    left, right = left.replace(EOT, ""), right.replace(EOT, "")
    ids = bpe.encode(left + EOT + right)
    assert ids == bpe.encode(left) + [bpe.special_tokens[EOT]] + bpe.encode(right)
    assert bpe.decode(ids) == left + EOT + right


def test_special_tokens_take_the_last_ids_and_are_never_learned_as_merges():
    tokenizer = BPETokenizer.train(("hello world" + EOT) * 50, vocab_size=270, special_tokens=[EOT, "<|pad|>"])
    n_learned = 256 + len(tokenizer.merges)
    assert tokenizer.special_tokens == {EOT: n_learned, "<|pad|>": n_learned + 1} and len(tokenizer) == n_learned + 2
    assert len(tokenizer.merges) > 5 and not any(b"|" in tokenizer.vocab[i] for i in range(256, n_learned))


@given(text=st.text(min_size=1, max_size=20))
def test_bpe_decoding_a_prefix_that_cuts_a_character_replaces_instead_of_raising(bpe, text):
    ids = bpe.encode(text)
    for cut in range(len(ids) + 1):
        assert bpe.decode(ids[:cut]) == bpe.decode_bytes(ids[:cut]).decode("utf-8", errors="replace")
    assert bpe.decode([0xF0, 0x9F]) == "\ufffd"  # the first two bytes of a four-byte emoji


def test_bpe_saves_and_loads_as_json_with_readable_vocabulary(bpe, tmp_path):
    path = bpe.save(tmp_path / "bpe.json")
    saved = json.loads(path.read_text())
    assert saved["vocab"]["Ġthe"] == bpe.encode(" the")[0] and saved["special_tokens"] == {EOT: 499}
    loaded = BPETokenizer.load(path)
    assert loaded.merges == bpe.merges and loaded.special_tokens == bpe.special_tokens
    assert loaded.encode(MULTILINGUAL + EOT) == bpe.encode(MULTILINGUAL + EOT)


def test_bpe_load_refuses_an_inconsistent_file(bpe, tmp_path):
    path = bpe.save(tmp_path / "bpe.json")
    saved = json.loads(path.read_text())
    saved["merges"][0] = saved["merges"][0][::-1]
    path.write_text(json.dumps(saved))
    with pytest.raises(MinillmError, match="inconsistent"):
        BPETokenizer.load(path)
    saved["merges"][0] = [0, 999]
    path.write_text(json.dumps(saved))
    with pytest.raises(MinillmError, match="damaged BPETokenizer file"):
        BPETokenizer.load(path)


def test_bpe_rejects_bad_arguments(bpe):
    with pytest.raises(ValueError, match="at least 256"):
        BPETokenizer.train("abc", vocab_size=256, special_tokens=[EOT])
    with pytest.raises(ValueError, match="only ids below 256"):
        BPETokenizer([(97, 256)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bpe.decode([len(bpe)])
    with pytest.raises(ValueError, match="lone surrogate"):
        bpe.encode("a\ud800b")


# ---------------------------------------------------------------------------------------------
# The tokenizers library: byte-level BPE and WordPiece with BERT's special tokens
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sst2_sentences():
    return datasets.read_sst2("train")[0][:3000]


def test_wordpiece_has_bert_special_tokens_lowercases_and_marks_continuations(sst2_sentences, tmp_path):
    tokenizer = train_wordpiece(sst2_sentences, vocab_size=800)
    assert special_token_ids(tokenizer) == (0, 1, 2, 3, 4)
    assert [tokenizer.id_to_token(i) for i in range(5)] == list(SPECIAL_TOKENS)
    encoding = tokenizer.encode("The MOVIE's unbelievably charming!")
    assert encoding.tokens[:2] == ["the", "movie"] and "'" in encoding.tokens and "!" in encoding.tokens
    assert any(token.startswith("##") for token in encoding.tokens)
    assert tokenizer.decode(encoding.ids).replace(" ", "") == "themovie'sunbelievablycharming!"  # lossy: case, spaces
    path = save_library_tokenizer(tokenizer, tmp_path / "wordpiece.json")
    assert load_library_tokenizer(path).encode("unbelievably charming").ids == tokenizer.encode("unbelievably charming").ids


def test_library_bpe_has_the_special_tokens_first_and_round_trips(sst2_sentences, tmp_path):
    tokenizer = train_library_bpe(SHAKESPEARE[:50_000], vocab_size=600)
    assert special_token_ids(tokenizer) == (0, 1, 2, 3, 4) and tokenizer.get_vocab_size() == 600
    assert tokenizer.decode(tokenizer.encode(MULTILINGUAL).ids) == MULTILINGUAL
    path = save_library_tokenizer(tokenizer, tmp_path / "bpe.json")
    assert load_library_tokenizer(path).encode(MULTILINGUAL).ids == tokenizer.encode(MULTILINGUAL).ids


# Trains with the function named in argv[1] on the JSON list of texts in argv[2] and writes the tokenizer
# file to argv[4]: a fresh process, so Rust's hash maps (and Python's, with another PYTHONHASHSEED) are
# seeded afresh.
TRAIN_IN_A_FRESH_PROCESS = """
import json, pathlib, sys
from minillm import tokenization
function, texts, vocab_size, out = sys.argv[1:]
texts = json.loads(pathlib.Path(texts).read_text(encoding="utf-8"))
pathlib.Path(out).write_text(getattr(tokenization, function)(texts, int(vocab_size)).to_str(), encoding="utf-8")
"""


def trained_in_fresh_processes(function, texts, vocab_size, tmp_path, hash_seeds=(1, 2)):
    """The tokenizer file ``function(texts, vocab_size)`` makes in a new Python process per hash seed."""
    (tmp_path / "texts.json").write_text(json.dumps(texts), encoding="utf-8")
    files = []
    for seed in hash_seeds:
        out = tmp_path / f"{function}-{seed}.json"
        done = subprocess.run([sys.executable, "-c", TRAIN_IN_A_FRESH_PROCESS, function, str(tmp_path / "texts.json"),
                               str(vocab_size), str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)})
        assert done.returncode == 0, done.stderr
        files.append(out.read_text(encoding="utf-8"))
    return files


def plain_library_wordpiece(texts, vocab_size):
    """The library's WordPiece trainer run once, as train_wordpiece did before: its ## ids follow hash-map order."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
                                        continuing_subword_prefix="##", show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def test_wordpiece_training_is_identical_in_separate_processes(sst2_sentences, tmp_path):
    # 5,000 tokens from 3,000 phrases: many merges at the cut are ties, where the library's hash-map order
    # used to change the vocabulary itself, not only the ids.
    here = train_wordpiece(sst2_sentences, vocab_size=5000).to_str()
    assert trained_in_fresh_processes("train_wordpiece", sst2_sentences, 5000, tmp_path) == [here, here]
    assert train_wordpiece(sst2_sentences, vocab_size=5000).to_str() == here  # and twice in one process


def test_library_bpe_training_is_identical_in_separate_processes(tmp_path):
    texts = [SHAKESPEARE[:50_000], MULTILINGUAL * 20]
    here = train_library_bpe(texts, vocab_size=1000).to_str()
    assert trained_in_fresh_processes("train_library_bpe", texts, 1000, tmp_path) == [here, here]


def test_wordpiece_ids_are_specials_sorted_alphabet_sorted_continuations_then_merges(sst2_sentences):
    tokenizer = train_wordpiece(sst2_sentences + [MULTILINGUAL], vocab_size=800)
    tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
    alphabet = [token for token in tokens if len(token) == 1]
    continuations = [token for token in tokens if len(token) == 3 and token.startswith("##")]
    start = len(SPECIAL_TOKENS) + len(alphabet) + len(continuations)
    assert tokens[:start] == list(SPECIAL_TOKENS) + sorted(alphabet) + sorted(continuations)
    assert all(len(token.removeprefix("##")) >= 2 for token in tokens[start:]) and len(tokens) == 800
    # only the real special tokens are added tokens: "a" or "##s" in a text is ordinary text ("#" is not in these texts)
    assert {i: token.content for i, token in tokenizer.get_added_tokens_decoder().items()} == dict(enumerate(SPECIAL_TOKENS))
    assert tokenizer.encode("a ##s [MASK]").tokens == ["a", "[UNK]", "[UNK]", "s", "[MASK]"]


def test_wordpiece_has_the_librarys_alphabet_and_vocabulary_size(sst2_sentences):
    ours = train_wordpiece(sst2_sentences + [MULTILINGUAL], vocab_size=800).get_vocab()
    library = plain_library_wordpiece(sst2_sentences + [MULTILINGUAL], vocab_size=800).get_vocab()
    assert len(ours) == len(library) == 800
    assert {t for t in ours if len(t.removeprefix("##")) == 1} == {t for t in library if len(t.removeprefix("##")) == 1}
    assert len(set(ours) & set(library)) >= 0.97 * 800  # the same algorithm: only ties may be broken differently


def test_wordpiece_trains_from_a_one_shot_iterator_as_from_a_list(sst2_sentences):
    assert train_wordpiece(iter(sst2_sentences), vocab_size=600).to_str() == train_wordpiece(sst2_sentences, vocab_size=600).to_str()


def test_library_helpers_report_missing_special_tokens_and_bad_files(tmp_path):
    tokenizer = train_library_bpe("some text", vocab_size=260, special_tokens=())
    with pytest.raises(MinillmError, match=r"no \[PAD\], \[UNK\], \[CLS\], \[SEP\], \[MASK\] token"):
        special_token_ids(tokenizer)
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(MinillmError, match="not a tokenizers JSON file"):
        load_library_tokenizer(tmp_path / "junk.json")
    with pytest.raises(MinillmError, match="does not exist"):
        load_library_tokenizer(tmp_path / "missing.json")


def test_compression_counts_characters_bytes_and_tokens():
    stats = compression("héllo", [1, 2])
    assert (stats.n_chars, stats.n_bytes, stats.n_tokens) == (5, 6, 2)
    assert stats.chars_per_token == 2.5 and stats.tokens_per_char == 0.4 and stats.bytes_per_token == 3.0
    with pytest.raises(ValueError):
        compression("", [])
