"""minillm.data's preparation steps: cleaning, dedup, padding and pair encoding, language-model blocks.

References: the cleaning steps against a character-by-character transcription of their documented
rules and against a scan of Unicode's space separators; dedup against ``dict.fromkeys`` and a
first-index grouping; padding, masks and BERT pairs against hand-built tensors and invariants;
memmap blocks against slices of the in-memory array. All comparisons are exact (integers, strings).
"""

from __future__ import annotations

import sys
import unicodedata

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minillm import MinillmError, data

# ---------------------------------------------------------------------------------------------
# Cleaning
# ---------------------------------------------------------------------------------------------

messy_text = st.lists(st.one_of(
    st.characters(),  # anything but surrogates
    st.sampled_from(["\r\n", "\r", "\u2028", "\x00", "\x85", "\u200b", "\ufeff", "\u00a0", "\u3000", "  \n", "\t\n",
                     "e\u0301", "\u0301", "ﬁ", "Å", "A\u030a", "\n", "ROMEO:\n", "Hello, world!\n", "hello world\n"]))).map("".join)


def reference_control_and_whitespace(text: str) -> str:
    """The documented rules, one character at a time (independent of the module's regexes)."""
    out = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\r":
            out.append("\n")
            i += 2 if text[i + 1: i + 2] == "\n" else 1
            continue
        if char in "\u2028\u2029":
            out.append("\n")
        elif char in "\t\n":
            out.append(char)
        elif unicodedata.category(char) == "Cc" or char in "\u200b\u2060\ufeff":
            pass  # Cc is exactly C0 + DEL + C1
        elif unicodedata.category(char) == "Zs":
            out.append(" ")
        else:
            out.append(char)
        i += 1
    lines = "".join(out).split("\n")
    return "\n".join(line.rstrip(" \t") for line in lines)


@given(text=messy_text)
def test_control_and_whitespace_cleanup_follow_the_documented_rules(text):
    assert data.clean_whitespace(data.remove_control_characters(text)) == reference_control_and_whitespace(text)


def test_unicode_spaces_are_exactly_the_space_separators_but_ascii_space():
    zs = {chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Zs"} - {" "}
    assert {char for char in zs if data.UNICODE_SPACES.fullmatch(char)} == zs
    assert not data.UNICODE_SPACES.search(" \t\nabc\u200b")


@given(text=messy_text, form=st.sampled_from(["NFC", "NFKC"]), dedup=st.sampled_from([None, "exact", "near"]),
       min_chars=st.integers(0, 8))
def test_cleaning_is_idempotent(text, form, dedup, min_chars):
    once = data.clean_text(text, normalization=form, dedup=dedup, dedup_min_chars=min_chars).text
    twice = data.clean_text(once, normalization=form, dedup=dedup, dedup_min_chars=min_chars)
    assert twice.text == once
    assert all(step.chars_changed == 0 and step.lines_removed == 0 for step in twice.steps)


@given(text=messy_text, form=st.sampled_from(["NFC", "NFKC"]))
def test_cleaning_without_dedup_is_cleanup_then_normalization(text, form):
    assert data.clean_text(text, normalization=form, dedup=None).text == unicodedata.normalize(form, reference_control_and_whitespace(text))


@given(text=st.text(alphabet=st.characters(exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), exclude_characters="\u200b\u2060\ufeff")))
def test_clean_text_changes_nothing_else(text):
    """Text with nothing the documented rules touch comes out unchanged (dedup off; one line)."""
    text = unicodedata.normalize("NFC", text)
    report = data.clean_text(text, dedup=None)
    assert report.text == text and sum(step.chars_changed for step in report.steps) == 0


def test_cleaning_report_says_what_each_step_changed():
    report = data.clean_text("a\r\nb\u200b\u00a0 \n\ne\u0301\n\nA!\na\n", dedup="near")
    assert report.text == "a\nb\n\né\n"
    rows = {step.name: (step.chars_changed, step.lines_removed, step.examples) for step in report.steps}
    assert rows == {
        "line endings": (1, 0, [("'\\r\\n'", 1)]),
        "control characters": (1, 0, [("'\\u200b'", 1)]),
        "Unicode spaces": (1, 0, [("'\\xa0'", 1)]),
        "trailing whitespace": (2, 0, [("'  '", 1)]),
        "Unicode NFC": (2, 0, [("'e\\u0301'", 1)]),
        "near line dedup": (6, 3, [("'a'", 1), ("''", 1), ("'A!'", 1)]),
    }
    assert "7 -> 4 lines" in report.format()


