"""GPT pretraining: a language model on a text file, the task it trains on, and sampling from it.

::

    python -m minillm pretrain gpt --data data/tinyshakespeare.txt --tokenizer char --out runs/shakespeare-char
    python -m minillm generate --ckpt runs/shakespeare-char --prompt "ROMEO:" --max-new-tokens 300

- :class:`LanguageModelingTask`: random blocks of a token stream, the next-token loss, for the shared loop.
- :func:`pretrain_gpt`: the whole run from a :class:`GPTPretrainConfig`. The first 90% of the text trains,
  the last 10% validates (:func:`minillm.datasets.text_splits`: nanoGPT's split of Tiny Shakespeare); the run folder
  (:mod:`minillm.runs`) gets the tokenizer, the weights, the log, the loss curve and ``samples.txt``.
- :func:`pretrain_gpt_on_reviews`: chapter 08's GPT, pretrained on IMDB's reviews with a BERT's tokenizer.
- :func:`sample_text`: prompt in, text out (``python -m minillm generate`` is :mod:`minillm.commands.generate`).

BERT's pretraining is :mod:`minillm.bert_pretraining`.
"""

from __future__ import annotations

import os
import pathlib
import random
import time
from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import numpy as np
import torch

from minillm import MinillmError, data, datasets, runs
from minillm.device import seed_everything
from minillm.files import atomic_write_text, read_json
from minillm.gpt import GPT, GPTConfig
from minillm.tokenization import (
    BPETokenizer,
    CharTokenizer,
    UnknownCharacterError,
    encode_ids,
    load_tokenizer,
    save_library_tokenizer,
    special_token_ids,
)
from minillm.train import Task, TrainConfig, Trainer, TrainResult


class LanguageModelingTask(Task):
    """Random (x, y) blocks of ``block_size`` tokens from ``train_ids``, y = x shifted by one;
    the loss is the model's mean next-token cross-entropy; validation reads ``val_ids``."""

    loss_unit = "nats/token"  # a mean next-token cross-entropy: exp(loss) is a perplexity

    def __init__(self, train_ids: np.ndarray, val_ids: np.ndarray, block_size: int, eval_seed: int = 0):
        for name, ids in (("training", train_ids), ("validation", val_ids)):
            if len(ids) < block_size + 1:
                raise MinillmError(f"the {name} split has {len(ids):,} tokens, fewer than block_size + 1 = "
                                   f"{block_size + 1}: use a smaller --block-size or more text")
        self.train_ids, self.val_ids, self.block_size, self.eval_seed = train_ids, val_ids, block_size, eval_seed

    def sample_batch(self, batch_size: int, generator: torch.Generator, device, rank: int = 0, world_size: int = 1):
        return data.sample_lm_batch(self.train_ids, batch_size, self.block_size, generator, device, rank, world_size)

    @staticmethod
    def loss(model, batch) -> torch.Tensor:
        x, y = batch
        return model(x, y)[1]

    def eval_batches(self, batch_size: int, device, max_batches: int | None = None) -> Iterator:
        if max_batches is None:  # the whole split, every block once
            yield from data.iter_lm_blocks(self.val_ids, self.block_size, batch_size, device)
            return
        generator = torch.Generator().manual_seed(self.eval_seed)  # the same batches at every estimate
        for _ in range(max_batches):
            yield data.sample_lm_batch(self.val_ids, batch_size, self.block_size, generator, device)

    @staticmethod
    def batch_tokens(batch) -> int:
        return batch[0].numel()


