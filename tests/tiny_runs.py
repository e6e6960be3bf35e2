"""Tiny run folders, written in a test's tmp_path in well under a second, for the commands that read runs
(evaluate, export, serve): the files ``pretrain gpt`` and ``finetune`` write, with untrained tiny models.

``tiny_gpt_run``: a character-level GPT on a few lines of text (``config.json`` with the corpus it names,
``model.safetensors``, ``tokenizer.json``); ``tiny_classifier_run``: a 2-layer BERT sentiment classifier with a
WordPiece tokenizer trained on a few dozen SST-2-like phrases, fully fine-tuned or with a PEFT method's structure.
"""

from __future__ import annotations

import pathlib

import torch

from minillm import runs
from minillm.bert import BertConfig, BertForSequenceClassification
from minillm.checkpoint import save_weights
from minillm.files import write_json
from minillm.gpt import GPT, GPTConfig
from minillm.inference_runs import CLASSIFIER, classifier_run_info
from minillm.peft import apply_method
from minillm.tokenization import CharTokenizer, save_library_tokenizer, train_wordpiece

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n") * 20
PHRASES = ["a gorgeous , witty , seductive movie", "the film is a charming and often affecting journey",
           "a dull , lifeless mess", "it 's a bad , bad movie", "unflinchingly bleak and desperate",
           "the acting is superb and the story moving", "boring and far too long", "a wonderful little film"] * 4


def tiny_gpt_run(folder: pathlib.Path, seed: int = 0, **sizes) -> tuple[pathlib.Path, GPT]:
    """A finished-looking GPT run over :data:`TEXT` (written beside it as ``corpus.txt``), and its model."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    tokenizer = CharTokenizer.train(TEXT)
    torch.manual_seed(seed)
    config = GPTConfig(**{"vocab_size": tokenizer.vocab_size, "block_size": 32,
                          "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0, **sizes})
    model = GPT(config)
    tokenizer.save(folder / runs.TOKENIZER)
    write_json(folder / runs.CONFIG, runs.run_info("gpt", config, data=str(corpus)))
    save_weights(folder / runs.BEST_MODEL, model)
    return folder, model.eval()


def tiny_classifier_run(folder: pathlib.Path, method: str = "full", seed: int = 0) -> tuple[pathlib.Path, torch.nn.Module]:
    """A finished-looking ``bert-classifier`` run (config.json as ``python -m minillm finetune`` writes it), and its model."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_wordpiece(PHRASES, vocab_size=120, min_frequency=1)
    torch.manual_seed(seed)
    bert_config = BertConfig(vocab_size=tokenizer.get_vocab_size(), max_len=32, n_layer=2, n_head=2, n_embd=32,
                             dropout=0.0)
    options = {"top_layers": 1, "adapter_size": 4, "lora_r": 2, "lora_alpha": 4.0, "prompt_tokens": 3}
    model = apply_method(BertForSequenceClassification(bert_config, pooling="mean"), method, **options)
    save_library_tokenizer(tokenizer, folder / runs.TOKENIZER)
    info = runs.run_info(CLASSIFIER, classifier_run_info(bert_config, "mean", method, options, "runs/bert"),
                         train_config={"data": "sst2", "max_length": 32})
    write_json(folder / runs.CONFIG, info)
    save_weights(folder / runs.BEST_MODEL, model)
    return folder, model.eval()
