"""``python -m minillm evaluate``: score a finished run folder on its held-out data and write ``eval.json``.

::

    python -m minillm evaluate --run runs/gpt          # held-out loss, perplexity, bits/char
    python -m minillm evaluate --run runs/sst2-lora    # accuracy, P / R / F1, confusion matrix plot
    python -m minillm evaluate --run runs/ch05/model   # exact match and BLEU, greedy and beam search

A thin command over :func:`minillm.evaluation.evaluate_run`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from minillm.config import QuickConfig
from minillm.device import pick_device
from minillm.evaluation import evaluate_run


@dataclass
class EvaluateConfig(QuickConfig):
    """Score a finished run folder (GPT, BERT, fine-tuned classifier, chapter 05 Transformer) on held-out data."""

    run: str = field(default="runs/gpt", metadata={"help": "the run folder to evaluate (eval.json is written into it)"})
    out: str = field(default="", metadata={"help": "folder for eval.json (and the confusion matrix); default: the run folder"})
    data: Literal["auto", "sst2", "imdb"] = field(default="auto", metadata={
        "help": "a classifier's report split: auto (the one it was fine-tuned for), sst2 (SST-2 dev) or imdb (IMDB test)"})
    limit: int = field(default=0, metadata={"help": "score only the first N examples / held-out blocks (0: all)"})
    batch_size: int = field(default=64, metadata={"help": "examples (or blocks) per forward pass"})
    device: str = field(default="auto", metadata={"help": "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps"})
    QUICK = {"limit": 64}

    def validate(self):
        if self.limit < 0 or self.batch_size < 1:
            raise ValueError("--limit cannot be negative and --batch-size must be at least 1")


def run_evaluate(config: EvaluateConfig) -> dict:
    return evaluate_run(config.run, config.data, config.limit, config.batch_size, pick_device(config.device),
                        progress=True, out=config.out or None)