@dataclass
class GPTPretrainConfig(TrainConfig):
    """Pretrain a GPT language model on a UTF-8 text file (first 90% trains, last 10% validates)."""

    out: str = field(default="runs/gpt", metadata={"help": "run folder: tokenizer, checkpoints, log.jsonl, loss.png, samples"})
    data: str = field(default="", metadata={"help": "the UTF-8 text corpus (default: the shipped data/tinyshakespeare.txt)"})
    tokenizer: Literal["char", "bpe"] = field(default="char", metadata={"help": "characters, or byte-level BPE trained on the training split"})
    vocab_size: int = field(default=1000, metadata={"help": "BPE vocabulary size (with --tokenizer bpe)"})
    val_fraction: float = field(default=0.1, metadata={"help": "the last fraction of the text, held out for validation"})
    n_layer: int = field(default=4, metadata={"help": "Transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "attention heads per block"})
    n_embd: int = field(default=128, metadata={"help": "model width"})
    block_size: int = field(default=64, metadata={"help": "context length in tokens"})
    dropout: float = field(default=0.0, metadata={"help": "dropout probability"})
    bias: bool = field(default=False, metadata={"help": "biases in linear layers and LayerNorms (nanoGPT: none)"})
    positions: Literal["learned", "rotary"] = field(default="learned", metadata={"help": "learned position embeddings or rotary"})
    sample_tokens: int = field(default=300, metadata={"help": "tokens to sample at the end (0: none)"})
    # nanoGPT's CPU recipe trains this shape with lr 1e-3 -> 1e-4; GPT-2's init and warmup let this small model
    # take 3x that, which in the same 2,000 steps ends ~0.12 nats lower (docs/ch06_gpt.md).
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=3e-4, metadata={"help": "learning rate at the end of the cosine decay"})
    QUICK = {"max_iters": 30, "eval_interval": 10, "eval_iters": 2, "n_layer": 2, "n_head": 2, "n_embd": 32,
             "block_size": 32, "batch_size": 4, "warmup_iters": 5, "sample_tokens": 40, "progress": False}

    def validate(self):
        super().validate()
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head})")
        if self.positions == "rotary" and (self.n_embd // self.n_head) % 2:
            raise ValueError("--positions rotary needs an even head size (--n-embd / --n-head)")
        if self.tokenizer == "bpe" and self.vocab_size < 257:
            raise ValueError(f"--vocab-size must be at least 257 for BPE (256 bytes + 1 merge), got {self.vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.sample_tokens < 0:
            raise ValueError(f"--sample-tokens cannot be negative, got {self.sample_tokens}")

    @property
    def corpus_path(self) -> pathlib.Path:
        return pathlib.Path(self.data) if self.data else datasets.tiny_shakespeare_path()

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer, n_head=self.n_head,
                         n_embd=self.n_embd, dropout=self.dropout, bias=self.bias, positions=self.positions)


def tokenize_corpus(config: GPTPretrainConfig, log=print):
    """Read the corpus, build the tokenizer (BPE learns from the training split only) and encode both splits."""
    train_text, val_text = datasets.text_splits(config.corpus_path, config.val_fraction)
    start = time.perf_counter()
    if config.tokenizer == "char":
        tokenizer = CharTokenizer.train(train_text + val_text)  # nanoGPT's vocabulary: every character of the file
    else:
        tokenizer = BPETokenizer.train(train_text, config.vocab_size)
    dtype = data.token_dtype(len(tokenizer))
    train_ids = np.asarray(tokenizer.encode(train_text), dtype=dtype)
    val_ids = np.asarray(tokenizer.encode(val_text), dtype=dtype)
    corpus = config.data or "Tiny Shakespeare"  # the shipped corpus by name, not by this machine's path to it
    log(f"{corpus}: {len(train_text) + len(val_text):,} characters -> {config.tokenizer} tokenizer of {len(tokenizer):,} tokens -> "
        f"{len(train_ids):,} training / {len(val_ids):,} validation tokens ({time.perf_counter() - start:.1f} s)")
    return tokenizer, train_ids, val_ids


def pretrain_gpt(config: GPTPretrainConfig, stop_after: int | None = None, log=print) -> TrainResult:
    """The whole command: check the run folder, tokenize, build the model, train, sample."""
    out = pathlib.Path(config.out)
    runs.check_run_folder(out, config.resume, config.overwrite, kind="gpt")  # before anything is written
    seed_everything(config.seed)
    if config.resume:  # the tokenizer of the run being continued, so the ids mean the same
        tokenizer = load_tokenizer(out / runs.TOKENIZER)
        train_text, val_text = datasets.text_splits(config.corpus_path, config.val_fraction)
        dtype = data.token_dtype(len(tokenizer))
        train_ids = np.asarray(tokenizer.encode(train_text), dtype=dtype)
        val_ids = np.asarray(tokenizer.encode(val_text), dtype=dtype)
    else:
        tokenizer, train_ids, val_ids = tokenize_corpus(config, log)
    task = LanguageModelingTask(train_ids, val_ids, config.block_size, eval_seed=config.seed)
    model_config = config.model_config(len(tokenizer))
    model = GPT(model_config)
    run_info = runs.run_info("gpt", model_config, data=str(config.corpus_path))
    trainer = Trainer(model, task, config, run_info, log=log)
    result = trainer.fit(stop_after=stop_after, prepare=lambda folder: tokenizer.save(folder / runs.TOKENIZER))
    # A sharded model's forward needs every process (each holds a slice of the weights): all of them sample
    if (trainer.dist.is_main or trainer.sharded) and config.sample_tokens and not np.isnan(result.val_loss):
        prompt = "\n" if "\n" in getattr(tokenizer, "char_to_id", {"\n": 0}) else " "
        sample = sample_text(model, tokenizer, prompt, config.sample_tokens, temperature=0.8, top_k=200,
                             device=trainer.device, seed=config.seed)
        if trainer.dist.is_main:
            atomic_write_text(out / runs.SAMPLES, sample + "\n")
            log(f"\nA sample (temperature 0.8, top-k 200):\n{sample}\n")
    return result


# ---------------------------------------------------------------------------------------------
# Token streams and sampling
# ---------------------------------------------------------------------------------------------


def lm_token_ids(tokenizer, texts: Sequence[str], end_id: int) -> np.ndarray:
    """One token-id stream for language modelling from separate texts (a ``tokenizers`` tokenizer):
    each text's ids followed by ``end_id``, so a model learns where a text ends and never reads two as one."""
    stream = [token for encoding in tokenizer.encode_batch(list(texts)) for token in (*encoding.ids, end_id)]
    return np.asarray(stream, dtype=data.token_dtype(tokenizer.get_vocab_size()))


def sample_text(model: GPT, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                top_k: int | None = 200, top_p: float | None = None, device="cpu", seed: int = 1337,
                use_kv_cache: bool = True) -> str:
    """Encode ``prompt``, sample ``max_new_tokens`` more, decode prompt + continuation."""
    try:
        ids = encode_ids(tokenizer, prompt)
    except UnknownCharacterError as error:
        raise MinillmError(f"the prompt cannot be encoded: {error}") from None
    if not ids:
        raise MinillmError("the prompt is empty: give at least one character (e.g. --prompt $'\\n')")
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         use_kv_cache=use_kv_cache, generator=generator)
    return tokenizer.decode(out[0].tolist())


