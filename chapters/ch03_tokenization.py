"""Chapter 03: data and tokenization, from raw text to batches of token ids.

Cleans and de-duplicates Tiny Shakespeare and SST-2 (and shows why a play must not be
line-deduplicated blindly), builds a character vocabulary, trains a byte-level BPE written from
scratch and the `tokenizers` library's BPE and WordPiece, compares them on held-out text, then
pads, masks and pairs sentences for BERT and writes language-model blocks for GPT to a memmap.

    python chapters/ch03_tokenization.py            # the full chapter (under a minute on a 2-core CPU)
    python chapters/ch03_tokenization.py --quick    # seconds; what the tests run
"""

from __future__ import annotations

import pathlib
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from minillm import data, datasets, plots, runs
from minillm.config import QuickConfig, run_chapter
from minillm.files import write_json
from minillm.tokenization import (
    BPETokenizer,
    CharTokenizer,
    UnknownCharacterError,
    bpe_vocab_overlap,
    compression,
    load_library_tokenizer,
    save_library_tokenizer,
    special_token_ids,
    train_library_bpe,
    train_wordpiece,
)


@dataclass
class Config(QuickConfig):
    """Chapter 03: cleaning, dedup, char / BPE / WordPiece tokenizers compared, padding and LM blocks."""

    vocab_size: int = field(default=1000, metadata={"help": "vocabulary size of every subword tokenizer in the comparison"})
    curve_max_vocab: int = field(default=4000, metadata={"help": "largest vocabulary on the compression-vs-size curve"})
    wordpiece_vocab_size: int = field(default=8000, metadata={"help": "vocabulary of the SST-2 WordPiece saved for BERT"})
    dedup_min_chars: int = field(default=30, metadata={"help": "lines shorter than this are never de-duplicated"})
    n_chars: int = field(default=0, metadata={"help": "use only the first N characters of Tiny Shakespeare (0: all)"})
    n_sst2: int = field(default=0, metadata={"help": "use only the first N SST-2 training phrases (0: all 67,349)"})
    block_size: int = field(default=64, metadata={"help": "tokens per language-model block in the batch example"})
    seed: int = field(default=1337, metadata={"help": "random seed of the batch sampler"})
    out: str = field(default="runs/ch03", metadata={"help": "folder for tokenizers, token files, plots and results.json"})
    QUICK = {"vocab_size": 300, "curve_max_vocab": 400, "wordpiece_vocab_size": 1000, "n_chars": 100_000, "n_sst2": 3000}

    def validate(self):
        if self.vocab_size < 261:
            raise ValueError(f"--vocab-size must be at least 261 (256 bytes + 5 special tokens), got {self.vocab_size}")
        if self.curve_max_vocab < self.vocab_size:
            raise ValueError("--curve-max-vocab must be at least --vocab-size")
        for name in ("wordpiece_vocab_size", "block_size"):
            if getattr(self, name) < 8:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 8, got {getattr(self, name)}")
        if min(self.n_chars, self.n_sst2, self.dedup_min_chars) < 0:
            raise ValueError("--n-chars, --n-sst2 and --dedup-min-chars cannot be negative")


def tokenize(tokenizer, text: str) -> tuple[list[int], list[str]]:
    """Ids and the pieces they stand for, from our tokenizers and the library's alike."""
    if isinstance(tokenizer, (CharTokenizer, BPETokenizer)):
        ids = tokenizer.encode(text)
        return ids, tokenizer.token_strings(ids)
    encoding = tokenizer.encode(text)
    return encoding.ids, encoding.tokens


def cleaning(shakespeare: str, sst2: list[str], sst2_dev: list[str], min_chars: int) -> dict:
    blind = data.clean_text(shakespeare, dedup="exact")
    careful = data.clean_text(shakespeare, dedup="near", dedup_min_chars=min_chars)
    phrases = data.clean_text("\n".join(sst2), dedup="near")
    train_keys = {data.canonical_line(s) for s in sst2}
    leaked = sum(data.canonical_line(s) in train_keys for s in sst2_dev)
    print(f"1. Cleaning Tiny Shakespeare with exact dedup of every line:\n{blind.format()}\n"
          "   That deletes the blank lines between speeches and the repeated speaker names ('ROMEO:'): the play's\n"
          f"   structure, not duplicated documents. Near dedup of lines of {min_chars}+ characters only:\n{careful.format()}\n"
          "   Even those are mostly real repetitions (a refrain, a greeting answered in kind), so we keep every line of the\n"
          "   play; dedup earns its keep on web crawls, where whole documents repeat.\n"
          f"   SST-2 training phrases, near dedup (phrases are nested pieces of sentences):\n{phrases.format()}\n"
          "   They differ only in case or punctuation ('beautiful ,' / 'beautiful'); each is a labelled node of the treebank,\n"
          "   so a classifier keeps them. What matters is leakage: SST-2 dev sentences that also occur in train "
          f"(canonical form): {leaked} of {len(sst2_dev)}")
    return {"shakespeare_exact_lines_removed": blind.steps[-1].lines_removed, "sst2_dev_in_train": leaked,
            "shakespeare_near_long_lines_removed": careful.steps[-1].lines_removed,
            "sst2_near_lines_removed": phrases.steps[-1].lines_removed}


