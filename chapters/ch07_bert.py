"""Chapter 07: BERT, pretrained by masked language modelling and next-sentence prediction.

Cuts IMDB's 50,000 unlabelled movie reviews (11.6 million words, none of them a review chapter 08
scores on) into sentences, packs consecutive sentences into segments and pairs them for
next-sentence prediction, trains a WordPiece vocabulary on the reviews and SST-2's phrases, masks
15% of the tokens afresh at every draw (80% [MASK], 10% random, 10% unchanged), pretrains a small
BERT with the shared loop, and reports held-out masked-LM loss and accuracy, next-sentence accuracy,
and fill-in-the-blank predictions.

    python chapters/ch07_bert.py            # a CPU: a 4-layer, 128-wide BERT in ~10 minutes
    python chapters/ch07_bert.py --quick    # seconds; what the tests run
"""

from __future__ import annotations

import pathlib
from dataclasses import asdict, dataclass, field

import torch

from minillm import data, datasets, plots, runs
from minillm.bert import BertForPreTraining
from minillm.bert_pretraining import BertPretrainConfig, bert_corpus, bert_task, evaluate_bert, fill_in
from minillm.config import run_chapter
from minillm.device import describe_device, pick_device, seed_everything
from minillm.files import read_json, write_json
from minillm.tokenization import save_library_tokenizer, special_token_ids
from minillm.train import Trainer

# On a GPU: BERT-small's shape (Turc et al., 2019: 4 layers, 512 wide, 8 heads) with BERT's dropout, 10,000 steps of
# 256 pairs (~250M tokens, ten passes over the reviews).
GPU_PRESET = dict(n_layer=4, n_head=8, n_embd=512, dropout=0.1, batch_size=256, max_iters=10000, lr=5e-4,
                  min_lr=5e-5, warmup_iters=1000)
PROBES = ["this movie was [MASK] good .", "the acting is [MASK] and the plot is dull .",
          "a [MASK] , funny and moving film .", "i [MASK] this movie .", "the worst film i have ever [MASK] .",
          "10 out of 10 , a [MASK] !"]


@dataclass
class Config(BertPretrainConfig):
    """Chapter 07: pretrain a BERT on IMDB's unlabelled reviews (masked LM + next sentence), evaluate, fill in blanks."""

    out: str = field(default="runs/ch07", metadata={"help": "run folder; a run already there is kept: --resume continues it, --overwrite replaces it"})
    gpu_preset: bool = field(default=True, metadata={"help": "on CUDA, train a BERT-small shape (4x512) for 10,000 steps "
                                                            "of 256 pairs"})