def pretrain_gpt_on_reviews(tokenizer_run: str | os.PathLike, out: str | os.PathLike, max_iters: int,
                            settings: TrainConfig, log=print) -> pathlib.Path:
    """A GPT the size of the BERT in ``tokenizer_run``, pretrained on the same unlabelled reviews with the same
    WordPiece tokenizer, so that chapter 08 compares the two objectives and nothing else: each review's ids
    followed by ``[SEP]`` as its end token (:func:`lm_token_ids`), a seeded 2% of the reviews held out, blocks of
    the BERT's length, chapter 06's recipe (GPT-2 init, warmup + cosine from 2e-3). ``settings`` gives the
    device, precision and quick mode. A finished run of the same shape and steps in ``out`` is reused.
    Returns ``out``, a run folder :func:`minillm.runs.load_run` reads."""
    tokenizer_run, out = pathlib.Path(tokenizer_run), pathlib.Path(out)
    bert = runs.read_config(tokenizer_run).get("model", {})
    tokenizer = runs.load_tokenizer(tokenizer_run)
    model_config = GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=bert["max_len"], n_layer=bert["n_layer"],
                             n_head=bert["n_head"], n_embd=bert["n_embd"], dropout=bert.get("dropout", 0.0), bias=True)
    run_info = runs.run_info("gpt", model_config, data="imdb")
    if runs.is_finished(out) and runs.read_config(out).get("model") == run_info["model"] and \
            read_json(out / runs.RESULTS).get("steps") == max_iters:
        log(f"GPT pretraining: reusing the finished run in {out}")
        return out
    reviews = datasets.pretraining_reviews(limit=400 if settings.quick else 0)
    order = random.Random(0).sample(range(len(reviews)), len(reviews))
    n_val = max(2, len(reviews) // 50)
    end = special_token_ids(tokenizer).sep
    train_ids = lm_token_ids(tokenizer, [reviews[i] for i in order[n_val:]], end)
    val_ids = lm_token_ids(tokenizer, [reviews[i] for i in order[:n_val]], end)
    log(f"GPT pretraining on {len(reviews):,} reviews: {len(train_ids):,} training / {len(val_ids):,} validation tokens, "
        f"{model_config.n_layer} layers x {model_config.n_embd}, {max_iters:,} steps")
    config = TrainConfig(out=str(out), overwrite=True, max_iters=max_iters, batch_size=32, lr=2e-3, min_lr=2e-4,
                         warmup_iters=min(100, max_iters // 10), eval_interval=max(max_iters // 5, 1), eval_iters=10,
                         progress=settings.progress, device=settings.device, precision=settings.precision, quick=settings.quick,
                         activation_checkpointing=settings.activation_checkpointing)
    task = LanguageModelingTask(train_ids, val_ids, model_config.block_size, eval_seed=0)
    Trainer(GPT(model_config), task, config, run_info, log=log).fit(
        prepare=lambda folder: save_library_tokenizer(tokenizer, folder / runs.TOKENIZER))
    return out