def test_normalization_forms_differ_as_documented():
    assert data.normalize_unicode("e\u0301") == "é" and data.normalize_unicode("ﬁ x²") == "ﬁ x²"
    assert data.normalize_unicode("ﬁ x²", "NFKC") == "fi x2"
    with pytest.raises(ValueError, match="NFC, NFKC"):
        data.normalize_unicode("a", "NFD")


# ---------------------------------------------------------------------------------------------
# De-duplication
# ---------------------------------------------------------------------------------------------

lines_strategy = st.lists(st.sampled_from(["", "ROMEO:", "romeo", "To be, or not to be.", "to be or not  to be",
                                           "A horse! a horse!", "a horse a horse", " ", "x"]), max_size=30)


@given(lines=lines_strategy)
def test_exact_dedup_keeps_first_occurrences_in_order(lines):
    assert data.dedup_lines(lines) == list(dict.fromkeys(lines))


@given(lines=lines_strategy, min_chars=st.integers(0, 12))
def test_near_dedup_keeps_the_first_line_of_each_canonical_form_and_every_short_line(lines, min_chars):
    first_index = {}
    for index, line in enumerate(lines):
        first_index.setdefault(data.canonical_line(line), index)
    expected = [line for index, line in enumerate(lines)
                if len(data.canonical_line(line)) < min_chars or first_index[data.canonical_line(line)] == index]
    assert data.dedup_lines(lines, mode="near", min_chars=min_chars) == expected


def test_canonical_line_casefolds_drops_punctuation_and_collapses_whitespace():
    assert data.canonical_line("  To be, or NOT\tto   be?  ") == "to be or not to be"
    assert data.canonical_line("Straße — «quoted»") == "strasse quoted"


def test_dedup_min_chars_keeps_a_plays_structure():
    play = ["ROMEO:", "Hello.", "", "JULIET:", "Hello.", "", "ROMEO:", "A line long enough to count.", "",
            "JULIET:", "A line long enough to count."]
    assert data.dedup_lines(play) == ["ROMEO:", "Hello.", "", "JULIET:", "A line long enough to count."]
    assert data.dedup_lines(play, min_chars=20) == play[:-1]
    with pytest.raises(ValueError, match="'exact' or 'near'"):
        data.dedup_lines(play, mode="fuzzy")


# ---------------------------------------------------------------------------------------------
# Padding, attention masks, BERT pairs
# ---------------------------------------------------------------------------------------------


def test_pad_batch_matches_hand_built_tensors():
    batch = data.pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    left = data.pad_batch([[5, 6, 7], [8]], pad_id=9, max_length=2, side="left")
    assert torch.equal(left["input_ids"], torch.tensor([[5, 6], [9, 8]]))
    assert torch.equal(left["attention_mask"], torch.tensor([[1, 1], [0, 1]]))
    fixed = data.pad_batch([[5]], max_length=4, pad_to_max_length=True)
    assert fixed["input_ids"].tolist() == [[5, 0, 0, 0]] and fixed["input_ids"].dtype == torch.int64


@given(sequences=st.lists(st.lists(st.integers(1, 99), max_size=12), min_size=1, max_size=6),
       max_length=st.one_of(st.none(), st.integers(1, 10)), side=st.sampled_from(["right", "left"]))
def test_pad_batch_invariants(sequences, max_length, side):
    batch = data.pad_batch(sequences, pad_id=0, max_length=max_length, side=side)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    kept = [s[:max_length] if max_length else s for s in sequences]
    assert ids.shape == mask.shape == (len(sequences), max(map(len, kept)))
    assert mask.sum(dim=1).tolist() == [len(s) for s in kept]
    for row, sequence in enumerate(kept):
        assert ids[row][mask[row].bool()].tolist() == sequence  # the real tokens, in order
        assert (ids[row][~mask[row].bool()] == 0).all()
        real = mask[row].tolist()
        assert real == sorted(real, reverse=(side == "right"))  # padding all on one side


def test_encode_pair_matches_berts_layout():
    ids, types = data.encode_pair([10, 11], [20, 21, 22], cls_id=2, sep_id=3, max_length=16)
    assert ids == [2, 10, 11, 3, 20, 21, 22, 3] and types == [0, 0, 0, 0, 1, 1, 1, 1]
    ids, types = data.encode_pair([10, 11, 12, 13, 14], [20, 21], cls_id=2, sep_id=3, max_length=7)
    assert ids == [2, 10, 11, 3, 20, 21, 3] and types == [0, 0, 0, 0, 1, 1, 1]  # the longer side lost 3 tokens
    ids, types = data.encode_pair([10, 11], [20, 21], cls_id=2, sep_id=3, max_length=6)
    assert ids == [2, 10, 11, 3, 20, 3]  # a tie trims the second sentence
    assert data.encode_pair([10, 11, 12], cls_id=2, sep_id=3, max_length=4) == ([2, 10, 11, 3], [0, 0, 0, 0])
    with pytest.raises(ValueError, match="at least 3"):
        data.encode_pair([1], [2], cls_id=2, sep_id=3, max_length=2)


