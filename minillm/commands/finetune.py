"""``python -m minillm finetune``: fine-tune a pretrained BERT run as a sentiment classifier, fully or
parameter-efficiently, on SST-2 or IMDB, and score it on the report split.

A thin command: the classifier, task and recipe are :mod:`minillm.finetune`'s, the methods
:mod:`minillm.peft`'s, the data :mod:`minillm.datasets`', the run folders :mod:`minillm.runs`'.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Literal

import torch

from minillm import MinillmError, datasets, runs
from minillm.bert import BertForSequenceClassification
from minillm.device import seed_everything
from minillm.files import read_json, write_json
from minillm.finetune import ClassificationTask, FinetuneConfig, encode_for_bert, finetune
from minillm.inference_runs import CLASSIFIER, classifier_run_info
from minillm.peft import METHOD_RECIPES, PeftOptions, apply_method, count_parameters
from minillm.tokenization import save_library_tokenizer, special_token_ids


@dataclass
class FinetuneCommandConfig(PeftOptions, FinetuneConfig):
    """Fine-tune a pretrained BERT run (``pretrain bert`` / chapter 07) as an SST-2 (or IMDB) sentiment classifier."""

    init: str = field(default="runs/bert", metadata={"help": "the BERT run folder to start from (its tokenizer too)"})
    from_scratch: bool = field(default=False, metadata={"help": "keep the run's shape and tokenizer but not its weights "
                                                                "(the baseline pretraining should beat)"})
    method: Literal["full", "head", "top", "adapters", "lora", "prompt"] = field(
        default="full", metadata={"help": "what trains: every weight; the classifier only; the top --top-layers blocks; "
                                          "bottleneck adapters; LoRA; a soft prompt"})
    data: Literal["sst2", "imdb"] = field(default="sst2", metadata={"help": "sst2: SST-2's phrases, reported on SST-2 dev; "
                                                                         "imdb: IMDB's 25,000 training reviews, reported on its "
                                                                         "test split"})
    imdb_folder: str = field(default="", metadata={"help": "with --data imdb: read an unpacked aclImdb folder of your own "
                                                           "instead of the shipped data/imdb"})
    test_limit: int = field(default=0, metadata={"help": "with --data imdb: score on a fixed stratified N of the 25,000 test "
                                                         "reviews (0: all)"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate (default: the method's recipe: " + ", ".join(
        f"{m} {lr:g}" for m, (lr, _) in METHOD_RECIPES.items()) + ")"})
    weight_decay: float | None = field(default=None, metadata={"help": "AdamW decoupled weight decay (default: the method's "
                                                                       "recipe: 0.01 for full and top, 0 for the rest)"})

    def __post_init__(self):
        if self.method in METHOD_RECIPES:  # an unknown method is validate's to refuse
            recipe_lr, recipe_weight_decay = METHOD_RECIPES[self.method]
            self.lr = recipe_lr if self.lr is None else self.lr
            self.weight_decay = recipe_weight_decay if self.weight_decay is None else self.weight_decay
        super().__post_init__()

    def validate(self):
        if self.method not in METHOD_RECIPES:
            raise ValueError(f"--method must be one of {', '.join(METHOD_RECIPES)}, got {self.method!r}")
        super().validate()
        self.validate_options()


def labelled_splits(config: FinetuneCommandConfig) -> datasets.LabelledSplits:
    """SST-2 (train phrases / a leak-free held-out slice / dev) or IMDB (train reviews / a random slice of
    them / test), with ``--labelled`` applied to the training examples."""
    if config.data == "imdb":
        splits = datasets.imdb_splits(config.val_fraction, seed=config.seed, test_limit=config.test_limit,
                                      folder=config.imdb_folder or None, limit=2000 if config.quick else 0)
    else:
        splits = datasets.sst2_splits(config.val_fraction, seed=config.seed, limit=config.sst2_limit)
    return datasets.with_labelled(splits, config.labelled, config.seed)


def run_finetune(config: FinetuneCommandConfig) -> dict:
    """The command: load the BERT run, build the classifier, fine-tune, score on the report split, save."""
    init, out = pathlib.Path(config.init), pathlib.Path(config.out)
    if not (init / runs.TOKENIZER).is_file():
        raise MinillmError(f"{init} is not a BERT run folder (no {runs.TOKENIZER}): pretrain one with "
                           "'python -m minillm pretrain bert --out runs/bert' or give --init")
    runs.check_run_folder(out, config.resume, config.overwrite, kind=CLASSIFIER)
    seed_everything(config.seed)
    pretrained, tokenizer, _ = runs.load_run(init, expect="bert")
    special = special_token_ids(tokenizer)
    model = BertForSequenceClassification(pretrained.config, pooling=config.pooling) if config.from_scratch else \
        BertForSequenceClassification.from_pretraining(pretrained, pooling=config.pooling)
    model = apply_method(model, config.method, **config.options(), generator=torch.Generator().manual_seed(config.seed))
    trainable, total = count_parameters(model)
    splits = labelled_splits(config)
    length = min(config.max_length, pretrained.config.max_len - (config.prompt_tokens if config.method == "prompt" else 0))
    task = ClassificationTask(encode_for_bert(tokenizer, splits.train, length),
                              encode_for_bert(tokenizer, splits.val, length), special.pad, seed=config.seed)
    report = splits.name
    print(f"{config.method} fine-tuning of {init}{' (weights reset)' if config.from_scratch else ''}: "
          f"{trainable:,} of {total:,} parameters train; {len(splits.train):,} training / {len(splits.val):,} held-out "
          f"examples; reporting on {report} ({len(splits.test):,})")
    scores = finetune(model, task, config, encode_for_bert(tokenizer, splits.test, length),
                      runs.run_info(CLASSIFIER, classifier_run_info(pretrained.config, config.pooling, config.method,
                                                                    config.options(), str(init))),
                      prepare=lambda folder: save_library_tokenizer(tokenizer, folder / runs.TOKENIZER))
    print(f"{report}: accuracy {scores['accuracy']:.1%}, precision {scores['precision']:.1%}, "
          f"recall {scores['recall']:.1%}, F1 {scores['f1']:.3f}")
    results = {**read_json(out / runs.RESULTS), "test": scores, "report_split": report,
               "trainable_parameters": trainable, "total_parameters": total}
    write_json(out / runs.RESULTS, results)
    return results
