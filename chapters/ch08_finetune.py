"""Chapter 08: fine-tuning BERT and GPT as sentiment classifiers on SST-2.

Starts from chapter 07's BERT (pretrained on SST-2's unlabelled text), puts a classifier on its
pooled [CLS] vector, and fine-tunes the whole model with the shared loop (small learning rate,
warmup, weight decay, an evaluation every epoch, early stopping, the best epoch restored). Then the
same BERT from random initialization with the same budget, and a GPT pretrained on the same text
(chapter 06's recipe) classifying from its last token. Scored on SST-2 dev against the majority class.

    python chapters/ch08_finetune.py --bert runs/ch07    # a CPU: ~10 minutes
    python chapters/ch08_finetune.py --bert runs/ch07 --labelled 8000 --epochs 5   # few labels, all the text
    python chapters/ch08_finetune.py --quick             # seconds; what the tests run
"""

from __future__ import annotations

import pathlib
from dataclasses import asdict, dataclass, field

import torch

from minillm import metrics, plots
from minillm.bert import BertForPreTraining, BertForSequenceClassification
from minillm.checkpoint import write_json
from minillm.config import run_chapter
from minillm.device import describe_device, pick_device, seed_everything
from minillm.finetune import (ClassificationTask, FinetuneConfig, GPTForSequenceClassification, encode_for_bert,
                              encode_for_gpt, finetune, sst2_splits, with_labelled)
from minillm.gpt import GPT, GPTConfig
from minillm.pretrain import BertPretrainConfig, lm_token_ids, pretrain_bert
from minillm.tokenization import load_library_tokenizer, special_token_ids
from minillm.train import LanguageModelingTask, TrainConfig, Trainer


@dataclass
class Config(FinetuneConfig):
    """Chapter 08: fine-tune BERT (pretrained and from scratch) and GPT on SST-2; compare on SST-2 dev."""

    out: str = field(default="runs/ch08", metadata={"help": "run folder (the chapter replaces it)"})
    bert: str = field(default="", metadata={"help": "a 'pretrain bert' / chapter 07 run folder (default: pretrain one "
                                                    "first, chapter 07's default run, into <out>/bert_pretraining)"})
    gpt_iters: int = field(default=1000, metadata={"help": "steps of GPT pretraining on SST-2 text (chapter 06's recipe, "
                                                          "16 blocks of 64 tokens per step: ~1.7 passes over the text)"})
    seeds: str = field(default="1", metadata={"help": "comma-separated fine-tuning seeds; each model is fine-tuned once per seed"})
    skip_gpt: bool = field(default=False, metadata={"help": "compare the two BERTs only (no GPT pretraining and fine-tuning)"})
    QUICK = {**FinetuneConfig.QUICK, "gpt_iters": 30}

    def validate(self):
        super().validate()
        if not self.seeds or not all(s.strip().isdigit() for s in self.seeds.split(",")):
            raise ValueError(f"--seeds must be comma-separated integers, got {self.seeds!r}")