@given(a=st.lists(st.integers(10, 99), max_size=20), b=st.lists(st.integers(10, 99), max_size=20), max_length=st.integers(3, 30))
def test_encode_pair_invariants(a, b, max_length):
    ids, types = data.encode_pair(a, b, cls_id=2, sep_id=3, max_length=max_length)
    assert len(ids) == len(types) == min(len(a) + len(b) + 3, max_length)
    n_a = types.count(0) - 2
    kept_a, kept_b = ids[1: 1 + n_a], ids[n_a + 2: -1]
    assert ids[0] == 2 and ids[n_a + 1] == 3 and ids[-1] == 3 and types == sorted(types)
    assert kept_a == a[: len(kept_a)] and kept_b == b[: len(kept_b)]  # truncation only cuts ends
    # Only the longer side loses tokens, B on a tie: a trimmed A is never shorter than B,
    # a trimmed B at most one shorter than A (both trimmed: they end equal or A one longer).
    if len(kept_a) < len(a):
        assert len(kept_a) >= len(kept_b)
    if len(kept_b) < len(b):
        assert len(kept_b) >= len(kept_a) - 1


def test_encode_pair_batch_pads_ids_types_and_mask_together():
    batch = data.encode_pair_batch([([10, 11], [20]), ([10], None)], cls_id=2, sep_id=3, pad_id=0, max_length=8)
    assert batch["input_ids"].tolist() == [[2, 10, 11, 3, 20, 3], [2, 10, 3, 0, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]


def test_pad_batch_rejects_bad_arguments():
    for kwargs, message in [(dict(side="middle"), "'right' or 'left'"), (dict(max_length=0), "at least 1"),
                            (dict(pad_to_max_length=True), "needs a max_length"),
                            (dict(token_type_ids=[[0]]), "same length")]:
        with pytest.raises(ValueError, match=message):
            data.pad_batch([[1, 2]], **kwargs)
    with pytest.raises(ValueError, match="at least one"):
        data.pad_batch([])


# ---------------------------------------------------------------------------------------------
# Language-model blocks over a memmap
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def token_file(tmp_path):
    ids = np.random.default_rng(0).integers(0, 1000, size=5003)
    return data.write_token_ids(tmp_path / "train.bin", ids, vocab_size=1000), ids


def test_token_file_round_trips_with_the_smallest_dtype(tmp_path, token_file):
    path, ids = token_file
    opened = data.open_token_ids(path)
    assert isinstance(opened, np.memmap) and opened.dtype == np.uint16 and np.array_equal(opened, ids)
    assert path.stat().st_size == 2 * len(ids)
    big = data.write_token_ids(tmp_path / "big.bin", [[0, 70_000], np.array([65_536])], vocab_size=100_000)
    assert data.open_token_ids(big).dtype == np.uint32 and data.open_token_ids(big).tolist() == [0, 70_000, 65_536]
    from_tensor = data.write_token_ids(tmp_path / "t.bin", torch.tensor([3, 1, 2]), vocab_size=4)
    assert data.open_token_ids(from_tensor).tolist() == [3, 1, 2]
    assert data.token_dtype(65_536) == np.uint16 and data.token_dtype(65_537) == np.uint32


def test_token_files_refuse_bad_ids_empty_data_and_damage(tmp_path, token_file):
    with pytest.raises(ValueError, match="token id 70000 is outside"):
        data.write_token_ids(tmp_path / "x.bin", [1, 70_000], vocab_size=65_536)
    with pytest.raises(MinillmError, match="empty"):
        data.write_token_ids(tmp_path / "x.bin", [], vocab_size=10)
    assert not (tmp_path / "x.bin").exists() and not list(tmp_path.glob(".x.bin.*"))  # no half-written file left
    with pytest.raises(MinillmError, match="does not exist"):
        data.open_token_ids(tmp_path / "nothing.bin")
    path, _ = token_file
    with open(path, "ab") as handle:
        handle.write(b"\x00")
    with pytest.raises(MinillmError, match="damaged"):
        data.open_token_ids(path)


@given(batch_size=st.integers(1, 8), block_size=st.integers(1, 64), seed=st.integers(0, 2**31 - 1))
def test_sampled_blocks_are_slices_of_the_array_and_y_is_x_shifted(batch_size, block_size, seed):
    ids = np.arange(1000, dtype=np.uint16)[::-1].copy()  # distinct values: a block's position is recoverable
    x, y = data.sample_lm_batch(ids, batch_size, block_size, torch.Generator().manual_seed(seed))
    assert x.shape == y.shape == (batch_size, block_size) and x.dtype == y.dtype == torch.int64
    starts = torch.randint(len(ids) - block_size, (batch_size,), generator=torch.Generator().manual_seed(seed))
    for row, start in enumerate(starts.tolist()):
        assert x[row].tolist() == ids[start: start + block_size].tolist()
        assert y[row].tolist() == ids[start + 1: start + block_size + 1].tolist()


@given(batch_size=st.integers(1, 5), world_size=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_data_parallel_shares_are_disjoint_rows_of_the_single_process_batch(batch_size, world_size, seed):
    ids = np.arange(500, dtype=np.uint16)
    whole_x, whole_y = data.sample_lm_batch(ids, batch_size * world_size, 8, torch.Generator().manual_seed(seed))
    shares = [data.sample_lm_batch(ids, batch_size, 8, torch.Generator().manual_seed(seed), rank=rank, world_size=world_size)
              for rank in range(world_size)]
    assert torch.equal(torch.cat([x for x, _ in shares]), whole_x) and torch.equal(torch.cat([y for _, y in shares]), whole_y)
    with pytest.raises(ValueError, match="rank"):
        data.sample_lm_batch(ids, batch_size, 8, torch.Generator(), rank=world_size, world_size=world_size)


def test_sampling_from_the_memmap_equals_sampling_from_memory_and_resumes_exactly(token_file):
    path, ids = token_file
    generator = torch.Generator().manual_seed(1337)
    first = data.sample_lm_batch(data.open_token_ids(path), 4, 32, generator)
    state = generator.get_state()
    second = data.sample_lm_batch(ids, 4, 32, generator)
    again = torch.Generator().manual_seed(1337)
    assert all(torch.equal(a, b) for a, b in zip(first, data.sample_lm_batch(ids, 4, 32, again)))
    resumed = torch.Generator()
    resumed.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(second, data.sample_lm_batch(ids, 4, 32, resumed)))
    assert not torch.equal(first[0], second[0])


@given(n_tokens=st.integers(2, 300), block_size=st.integers(1, 40), batch_size=st.integers(1, 5))
def test_sequential_blocks_cover_the_split_once_in_order(n_tokens, block_size, batch_size):
    ids = np.arange(n_tokens, dtype=np.uint16)
    if n_tokens < block_size + 1:
        with pytest.raises(MinillmError, match=f"block_size {block_size} needs at least {block_size + 1} tokens"):
            next(data.iter_lm_blocks(ids, block_size, batch_size))
        return
    batches = list(data.iter_lm_blocks(ids, block_size, batch_size))
    x = torch.cat([bx for bx, _ in batches]).flatten()
    y = torch.cat([by for _, by in batches]).flatten()
    n_blocks = (n_tokens - 1) // block_size
    assert x.tolist() == list(range(n_blocks * block_size)) and y.tolist() == list(range(1, n_blocks * block_size + 1))
    assert all(len(bx) == batch_size for bx, _ in batches[:-1]) and 1 <= len(batches[-1][0]) <= batch_size


def test_train_val_split_is_the_first_90_percent_and_the_rest(token_file):
    path, ids = token_file
    train, val = data.split_train_val(data.open_token_ids(path))
    assert len(train) == int(0.9 * len(ids)) and np.array_equal(np.concatenate([train, val]), ids)
    assert isinstance(train, np.memmap)
    with pytest.raises(ValueError, match="between 0 and 1"):
        data.split_train_val(ids, val_fraction=1.0)


def test_lm_blocks_give_clear_errors():
    with pytest.raises(MinillmError, match="empty"):
        data.sample_lm_batch(np.array([], dtype=np.uint16), 2, 4, torch.Generator())
    with pytest.raises(MinillmError, match="block_size 8 needs at least 9 tokens .* has 8"):
        data.sample_lm_batch(np.arange(8), 2, 8, torch.Generator())
    with pytest.raises(ValueError, match="at least 1"):
        data.sample_lm_batch(np.arange(8), 0, 4, torch.Generator())
    with pytest.raises(MinillmError, match="cannot split"):
        data.split_train_val(np.arange(1))
