"""``python -m minillm pretrain gpt`` and ``python -m minillm generate``: a GPT from a text file, and samples from it.

::

    python -m minillm pretrain gpt --data data/tinyshakespeare.txt --tokenizer char --out runs/shakespeare-char
    python -m minillm generate --ckpt runs/shakespeare-char --prompt "ROMEO:" --max-new-tokens 300

The first 90% of the text trains, the last 10% validates (nanoGPT's split of Tiny Shakespeare, so
numbers compare). The run folder gets the tokenizer (``tokenizer.json``), ``config.json``, the
best weights (``model.safetensors``), the latest training state (``checkpoint.safetensors``),
``log.jsonl``, ``loss.png``, ``results.json`` and ``samples.txt``.
"""

from __future__ import annotations

import os
import pathlib
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch

from minillm import MinillmError, data
from minillm.checkpoint import atomic_write_text, read_json, read_safetensors, load_model_state
from minillm.config import QuickConfig
from minillm.device import pick_device, seed_everything
from minillm.gpt import GPT, GPTConfig
from minillm.tokenization import BPETokenizer, CharTokenizer, UnknownCharacterError, load_tokenizer
from minillm.train import BEST_MODEL, CHECKPOINT, LanguageModelingTask, Trainer, TrainConfig, TrainResult, check_run_folder


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
    # take 3x that, which in the same 2,000 steps ends ~0.12 nats lower (README, chapter 06).
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
        return pathlib.Path(self.data) if self.data else data.data_path("tinyshakespeare.txt")

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer, n_head=self.n_head,
                         n_embd=self.n_embd, dropout=self.dropout, bias=self.bias, positions=self.positions)


def tokenize_corpus(config: GPTPretrainConfig, log=print):
    """Read the corpus, build the tokenizer (BPE learns from the training split only) and encode both splits."""
    text = data.read_text_file(config.corpus_path)
    n_train = int(len(text) * (1.0 - config.val_fraction))
    train_text, val_text = text[:n_train], text[n_train:]
    start = time.perf_counter()
    if config.tokenizer == "char":
        tokenizer = CharTokenizer.train(text)  # nanoGPT's vocabulary: every character of the file
    else:
        tokenizer = BPETokenizer.train(train_text, config.vocab_size)
    dtype = data.token_dtype(len(tokenizer))
    train_ids = np.asarray(tokenizer.encode(train_text), dtype=dtype)
    val_ids = np.asarray(tokenizer.encode(val_text), dtype=dtype)
    log(f"{config.corpus_path}: {len(text):,} characters -> {config.tokenizer} tokenizer of {len(tokenizer):,} tokens -> "
        f"{len(train_ids):,} training / {len(val_ids):,} validation tokens ({time.perf_counter() - start:.1f} s)")
    return tokenizer, train_ids, val_ids


def pretrain_gpt(config: GPTPretrainConfig, stop_after: int | None = None, log=print) -> TrainResult:
    """The whole command: check the run folder, tokenize, build the model, train, sample."""
    out = pathlib.Path(config.out)
    check_run_folder(out, config.resume, config.overwrite)  # before anything is written
    seed_everything(config.seed)
    if config.resume:  # the tokenizer of the run being continued, so the ids mean the same
        tokenizer = load_tokenizer(out / "tokenizer.json")
        text = data.read_text_file(config.corpus_path)
        n_train = int(len(text) * (1.0 - config.val_fraction))
        dtype = data.token_dtype(len(tokenizer))
        train_ids = np.asarray(tokenizer.encode(text[:n_train]), dtype=dtype)
        val_ids = np.asarray(tokenizer.encode(text[n_train:]), dtype=dtype)
    else:
        tokenizer, train_ids, val_ids = tokenize_corpus(config, log)
    task = LanguageModelingTask(train_ids, val_ids, config.block_size, eval_seed=config.seed)
    model_config = config.model_config(len(tokenizer))
    model = GPT(model_config)
    run_info = {"model": {"type": "gpt", **asdict(model_config)}, "tokenizer": "tokenizer.json", "data": str(config.corpus_path)}
    trainer = Trainer(model, task, config, run_info, log=log)
    result = trainer.fit(stop_after=stop_after, prepare=lambda folder: tokenizer.save(folder / "tokenizer.json"))
    if trainer.dist.is_main and config.sample_tokens and not np.isnan(result.val_loss):
        prompt = "\n" if "\n" in getattr(tokenizer, "char_to_id", {"\n": 0}) else " "
        sample = sample_text(model, tokenizer, prompt, config.sample_tokens, temperature=0.8, top_k=200,
                             device=trainer.device, seed=config.seed)
        atomic_write_text(out / "samples.txt", sample + "\n")
        log(f"\nA sample (temperature 0.8, top-k 200):\n{sample}\n")
    return result