def main(config: Config) -> dict:
    out = pathlib.Path(config.out)
    device = pick_device(config.device)
    if device.type == "cuda" and config.gpu_preset and not config.quick:
        config = Config(**{**asdict(config), **GPU_PRESET})
    runs.check_run_folder(out, config.resume, config.overwrite, kind="bert")  # before any work: a run there is kept
    seed_everything(config.seed)
    print(f"Running on {describe_device(device, config.precision)}")

    # 1. Data: reviews cut into sentences, a held-out slice of reviews, WordPiece, packed NSP pairs, masking.
    if config.data == "imdb":
        review = datasets.read_imdb_unlabelled()[1]
        print(f"A review, cut into sentences ({len(review.split())} words):")
        for sentence in data.split_sentences(review)[:4]:
            print(f"  | {sentence}")
    tokenizer, train_docs, val_docs = bert_corpus(config)
    task = bert_task(config, tokenizer, train_docs, val_docs)
    special = special_token_ids(tokenizer)
    ids, types, label = task.train_examples[0]
    print(f"A pair ({'IsNext' if label == 0 else 'NotNext'}): {' '.join(tokenizer.id_to_token(i) for i in ids)}\n"
          f"  token types: {list(types)}")
    example = task.sample_batch(1, torch.Generator().manual_seed(0), "cpu")
    shown = [tokenizer.id_to_token(i) if l == -100 else f"{tokenizer.id_to_token(i)}<{tokenizer.id_to_token(l)}>"
             for i, l in zip(example.input_ids[0].tolist(), example.mlm_labels[0].tolist())]
    print(f"  masked (token<original> where a prediction is asked): {' '.join(shown)}")
    counts = torch.zeros(3)
    for seed in range(200):  # where the selected 15% go: [MASK], a random token, unchanged
        b = task.sample_batch(64, torch.Generator().manual_seed(seed), "cpu")
        chosen = b.mlm_labels != -100
        shown_ids, original = b.input_ids[chosen], b.mlm_labels[chosen]
        n_mask, n_same = (shown_ids == special.mask).sum(), (shown_ids == original).sum()
        counts += torch.stack([n_mask, len(shown_ids) - n_mask - n_same, n_same])
    share = counts / counts.sum()
    print(f"  of the selected tokens: {share[0]:.1%} [MASK], {share[1]:.1%} random, {share[2]:.1%} unchanged (80/10/10)")

    # 2. The model, and 3. pretraining with the shared loop.
    model = BertForPreTraining(config.model_config(tokenizer.get_vocab_size(), special.pad))
    print(f"BERT: {sum(p.numel() for p in model.parameters()):,} parameters, {config.n_layer} layers x {config.n_embd}")
    run_info = runs.run_info("bert", model.config, data=config.data)
    trainer = Trainer(model, task, config, run_info)
    before = evaluate_bert(model, task, trainer.device)
    result = trainer.fit(prepare=lambda folder: save_library_tokenizer(tokenizer, folder / runs.TOKENIZER))

    # 4. Evaluation on the held-out pairs, and fill-in-the-blank.
    metrics = evaluate_bert(model, task, trainer.device)
    print(f"\nHeld-out ({metrics['pairs']:,} pairs, {metrics['masked_tokens']:,} masked tokens):\n"
          f"  masked-LM loss {before['mlm_loss']:.3f} -> {metrics['mlm_loss']:.3f}, accuracy {before['mlm_accuracy']:.1%} -> "
          f"{metrics['mlm_accuracy']:.1%}; next-sentence accuracy {before['nsp_accuracy']:.1%} -> {metrics['nsp_accuracy']:.1%}")
    model.eval()
    fills = {sentence: fill_in(model, tokenizer, sentence, device=trainer.device) for sentence in PROBES}
    for sentence, candidates in fills.items():
        print(f"  {sentence!r}: " + ", ".join(f"{word} {p:.0%}" for word, p in candidates))
    first = fills[PROBES[0]]
    plots.plot_bars({"P(word | context)": [p for _, p in first]}, [word for word, _ in first], out / "fill_in.png",
                    title=f"BERT fills in: {PROBES[0]!r}", ylabel="probability")

    summary = {
        "held-out masked-LM accuracy, before -> after": f"{before['mlm_accuracy']:.1%} -> {metrics['mlm_accuracy']:.1%}",
        "held-out masked-LM loss": f"{metrics['mlm_loss']:.3f}",
        "held-out next-sentence accuracy": f"{metrics['nsp_accuracy']:.1%}",
        **{f"fill-in {sentence!r}": ", ".join(word for word, _ in fills[sentence][:3]) for sentence in PROBES[:2]},
        "parameters, steps, training time": f"{sum(p.numel() for p in model.parameters()):,}, {result.steps:,}, {result.seconds:.0f} s",
        "training tokens/s": f"{result.tokens_per_s:,.0f}",
    }
    results = {**metrics, "before": before, "fill_in": fills, "train_seconds": result.seconds,
               "config": asdict(config), "summary": summary}
    write_json(out / "results.json", {**read_json(out / "results.json"), **results})
    print(f"\nSaved {out / 'loss.png'}, {out / 'fill_in.png'}, the checkpoints and {out / 'results.json'}")
    return results


if __name__ == "__main__":
    run_chapter(main, Config)