def compare(title: str, train_text: str | list[str], held_out: str, vocab_size: int) -> tuple[dict, dict]:
    """Char, our BPE, library BPE and WordPiece trained on the same text, scored on the same held-out text."""
    start = time.perf_counter()
    ours = BPETokenizer.train(train_text, vocab_size)
    seconds = time.perf_counter() - start
    corpus = train_text if isinstance(train_text, str) else "\n".join(train_text)
    tokenizers = {"characters": CharTokenizer.train(corpus, unknown="unk"), "our BPE": ours,
                  "library BPE": train_library_bpe(train_text, vocab_size), "library WordPiece": train_wordpiece(train_text, vocab_size)}
    stats, lines = {}, ["| tokenizer | vocabulary | tokens | tokens/char | chars/token | unknown |", "|" + " --- |" * 6]
    for name, tokenizer in tokenizers.items():
        ids, _ = tokenize(tokenizer, held_out)
        vocab = len(tokenizer) if isinstance(tokenizer, (CharTokenizer, BPETokenizer)) else tokenizer.get_vocab_size()
        unknown = ids.count(0) if name == "characters" else ids.count(1) if name == "library WordPiece" else 0
        c = compression(held_out, ids)
        stats[name] = {"vocab": vocab, "tokens": c.n_tokens, "chars_per_token": c.chars_per_token, "unknown": unknown}
        lines.append(f"| {name} | {vocab:,} | {c.n_tokens:,} | {c.tokens_per_char:.3f} | {c.chars_per_token:.2f} | {unknown:,} |")
    overlap = bpe_vocab_overlap(ours, tokenizers["library BPE"])
    print(f"\n{title} ({len(held_out):,} characters; our BPE trained in {seconds:.2f} s)\n" + "\n".join(lines) +
          f"\nOur BPE and the library's share {overlap['shared']} of their {overlap['ours']} / {overlap['library']} merged tokens.")
    return stats | {"overlap": overlap, "our_bpe_train_seconds": seconds}, tokenizers


