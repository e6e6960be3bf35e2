"""Chapter 05: the Transformer, assembled from its parts and trained on a real seq2seq task.

Checks LayerNorm and GELU against PyTorch, draws the sinusoidal position table, then trains the
encoder-decoder Transformer of "Attention Is All You Need" to read English number words and write
the digits ("three hundred forty - two thousand five" -> "342005"), on numbers it has never seen,
with greedy and beam-search decoding, exact-match accuracy, corpus BLEU, and the cross-attention
that learned which word says which digit.

    python chapters/ch05_transformer.py            # the full chapter (a few minutes on a 2-core CPU)
    python chapters/ch05_transformer.py --quick    # seconds; what the tests run
"""

from __future__ import annotations

import pathlib
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from minillm import plots
from minillm.config import QuickConfig, run_chapter
from minillm.device import describe_device, pick_device, seed_everything
from minillm.files import write_json
from minillm.inference_runs import save_transformer_run
from minillm.layers import LayerNorm, gelu, sinusoidal_table
from minillm.number_words import (
    Vocabulary,
    dataset_capacity,
    detokenize,
    evaluate,
    label_smoothing_floor,
    make_batch,
    number_dataset,
    train_seq2seq,
)
from minillm.transformer import Transformer, TransformerConfig


@dataclass
class Config(QuickConfig):
    """Chapter 05: LayerNorm, GELU, positions, and an encoder-decoder Transformer trained on number words -> digits."""

    direction: Literal["words2digits", "digits2words"] = field(default="words2digits", metadata={"help": "which way to translate"})
    max_digits: int = field(default=6, metadata={"help": "numbers have 1 to this many digits (uniformly many)"})
    n_train: int = field(default=20_000, metadata={"help": "training pairs (distinct numbers)"})
    n_val: int = field(default=500, metadata={"help": "validation pairs, for the loss curve"})
    n_test: int = field(default=1000, metadata={"help": "held-out test pairs for exact match and BLEU"})
    d_model: int = field(default=64, metadata={"help": "model width"})
    n_heads: int = field(default=4, metadata={"help": "attention heads"})
    n_layers: int = field(default=2, metadata={"help": "encoder layers, and as many decoder layers"})
    dropout: float = field(default=0.1, metadata={"help": "dropout probability"})
    norm_first: bool = field(default=True, metadata={"help": "pre-norm blocks (--no-norm-first: the paper's post-norm)"})
    steps: int = field(default=2000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=64, metadata={"help": "pairs per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (AdamW, warmup then cosine)"})
    beam_size: int = field(default=4, metadata={"help": "beam width for beam-search decoding"})
    device: str = field(default="auto", metadata={"help": "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps"})
    seed: int = field(default=1337, metadata={"help": "random seed (data, initialization, batches)"})
    out: str = field(default="runs/ch05", metadata={"help": "folder for plots and results.json"})
    QUICK = {"max_digits": 4, "n_train": 1500, "n_val": 100, "n_test": 100, "d_model": 32, "n_layers": 1, "steps": 120}

    def validate(self):
        for name in ("max_digits", "n_train", "n_val", "n_test", "d_model", "n_heads", "n_layers", "steps", "batch_size", "beam_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.max_digits <= 12:
            raise ValueError(f"--max-digits must be between 1 and 12, got {self.max_digits}")
        if self.d_model % self.n_heads or self.d_model % 2:
            raise ValueError(f"--d-model ({self.d_model}) must be even and divisible by --n-heads ({self.n_heads})")
        held_out, train = dataset_capacity(self.max_digits)
        if self.n_val + self.n_test > held_out or self.n_train > train:
            raise ValueError(f"numbers of at most {self.max_digits} digits give at most {held_out:,} val + test pairs "
                             f"and {train:,} training pairs: lower the counts or raise --max-digits")
        if self.batch_size > self.n_train:
            raise ValueError(f"--batch-size ({self.batch_size}) cannot exceed --n-train ({self.n_train})")
        if not 0.0 <= self.dropout < 1.0 or not self.lr > 0:
            raise ValueError("--dropout must be in [0, 1) and --lr positive")


def main(config: Config) -> dict:
    out = pathlib.Path(config.out)
    seed_everything(config.seed)
    device = pick_device(config.device)
    print(f"Running on {describe_device(device, 'fp32')}")  # its loop (minillm.number_words) runs in fp32

    # 1. The parts, checked against PyTorch (tests/test_layers.py does this for random shapes, and
    #    for whole encoder and decoder blocks against torch.nn.TransformerEncoderLayer / DecoderLayer).
    x = torch.randn(4, 10, 64, dtype=torch.float64) * 3 + 1
    norm = LayerNorm(64, fast_path=False).double()
    layer_norm_error = (norm(x) - F.layer_norm(x, (64,))).abs().max().item()
    gelu_error = max((gelu(x, a) - F.gelu(x, approximate=a)).abs().max().item() for a in ("none", "tanh"))
    print(f"\n1. LayerNorm by hand vs F.layer_norm: max difference {layer_norm_error:.1e}; "
          f"GELU (exact and tanh) vs F.gelu: {gelu_error:.1e}")
    plots.plot_heatmap(sinusoidal_table(64, 64), out / "positions.png", xlabel="feature (sin, cos pairs)",
                       ylabel="position", title="Sinusoidal positions: one clock per feature pair, slower to the right")

    # 2. The task: numbers the model never saw in training, in both splits every length.
    splits = number_dataset(config.n_train, config.n_val, config.n_test, config.max_digits, config.seed, config.direction)
    src_vocab = Vocabulary.from_sequences(s for s, _ in splits.train)
    tgt_vocab = Vocabulary.from_sequences(t for _, t in splits.train)
    print(f"\n2. {config.direction}: {len(splits.train):,} train / {len(splits.val):,} val / {len(splits.test):,} test "
          f"pairs over disjoint numbers of 1-{config.max_digits} digits; vocabularies {len(src_vocab)} -> {len(tgt_vocab)}")
    for source, target in splits.train[:3]:
        print(f"   {detokenize(source)!r:>60} -> {detokenize(target)!r}")

    # 3. The model and its training (teacher forcing, label smoothing 0.1, warmup + cosine).
    longest = max(max(len(s), len(t)) for split in (splits.train, splits.val, splits.test) for s, t in split) + 2
    model_config = TransformerConfig(len(src_vocab), len(tgt_vocab), d_model=config.d_model, n_heads=config.n_heads,
                                     n_encoder_layers=config.n_layers, n_decoder_layers=config.n_layers,
                                     d_ff=4 * config.d_model, dropout=config.dropout, max_len=longest,
                                     norm_first=config.norm_first)
    model = Transformer(model_config).to(device)
    print(f"\n3. Transformer, {model.num_parameters():,} parameters: {config.n_layers}+{config.n_layers} "
          f"{'pre' if config.norm_first else 'post'}-norm layers, d_model {config.d_model}, {config.n_heads} heads")
    history = train_seq2seq(model, splits.train, splits.val, src_vocab, tgt_vocab, steps=config.steps,
                            batch_size=config.batch_size, lr=config.lr, warmup_steps=max(1, config.steps // 20),
                            eval_every=max(1, config.steps // 20), seed=config.seed, device=device)
    floor = label_smoothing_floor(0.1, len(tgt_vocab))  # the smoothed targets' own entropy
    plots.plot_loss_curves({"train, label-smoothed (moving average)": (history.steps, plots.smooth(history.train_loss, 0.9)),
                            "validation (no smoothing)": (history.val_steps, history.val_loss),
                            "floor of the label-smoothed loss": ([0, config.steps - 1], [floor, floor])},
                           out / "training_curve.png", title=f"Transformer on {config.direction}", logy=True)
    print(f"   {config.steps} steps in {history.seconds:.0f} s; final validation loss {history.val_loss[-1]:.4f} nats/token; "
          f"training loss {sum(history.train_loss[-50:]) / len(history.train_loss[-50:]):.3f}, whose floor with label "
          f"smoothing 0.1 is {floor:.3f}")

    number_data = dict(n_train=config.n_train, n_val=config.n_val, n_test=config.n_test, max_digits=config.max_digits,
                       seed=config.seed, direction=config.direction)
    save_transformer_run(out / "model", model, src_vocab, tgt_vocab, number_data)  # python -m minillm evaluate --run it

    # 4. Decoding the test set: greedy, then beam search.
    greedy = evaluate(model, splits.test, src_vocab, tgt_vocab, device=device)
    beam = evaluate(model, splits.test, src_vocab, tgt_vocab, beam_size=config.beam_size, device=device)
    print(f"\n4. Held-out test set ({len(splits.test):,} numbers never seen in training):")
    print("   | decoding | exact match | BLEU | time |\n   | --- | --- | --- | --- |")
    print(f"   | greedy | {greedy.exact_match:.1%} | {greedy.bleu:.2f} | {greedy.seconds:.1f} s |")
    print(f"   | beam search, {config.beam_size} beams | {beam.exact_match:.1%} | {beam.bleu:.2f} | {beam.seconds:.1f} s |")
    lengths = [len(t if config.direction == "words2digits" else s) for s, t in splits.test]  # digits of each number
    by_length = {n: [p == t for (_, t), p, m in zip(splits.test, greedy.predictions, lengths) if m == n] for n in sorted(set(lengths))}
    print("   greedy exact match by number of digits: " + ", ".join(
        f"{n}: {sum(ok) / len(ok):.0%} of {len(ok)}" for n, ok in by_length.items()))
    mistakes = [(s, t, p) for (s, t), p in zip(splits.test, greedy.predictions) if p != t]
    for source, target, prediction in mistakes[:6]:
        print(f"   wrong: {detokenize(source)!r} -> {detokenize(prediction)!r} (expected {detokenize(target)!r})")

    # 5. What cross-attention learned: for each output token, where in the source it looked.
    example = max(splits.test, key=lambda pair: len(pair[0]))
    src, tgt_in, _ = make_batch([example], src_vocab, tgt_vocab, device)
    cross = model.attention_maps(src, tgt_in)["cross"][-1][0]  # (n_heads, T, S), last decoder layer
    plots.plot_attention(cross, out / "cross_attention.png", x_labels=example[0],
                         y_labels=["[BOS]", *example[1]], titles=[f"head {h}" for h in range(cross.shape[0])],
                         xlabel="source token", ylabel="decoder input (predicting the next token)",
                         columns=min(4, cross.shape[0]), title="Cross-attention of the last decoder layer")
    print(f"\n5. Cross-attention of {detokenize(example[0])!r} saved to {out / 'cross_attention.png'}")

    summary = {
        f"test exact match, greedy / beam {config.beam_size}": f"{greedy.exact_match:.1%} / {beam.exact_match:.1%}",
        f"test BLEU, greedy / beam {config.beam_size}": f"{greedy.bleu:.2f} / {beam.bleu:.2f}",
        "parameters, training time": f"{model.num_parameters():,}, {history.seconds:.0f} s",
        "LayerNorm / GELU vs torch (max abs difference)": f"{layer_norm_error:.1e} / {gelu_error:.1e}",
    }
    results = {"greedy": {"exact_match": greedy.exact_match, "bleu": greedy.bleu},
               "beam": {"exact_match": beam.exact_match, "bleu": beam.bleu, "beam_size": config.beam_size},
               "final_val_loss": history.val_loss[-1], "train_seconds": history.seconds,
               "parameters": model.num_parameters(), "config": asdict(config), "summary": summary}
    write_json(out / "results.json", results)
    print(f"\nSaved {out / 'training_curve.png'}, {out / 'positions.png'} and {out / 'results.json'}")
    return results


if __name__ == "__main__":
    run_chapter(main, Config)