def main(config: Config) -> dict:
    out = pathlib.Path(config.out)
    device = pick_device(config.device)
    print(f"Running on {describe_device(device, config.precision)}")
    seeds = [int(s) for s in config.seeds.split(",")]

    # 1. A pretrained BERT (chapter 07's run, or one made now) and its WordPiece tokenizer.
    bert_run = pathlib.Path(config.bert) if config.bert else out / "bert_pretraining"
    if not config.bert:
        print(f"No --bert run given: pretraining one first (chapter 07's {'quick' if config.quick else 'default'} run)")
        pretrain_bert(BertPretrainConfig(out=str(bert_run), overwrite=True, quick=config.quick, device=config.device,
                                         precision=config.precision,
                                         **(BertPretrainConfig.QUICK if config.quick else {})))
    tokenizer = load_library_tokenizer(bert_run / "tokenizer.json")
    special = special_token_ids(tokenizer)
    pretrained_bert = BertForPreTraining.from_run(bert_run)

    # 2. SST-2: training phrases (a leak-free slice held out for early stopping), dev sentences for the report.
    all_splits = sst2_splits(config.val_fraction, seed=config.seed, limit=config.sst2_limit)
    splits = with_labelled(all_splits, config.labelled, config.seed)  # --labelled: fine-tune on a random N only
    print(f"SST-2: {len(splits.train):,} training phrases, {len(splits.val):,} held out, {len(splits.dev):,} dev sentences")
    bert_task = ClassificationTask(encode_for_bert(tokenizer, splits.train, config.max_length),
                                   encode_for_bert(tokenizer, splits.val, config.max_length), special.pad)
    bert_dev = encode_for_bert(tokenizer, splits.dev, config.max_length)
    gpt_task = ClassificationTask(encode_for_gpt(tokenizer, splits.train, config.max_length, special.sep),
                                  encode_for_gpt(tokenizer, splits.val, config.max_length, special.sep), special.pad)
    gpt_dev = encode_for_gpt(tokenizer, splits.dev, config.max_length, special.sep)

    # 3. A GPT pretrained on the same text, as chapter 06 pretrains one (phrases joined by [SEP]).
    seed_everything(config.seed)
    gpt_config = GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=config.max_length,
                           n_layer=pretrained_bert.config.n_layer, n_head=pretrained_bert.config.n_head,
                           n_embd=pretrained_bert.config.n_embd, bias=True)
    pretrained_gpt = GPT(gpt_config)
    # Even with --labelled, GPT pretrains on all the training text, as chapter 07's BERT did.
    lm_task = LanguageModelingTask(lm_token_ids(tokenizer, [t for t, _ in all_splits.train], special.sep),
                                   lm_token_ids(tokenizer, [t for t, _ in splits.val], special.sep), config.max_length)
    gpt_trainer = Trainer(pretrained_gpt, lm_task, TrainConfig(out=str(out / "gpt_pretraining"), overwrite=True, max_iters=config.gpt_iters,
                                                 batch_size=16, lr=3e-3, min_lr=3e-4, warmup_iters=min(100, config.gpt_iters // 10),
                                                 eval_interval=max(config.gpt_iters // 4, 1), eval_iters=10,
                                                 progress=config.progress, device=config.device, precision=config.precision,
                                                 quick=config.quick))
    if not config.skip_gpt:
        gpt_trainer.fit()

    # 4. Fine-tune each model with the same budget, once per seed, and score it on SST-2 dev.
    majority = max((0, 1), key=[label for _, label in splits.train].count)
    baseline = metrics.classification_metrics([y for _, y in splits.dev], [majority] * len(splits.dev))
    candidates = {  # name: (run-folder prefix, a fresh model, its task, its dev examples)
        "BERT, pretrained (ch07)": ("bert-pretrained", lambda: BertForSequenceClassification.from_pretraining(pretrained_bert),
                                    bert_task, bert_dev),
        "BERT, random init": ("bert-random", lambda: BertForSequenceClassification(pretrained_bert.config), bert_task, bert_dev),
        "GPT, pretrained on SST-2 text": ("gpt-pretrained", lambda: GPTForSequenceClassification.from_pretrained_gpt(
            pretrained_gpt, pad_id=special.pad), gpt_task, gpt_dev),
    }
    if config.skip_gpt:
        del candidates["GPT, pretrained on SST-2 text"]
    runs = {name: [] for name in candidates}
    for name, (prefix, build, task, dev) in candidates.items():
        for seed in seeds:
            print(f"\n== {name}, seed {seed} ==")
            seed_everything(seed)  # the classifier's initialization, then the batches and dropout
            run_config = Config(**{**asdict(config), "seed": seed, "overwrite": True, "out": str(out / f"{prefix}-seed{seed}")})
            runs[name].append(finetune(build(), task, run_config, dev, {"model": name, "seed": seed}))

    # 5. One table, the confusion matrix of the first model, and the accuracies as bars.
    rows = {"majority class": [baseline]} | runs
    mean = lambda key, scores: sum(s[key] for s in scores) / len(scores)  # noqa: E731
    print(f"\nSST-2 dev ({len(splits.dev)} sentences), mean over seeds {seeds}:")
    print(f"{'model':32} {'accuracy':>9} {'precision':>9} {'recall':>7} {'F1':>6}")
    for name, scores in rows.items():
        print(f"{name:32} {mean('accuracy', scores):9.1%} {mean('precision', scores):9.1%} "
              f"{mean('recall', scores):7.1%} {mean('f1', scores):6.3f}")
    first = next(iter(runs))
    plots.plot_confusion_matrix(runs[first][0]["confusion_matrix"], ["negative", "positive"], out / "confusion_matrix.png",
                                title=f"{first}, SST-2 dev")
    plots.plot_bars({"accuracy": [mean("accuracy", s) for s in rows.values()]}, list(rows), out / "accuracy.png",
                    title="SST-2 dev accuracy", ylabel="accuracy")
    margin = mean("accuracy", runs["BERT, pretrained (ch07)"]) - mean("accuracy", runs["BERT, random init"])
    summary = {f"SST-2 dev accuracy, {name}": f"{mean('accuracy', s):.1%}" for name, s in rows.items()}
    summary["pretraining's gain (BERT, accuracy points)"] = f"{100 * margin:+.1f} (seeds {config.seeds})"
    results = {"runs": runs, "baseline": baseline, "seeds": seeds, "config": asdict(config), "summary": summary}
    write_json(out / "results.json", results)
    print(f"\nPretraining's gain for BERT: {100 * margin:+.1f} accuracy points. Saved {out / 'confusion_matrix.png'}, "
          f"{out / 'accuracy.png'} and {out / 'results.json'}")
    return results


if __name__ == "__main__":
    run_chapter(main, Config)