def main(config: Config) -> dict:
    out = pathlib.Path(config.out)
    runs.check_results_folder(out)  # tokenizers, token files and results: never into a training run's folder
    shakespeare = data.read_text_file(datasets.tiny_shakespeare_path())[: config.n_chars or None]
    sst2, sst2_dev = datasets.read_sst2("train")[0][: config.n_sst2 or None], datasets.read_sst2("dev")[0]
    results = {"cleaning": cleaning(shakespeare, sst2, sst2_dev, config.dedup_min_chars)}

    chars = CharTokenizer.train(shakespeare)
    print(f"\n2. Characters: {len(chars)} symbols {''.join(chars.chars)!r}")
    try:
        chars.encode("Thou art a villain — ay!")
    except UnknownCharacterError as error:
        print(f"   encode('Thou art a villain — ay!') -> UnknownCharacterError: {error}")

    print(f"\n3. Byte-level BPE from scratch: {config.vocab_size:,} tokens on all {len(shakespeare):,} characters")
    start = time.perf_counter()
    bpe = BPETokenizer.train(shakespeare, config.vocab_size, progress=True)
    train_seconds, start = time.perf_counter() - start, time.perf_counter()
    ids = bpe.encode(shakespeare)
    encode_seconds = time.perf_counter() - start
    assert bpe.decode(ids) == shakespeare
    longest = sorted(range(256, len(bpe)), key=lambda i: -len(bpe.vocab[i]))[:8]
    print(f"   trained in {train_seconds:.2f} s; encoded the whole corpus ({len(ids):,} tokens) in {encode_seconds:.2f} s; "
          f"decodes exactly\n   first merges {bpe.token_strings(range(256, 266))}\n   longest tokens {bpe.token_strings(longest)}")
    results["bpe"] = {"train_seconds": train_seconds, "encode_seconds": encode_seconds, "tokens": len(ids)}

    train_text, held_out = datasets.split_text(shakespeare)  # nanoGPT's 90/10
    results["shakespeare"], tokenizers = compare("4. Tiny Shakespeare: trained on the first 90%, scored on the last 10%",
                                                 train_text, held_out, config.vocab_size)
    results["sst2"], _ = compare("   SST-2: trained on the training phrases, scored on the dev sentences", sst2,
                                 "\n".join(sst2_dev), config.vocab_size)
    sizes = [s for s in (256, 300, 400, 500, 750, 1000, 1500, 2000, 3000, 4000, 6000, 8000) if s <= config.curve_max_vocab]
    largest = BPETokenizer.train(train_text, config.curve_max_vocab)  # BPE is greedy: its first k merges = training to 256 + k
    truncated = [BPETokenizer(list(largest.merges)[: s - 256]) for s in sizes]
    seen = [len(train_text) / len(t.encode(train_text)) for t in truncated]
    unseen = [len(held_out) / len(t.encode(held_out)) for t in truncated]
    library = [len(held_out) / len(train_library_bpe(train_text, s + 5).encode(held_out).ids) for s in sizes[1:]]
    plots.plot_panels([{"curves": {"our BPE, training text": (sizes, seen), "our BPE, held-out text": (sizes, unseen)},
                        "scatter": {"library BPE, held-out text": (sizes[1:], library)}, "ylabel": "characters per token",
                        "xlabel": "vocabulary size (library: plus 5 special tokens)"}], out / "compression.png",
                      title="Tiny Shakespeare: more merges, longer tokens (a little less so on unseen text)")
    results["compression_curve"] = {"sizes": sizes, "training": seen, "held_out": unseen, "library_held_out": library}

    wordpiece = train_wordpiece(sst2, config.wordpiece_vocab_size)
    wordpiece = load_library_tokenizer(save_library_tokenizer(wordpiece, out / "wordpiece_sst2.json"))
    special = special_token_ids(wordpiece)
    tokenizers["WordPiece (SST-2)"] = wordpiece
    print(f"\n5. How each splits a sentence (Ġ: the library's spelling of a space byte; WordPiece (SST-2): "
          f"{wordpiece.get_vocab_size():,} tokens, {special})")
    for sentence in ("To be, or not to be: that is the question.", "an unflinching, bittersweet masterpiece"):
        print(f"   {sentence!r}")
        for name, tokenizer in tokenizers.items():
            pieces = tokenize(tokenizer, sentence)[1]
            print(f"     {name:<18} {len(pieces):>3}  {'|'.join(pieces)}")

    lengths = [len(wordpiece.encode(s).ids) + 2 for s in sst2_dev]
    p99 = float(np.percentile(lengths, 99))
    plots.plot_histogram({"SST-2 dev": lengths}, out / "sst2_lengths.png", bins=range(max(lengths) + 2),
                         xlabel="WordPiece tokens incl. [CLS] and [SEP]",
                         title="How long BERT's inputs are: choose max_length", markers={f"99th percentile ({p99:.0f})": p99})
    a, b = (wordpiece.encode(s).ids for s in sst2_dev[:2])
    batch = data.encode_pair_batch([(a, b), (b[:4], None)], cls_id=special.cls, sep_id=special.sep, pad_id=special.pad, max_length=16)
    print(f"\n6. A BERT batch: a pair of {len(a)} + {len(b)} tokens cut to 16 (the longer side loses tokens), and a short single "
          "sentence padded to the same length")
    print(f"   {'tokens':<15} {[wordpiece.id_to_token(i) for i in batch['input_ids'][0].tolist()]}")
    for name, tensor in batch.items():
        print(f"   {name:<15} {tensor.tolist()}")

    bpe = tokenizers["our BPE"]  # trained on the first 90% only, so validation text stays unseen
    bpe.save(out / "bpe_shakespeare.json")
    token_file = data.write_token_ids(out / "shakespeare_bpe.bin", bpe.encode(shakespeare), vocab_size=len(bpe))
    train_ids, val_ids = data.split_train_val(data.open_token_ids(token_file))
    x, y = data.sample_lm_batch(train_ids, 4, config.block_size, generator=torch.Generator().manual_seed(config.seed))
    n_val_blocks = sum(len(bx) for bx, _ in data.iter_lm_blocks(val_ids, config.block_size, batch_size=64))
    print(f"\n7. {token_file}: {len(train_ids) + len(val_ids):,} {train_ids.dtype} ids on disk, opened as a memmap; "
          f"{len(train_ids):,} train / {len(val_ids):,} val ({n_val_blocks} val blocks of {config.block_size})\n"
          f"   a batch: x {tuple(x.shape)} {x.dtype}, y = x shifted by one; x[0] reads {bpe.decode(x[0].tolist())[:60]!r}")

    sh = results["shakespeare"]
    summary = {
        f"our BPE, {config.vocab_size:,} tokens, {len(shakespeare):,} chars: train / encode all (s)": f"{train_seconds:.2f} / {encode_seconds:.2f}",
        "held-out Shakespeare chars/token: char / our BPE / library BPE / WordPiece": " / ".join(
            f"{sh[k]['chars_per_token']:.2f}" for k in ("characters", "our BPE", "library BPE", "library WordPiece")),
        "merged tokens shared by our BPE and the library's": f"{sh['overlap']['shared']} of {sh['overlap']['ours']}",
        "Tiny Shakespeare lines removed by blind exact dedup": f"{results['cleaning']['shakespeare_exact_lines_removed']:,}",
        "SST-2 training phrases removed by near dedup": f"{results['cleaning']['sst2_near_lines_removed']:,}",
    }
    write_json(out / "results.json", results | {"config": asdict(config), "summary": summary})
    print(f"\nSaved {out / 'compression.png'}, {out / 'sst2_lengths.png'}, the tokenizers, the token file and {out / 'results.json'}")
    return results


if __name__ == "__main__":
    run_chapter(main, Config)