# ---------------------------------------------------------------------------------------------
# Loading a run and sampling from it
# ---------------------------------------------------------------------------------------------


def load_run(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """``(model, tokenizer)`` from a run folder (or a ``.safetensors`` file in one): the best weights
    (``model.safetensors``), or the latest checkpoint's when there is no best yet."""
    path = pathlib.Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    if not folder.is_dir():
        raise MinillmError(f"{folder} is not a run folder (expected config.json, tokenizer.json and model.safetensors)")
    if not (folder / "config.json").is_file():
        raise MinillmError(f"{folder} has no config.json: is it a minillm run folder?")
    run_info = read_json(folder / "config.json")
    model_info = dict(run_info.get("model", {}))
    if model_info.pop("type", None) != "gpt":
        raise MinillmError(f"{folder} holds a {run_info.get('model', {}).get('type')!r} model, not a GPT")
    weights = path if path.suffix == ".safetensors" else next(
        (folder / name for name in (BEST_MODEL, CHECKPOINT) if (folder / name).exists()), folder / BEST_MODEL)
    tensors, _ = read_safetensors(weights)
    if weights.name == CHECKPOINT or any(k.startswith("model/") for k in tensors):
        tensors = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    model = GPT(GPTConfig.from_dict(model_info))
    load_model_state(model, tensors, str(weights))
    tokenizer = load_tokenizer(folder / run_info.get("tokenizer", "tokenizer.json"))
    return model.to(device).eval(), tokenizer


def sample_text(model: GPT, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                top_k: int | None = 200, top_p: float | None = None, device="cpu", seed: int = 1337,
                use_kv_cache: bool = True) -> str:
    """Encode ``prompt``, sample ``max_new_tokens`` more, decode prompt + continuation."""
    try:
        ids = tokenizer.encode(prompt)
    except UnknownCharacterError as error:
        raise MinillmError(f"the prompt cannot be encoded: {error}") from None
    if not ids:
        raise MinillmError("the prompt is empty: give at least one character (e.g. --prompt $'\\n')")
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         use_kv_cache=use_kv_cache, generator=generator)
    return tokenizer.decode(out[0].tolist())


@dataclass
class GenerateConfig(QuickConfig):
    """Sample text from a pretrained GPT run folder."""

    ckpt: str = field(default="runs/gpt", metadata={"help": "run folder written by 'pretrain gpt' (or a .safetensors file in it)"})
    prompt: str = field(default="\n", metadata={"help": "text to continue"})
    max_new_tokens: int = field(default=300, metadata={"help": "tokens to sample"})
    temperature: float = field(default=0.8, metadata={"help": "softmax temperature; 0 is greedy decoding"})
    top_k: int | None = field(default=200, metadata={"help": "sample among the k most likely tokens (none: all)"})
    top_p: float | None = field(default=None, metadata={"help": "nucleus sampling: the smallest set with this much probability"})
    num_samples: int = field(default=1, metadata={"help": "how many samples"})
    kv_cache: bool = field(default=True, metadata={"help": "decode with the KV cache"})
    seed: int = field(default=1337, metadata={"help": "random seed of the sampler"})
    device: str = field(default="auto", metadata={"help": "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps"})

    def validate(self):
        if self.max_new_tokens < 1 or self.num_samples < 1:
            raise ValueError("--max-new-tokens and --num-samples must be at least 1")
        if self.temperature < 0:
            raise ValueError(f"--temperature cannot be negative, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top-k must be at least 1 (or none), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1] (or none), got {self.top_p}")


def generate(config: GenerateConfig) -> list[str]:
    device = pick_device(config.device)
    model, tokenizer = load_run(config.ckpt, device)
    samples = []
    for index in range(config.num_samples):
        start = time.perf_counter()
        text = sample_text(model, tokenizer, config.prompt, config.max_new_tokens, config.temperature, config.top_k,
                           config.top_p, device, config.seed + index, config.kv_cache)
        seconds = time.perf_counter() - start
        print(text)
        print(f"--- {config.max_new_tokens} tokens in {seconds:.2f} s ({config.max_new_tokens / seconds:,.0f} tokens/s)\n", flush=True)
        samples.append(text)
    return samples
