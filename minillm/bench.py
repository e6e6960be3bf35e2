"""``python -m minillm bench``: how fast the training loop's step runs, in tokens/s and (on CUDA) MFU.

Model FLOPs utilization (Chowdhery et al., 2022, "PaLM", appendix B) compares the FLOPs a step
must do with what the device could do at its peak:

.. math::  \\mathrm{MFU} = \\frac{(6N + 12\\,L\\,H\\,Q\\,T) \\cdot \\text{tokens/s}}{\\text{peak FLOP/s}}

with N the parameters (6N: a multiply-add each for the forward pass and twice that backward),
L layers, H heads of size Q, and context T (the attention scores and their weighted sums). The
peak is the device's dense bf16 tensor-core rate. Measured on random tokens, so data loading is
not part of it; the first ``warmup`` steps (compilation, allocator, autotuning) are not timed.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch

from minillm import MinillmError, data, datasets
from minillm.benchmark import synchronize
from minillm.config import QuickConfig
from minillm.device import (autocast, autocast_dtype, describe_device, keep_freed_memory, maybe_compile, pick_device,
                            seed_everything)
from minillm.gpt import GPT, GPTConfig
from minillm.train import TrainConfig, make_optimizer

PRESETS = {
    # nanoGPT's CPU recipe for Tiny Shakespeare (the speed reference in the README)
    "cpu-recipe": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, batch_size=12),
    # nanoGPT's "baby GPT" for Tiny Shakespeare on a GPU
    "baby-gpt": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, batch_size=64),
    # GPT-2 small (124M) at its full context
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, batch_size=16),
}

# BERT pretraining shapes (--model bert): layers, heads, width, tokens per example, vocabulary, batch.
BERT_PRESETS = {
    # chapter 07's default on a CPU
    "bert-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=8000, batch_size=64),
    # BERT-Mini (Turc et al., 2019), the shape of the pretrained checkpoint minillm ships
    "bert-mini": dict(n_layer=4, n_head=4, n_embd=256, block_size=128, vocab_size=8000, batch_size=128),
    # BERT-base at sequence length 128 (its first pretraining phase)
    "bert-base": dict(n_layer=12, n_head=12, n_embd=768, block_size=128, vocab_size=30522, batch_size=64),
}

# Dense bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16 = [("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100", 989.4e12), ("A100", 312.0e12), ("L40S", 362.1e12),
             ("L4", 121.0e12), ("A10G", 70.0e12), ("RTX 4090", 165.2e12), ("RTX 3090", 71.0e12), ("V100", 125.0e12)]


def peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of a known CUDA GPU, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def flops_per_token(config: GPTConfig, n_params: int) -> float:
    """6N + 12·L·H·Q·T: the training FLOPs per token of a GPT (PaLM's appendix B, as nanoGPT counts)."""
    head_size = config.n_embd // config.n_head
    return 6 * n_params + 12 * config.n_layer * config.n_head * head_size * config.block_size


class ReferenceGPT(torch.nn.Module):
    """The same model written the way nanoGPT writes it, for a side-by-side timing (``--compare``).

    One fused ``c_attn`` Linear for q, k and v, ``nn.LayerNorm``, ``nn.GELU``, the fused SDPA kernel,
    a tied output layer: what nanoGPT's ``model.py`` computes, so that a difference in speed is a
    difference in implementation, not in the model. Stepped by ``torch.optim.AdamW`` with its
    defaults on the device, as nanoGPT's CPU recipe does.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        d, bias = config.n_embd, config.bias
        self.n_head, self.dropout = config.n_head, config.dropout
        self.wte = torch.nn.Embedding(config.vocab_size, d)
        self.wpe = torch.nn.Embedding(config.block_size, d)
        self.drop = torch.nn.Dropout(config.dropout)
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({
            "ln_1": torch.nn.LayerNorm(d, bias=bias), "c_attn": torch.nn.Linear(d, 3 * d, bias=bias),
            "c_proj": torch.nn.Linear(d, d, bias=bias), "resid_dropout": torch.nn.Dropout(config.dropout),
            "ln_2": torch.nn.LayerNorm(d, bias=bias), "c_fc": torch.nn.Linear(d, 4 * d, bias=bias), "gelu": torch.nn.GELU(),
            "mlp_proj": torch.nn.Linear(4 * d, d, bias=bias), "mlp_dropout": torch.nn.Dropout(config.dropout)})
            for _ in range(config.n_layer))
        self.ln_f = torch.nn.LayerNorm(d, bias=bias)
        self.lm_head = torch.nn.Linear(d, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for module in self.modules():  # nanoGPT's (GPT-2's) init: N(0, 0.02), zero biases, scaled residual outputs
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        for block in self.blocks:
            for projection in (block["c_proj"], block["mlp_proj"]):
                torch.nn.init.normal_(projection.weight, mean=0.0, std=0.02 / (2 * config.n_layer) ** 0.5)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor):
        batch, length = idx.shape
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(length, device=idx.device)))  # (B, T, C)
        for block in self.blocks:
            q, k, v = block["c_attn"](block["ln_1"](x)).split(x.shape[-1], dim=2)
            q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                 dropout_p=self.dropout if self.training else 0.0)
            x = x + block["resid_dropout"](block["c_proj"](y.transpose(1, 2).reshape(batch, length, -1)))  # (B, T, C)
            x = x + block["mlp_dropout"](block["mlp_proj"](block["gelu"](block["c_fc"](block["ln_2"](x)))))
        logits = self.lm_head(self.ln_f(x))
        return logits, torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


@dataclass
class BenchConfig(QuickConfig):
    """Measure the training step of a GPT shape (tokens/s, ms per step, MFU on CUDA), or with --whole-run
    time whole training runs of minillm against nanoGPT's loop."""

    model: Literal["gpt", "bert"] = field(default="gpt", metadata={
        "help": "time a GPT language-model step, or a BERT pretraining step (masked LM + next sentence); with --compare, "
                "BERT races Hugging Face transformers' BertForPreTraining"})
    preset: Literal["auto", "cpu-recipe", "baby-gpt", "gpt2-124m", "bert-cpu", "bert-mini", "bert-base"] = field(
        default="auto", metadata={"help": "model shape and batch (auto: gpt2-124m on CUDA, cpu-recipe elsewhere; with "
                                          "--model bert: bert-base on CUDA, bert-cpu elsewhere)"})
    n_layer: int | None = field(default=None, metadata={"help": "override the preset's layers"})
    n_head: int | None = field(default=None, metadata={"help": "override the preset's heads"})
    n_embd: int | None = field(default=None, metadata={"help": "override the preset's width"})
    block_size: int | None = field(default=None, metadata={"help": "override the preset's context"})
    vocab_size: int | None = field(default=None, metadata={"help": "override the preset's vocabulary"})
    batch_size: int | None = field(default=None, metadata={"help": "override the preset's batch size"})
    steps: int = field(default=30, metadata={"help": "timed training steps"})
    warmup: int = field(default=5, metadata={"help": "untimed steps first (compilation, autotuning)"})
    compile: Literal["auto", "yes", "no"] = field(default="auto", metadata={"help": "torch.compile (auto: on CUDA)"})
    precision: Literal["auto", "bf16", "fp32"] = field(
        default="auto", metadata={"help": "minillm's matmul precision, as in training (auto: bf16 on CUDA and on CPUs with "
                                          "bf16 instructions); the nanoGPT-style reference always does what nanoGPT does"})
    optimizer: Literal["minillm", "torch", "torch-fused"] = field(
        default="minillm", metadata={"help": "the AdamW that steps: hand-written, torch's, torch's fused"})
    bias: bool = field(default=False, metadata={"help": "biases in linear layers and norms"})
    dropout: float = field(default=0.0, metadata={"help": "dropout probability"})
    peak_tflops: float | None = field(default=None, metadata={"help": "the device's bf16 peak in TFLOP/s, if not known"})
    compare: bool = field(default=False, metadata={"help": "also time the same model written as nanoGPT writes it (ReferenceGPT + torch AdamW), alternating"})
    rounds: int = field(default=3, metadata={"help": "with --compare or --whole-run: alternate this many rounds of each, report medians"})
    whole_run: bool = field(default=False, metadata={
        "help": "time whole runs instead of steps: 'python -m minillm pretrain gpt' against nanoGPT's train.py loop "
                "(re-typed, its Tiny Shakespeare recipe), each in a fresh process, on the preset's shape"})
    max_iters: int = field(default=2000, metadata={"help": "with --whole-run: training steps of each run"})
    data: str = field(default="", metadata={"help": "with --whole-run: the corpus (default: the shipped data/tinyshakespeare.txt)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps"})
    seed: int = field(default=1337, metadata={"help": "random seed"})
    QUICK = {"steps": 3, "warmup": 1, "n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 16,
             "max_iters": 6}

    def validate(self):
        if self.steps < 1 or self.warmup < 0 or self.rounds < 1 or self.max_iters < 1:
            raise ValueError("--steps, --rounds and --max-iters must be at least 1 and --warmup not negative")
        if self.preset != "auto" and (self.preset in BERT_PRESETS) != (self.model == "bert"):
            raise ValueError(f"--preset {self.preset} is a {'BERT' if self.preset in BERT_PRESETS else 'GPT'} shape: "
                             f"{'add' if self.preset in BERT_PRESETS else 'drop'} --model bert")
        if self.whole_run and self.model == "bert":
            raise ValueError("--whole-run races GPT training runs against nanoGPT; BERT has --compare")


def _timed_steps(step: Callable[[], torch.Tensor], device: torch.device, steps: int) -> float:
    """Seconds per call of ``step``, over ``steps`` calls (the GPU finishes before the clock stops)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def _train_step(model, optimizer, x, y, device, precision: str = "auto"):
    def step():
        with autocast(device, precision=precision):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def nanogpt_precision(device: torch.device) -> str:
    """What nanoGPT's train.py runs in: fp32 on a CPU (no autocast there), bf16 autocast on a CUDA GPU that has it."""
    return "auto" if device.type == "cuda" else "fp32"


def nanogpt_optimizer(model: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """nanoGPT's ``configure_optimizers``: torch's AdamW, decay 0.1 on matrices, betas (0.9, 0.99), fused on CUDA."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.99), fused=device.type == "cuda")


def _shape(config: BenchConfig, device: torch.device) -> tuple[str, dict, int]:
    if config.model == "bert":
        preset = config.preset if config.preset != "auto" else ("bert-base" if device.type == "cuda" else "bert-cpu")
    else:
        preset = config.preset if config.preset != "auto" else ("gpt2-124m" if device.type == "cuda" and not config.whole_run
                                                                else "cpu-recipe")
    shape = dict({**PRESETS, **BERT_PRESETS}[preset])
    for name in shape:
        if getattr(config, name) is not None:
            shape[name] = getattr(config, name)
    return preset, shape, shape.pop("batch_size")


def run_bench(config: BenchConfig) -> dict:
    device = pick_device(config.device)
    if config.whole_run:
        return run_whole_runs(config, device)
    if config.model == "bert":
        return run_bert_bench(config, device)
    seed_everything(config.seed)
    preset, shape, batch_size = _shape(config, device)
    try:
        model_config = GPTConfig(**shape, dropout=config.dropout, bias=config.bias)
    except ValueError as error:
        raise MinillmError(str(error)) from None
    model = GPT(model_config).to(device)
    n_params = model.num_parameters(exclude_embeddings=True)
    use_compile = config.compile == "yes" or (config.compile == "auto" and device.type == "cuda")
    maybe_compile(model, device, enabled=use_compile)
    optimizer = make_optimizer(model, TrainConfig(optimizer=config.optimizer), device)
    generator = torch.Generator().manual_seed(config.seed)
    x = torch.randint(model_config.vocab_size, (batch_size, model_config.block_size), generator=generator).to(device)
    y = torch.randint(model_config.vocab_size, (batch_size, model_config.block_size), generator=generator).to(device)
    if device.type == "cpu":
        keep_freed_memory()  # as the Trainer does
    print(f"bench {preset} on {describe_device(device, config.precision)}: {model.num_parameters():,} parameters, batch "
          f"{batch_size} x {model_config.block_size} tokens, compile {'on' if use_compile else 'off'}, optimizer "
          f"{config.optimizer}", flush=True)
    runs = {"minillm": _train_step(model, optimizer, x, y, device, config.precision)}
    if config.compare:
        reference = ReferenceGPT(model_config).to(device)
        maybe_compile(reference, device, enabled=use_compile)
        runs["nanoGPT-style reference"] = _train_step(reference, nanogpt_optimizer(reference, 1e-3, device), x, y, device,
                                                      nanogpt_precision(device))

    start = time.perf_counter()
    for step in runs.values():
        for _ in range(config.warmup):
            step()
    synchronize(device)
    warmup_seconds = time.perf_counter() - start
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(config.rounds if config.compare else 1):  # alternate, so drifts in machine speed hit both alike
        for name, step in runs.items():
            timings[name].append(_timed_steps(step, device, config.steps))
    seconds = statistics.median(timings["minillm"])
    tokens_per_s = batch_size * model_config.block_size / seconds
    result = {"preset": preset, "device": describe_device(device, config.precision), "ms_per_step": seconds * 1e3,
              "tokens_per_s": tokens_per_s, "warmup_seconds": warmup_seconds, "parameters": model.num_parameters(),
              "dtype": str(autocast_dtype(device, config.precision)).replace("torch.", "")}
    peak = config.peak_tflops * 1e12 if config.peak_tflops else peak_flops(device)
    line = f"minillm: {seconds * 1e3:.1f} ms/step, {tokens_per_s:,.0f} tokens/s (warmup {warmup_seconds:.1f} s)"
    if peak:
        result["mfu"] = flops_per_token(model_config, n_params) * tokens_per_s / peak
        line += f", MFU {result['mfu']:.1%} of {peak / 1e12:.0f} TFLOP/s bf16"
    print(line, flush=True)
    if config.compare:
        reference_seconds = statistics.median(timings["nanoGPT-style reference"])
        result["reference_ms_per_step"] = reference_seconds * 1e3
        result["speed_ratio"] = seconds / reference_seconds
        print(f"nanoGPT-style reference ({str(autocast_dtype(device, nanogpt_precision(device))).replace('torch.', '')}): "
              f"{reference_seconds * 1e3:.1f} ms/step; minillm takes {seconds / reference_seconds:.2f}x its time "
              f"(medians of {config.rounds} alternating rounds of {config.steps} steps: "
              + ", ".join(f"{name} {' / '.join(f'{t * 1e3:.1f}' for t in times)} ms" for name, times in timings.items()) + ")",
              flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# BERT pretraining: minillm's step against Hugging Face transformers' BertForPreTraining
# ---------------------------------------------------------------------------------------------


def bert_pretraining_batch(vocab_size: int, batch_size: int, length: int, generator: torch.Generator, device,
                           mlm_probability: float = 0.15) -> dict[str, torch.Tensor]:
    """A random pretraining batch as chapter 07 makes them: ``[CLS] A [SEP] B [SEP]`` of ``length`` tokens,
    segment B from the middle on, 15% of the tokens selected for the masked LM (labels -100 elsewhere), random
    next-sentence labels. Ids 0-4 are the special tokens."""
    ids = torch.randint(5, vocab_size, (batch_size, length), generator=generator)  # (B, T)
    ids[:, 0], ids[:, length // 2], ids[:, -1] = 2, 3, 3  # [CLS] A [SEP] B [SEP]
    types = torch.zeros_like(ids)
    types[:, length // 2 + 1:] = 1
    selected = (torch.rand(ids.shape, generator=generator) < mlm_probability) & (ids > 4)
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    masked = torch.where(selected, torch.full_like(ids, 4), ids)
    batch = {"input_ids": masked, "token_type_ids": types, "attention_mask": torch.ones_like(ids), "labels": labels,
             "next_sentence_label": torch.randint(2, (batch_size,), generator=generator)}
    return {name: tensor.to(device) for name, tensor in batch.items()}


def hf_bert_for_pretraining(shape: dict, device):
    """``transformers.BertForPreTraining`` of the same shape as minillm's (exact GELU, no dropout, its default
    attention implementation, SDPA), or a clear error if ``transformers`` is not installed."""
    try:
        import transformers
    except ImportError:
        raise MinillmError("bench --model bert --compare races Hugging Face transformers, which is not installed: "
                           "pip install -r requirements.txt") from None
    config = transformers.BertConfig(vocab_size=shape["vocab_size"], hidden_size=shape["n_embd"],
                                     num_hidden_layers=shape["n_layer"], num_attention_heads=shape["n_head"],
                                     intermediate_size=4 * shape["n_embd"], max_position_embeddings=shape["block_size"],
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, hidden_act="gelu")
    return transformers.BertForPreTraining(config).to(device), transformers.__version__


def run_bert_bench(config: BenchConfig, device: torch.device) -> dict:
    """A BERT pretraining step (masked LM + next sentence, AdamW, clipping) in tokens/s; with ``--compare``,
    alternating with ``transformers.BertForPreTraining`` of the same shape on the same batch, under the same
    precision policy, stepped by torch's AdamW (what Hugging Face's Trainer uses)."""
    from minillm.bert import BertConfig, BertForPreTraining

    seed_everything(config.seed)
    preset, shape, batch_size = _shape(config, device)
    try:
        bert_config = BertConfig(vocab_size=shape["vocab_size"], max_len=shape["block_size"], n_layer=shape["n_layer"],
                                 n_head=shape["n_head"], n_embd=shape["n_embd"], dropout=config.dropout)
    except ValueError as error:
        raise MinillmError(str(error)) from None
    model = BertForPreTraining(bert_config).to(device)
    use_compile = config.compile == "yes" or (config.compile == "auto" and device.type == "cuda")
    maybe_compile(model, device, enabled=use_compile)
    optimizer = make_optimizer(model, TrainConfig(optimizer=config.optimizer), device)
    batch = bert_pretraining_batch(bert_config.vocab_size, batch_size, bert_config.max_len,
                                   torch.Generator().manual_seed(config.seed), device)
    if device.type == "cpu":
        keep_freed_memory()  # as the Trainer does
    print(f"bench {preset} (BERT pretraining) on {describe_device(device, config.precision)}: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, batch {batch_size} x {bert_config.max_len} tokens, "
          f"compile {'on' if use_compile else 'off'}, optimizer {config.optimizer}", flush=True)

    def step_of(net, opt, ours: bool):
        def step():
            with autocast(device, precision=config.precision):
                if ours:  # the masked-LM logits only where a token is masked, as pretraining runs it
                    loss = net(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch["labels"],
                               batch["next_sentence_label"], mlm_positions="masked").loss
                else:
                    loss = net(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return step

    runs = {"minillm": step_of(model, optimizer, True)}
    if config.compare:
        reference, version = hf_bert_for_pretraining(shape, device)
        maybe_compile(reference, device, enabled=use_compile)
        reference_optimizer = make_optimizer(reference, TrainConfig(optimizer="torch"), device)
        runs[f"transformers {version} BertForPreTraining"] = step_of(reference, reference_optimizer, False)
    for step in runs.values():
        for _ in range(config.warmup):
            step()
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(config.rounds if config.compare else 1):  # alternate, so drifts in machine speed hit both alike
        for name, step in runs.items():
            timings[name].append(_timed_steps(step, device, config.steps))
    tokens = batch_size * bert_config.max_len
    result = {"preset": preset, "model": "bert", "device": describe_device(device, config.precision),
              "dtype": str(autocast_dtype(device, config.precision)).replace("torch.", "")}
    for name, times in timings.items():
        seconds = statistics.median(times)
        key = "minillm" if name == "minillm" else "reference"
        result[f"{key}_ms_per_step"], result[f"{key}_tokens_per_s"] = seconds * 1e3, tokens / seconds
        print(f"{name}: {seconds * 1e3:.1f} ms/step, {tokens / seconds:,.0f} tokens/s (median of "
              + " / ".join(f"{t * 1e3:.1f}" for t in times) + " ms)", flush=True)
    result["tokens_per_s"] = result["minillm_tokens_per_s"]
    if config.compare:
        result["speedup"] = result["minillm_tokens_per_s"] / result["reference_tokens_per_s"]
        print(f"minillm runs {result['speedup']:.2f}x the tokens/s of Hugging Face's BertForPreTraining "
              f"({config.rounds} alternating rounds of {config.steps} steps)", flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# Whole runs: `python -m minillm pretrain gpt` against nanoGPT's train.py, each in a fresh process
# ---------------------------------------------------------------------------------------------


def nanogpt_recipe(corpus: str, out: str, n_layer: int, n_head: int, n_embd: int, block_size: int, batch_size: int,
                   max_iters: int, dropout: float = 0.0, bias: bool = False, lr: float = 1e-3, min_lr: float = 1e-4,
                   warmup_iters: int = 100, eval_interval: int = 250, eval_iters: int = 20, device: str = "cpu",
                   compile: bool = False, seed: int = 1337) -> dict:
    """nanoGPT's ``train.py`` as its README runs it on a CPU for Tiny Shakespeare, re-typed (no code copied)::

        python data/shakespeare_char/prepare.py
        python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
               --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
               --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

    Its parts, in its order: ``prepare.py`` (every character of the file is a token, the first 90%
    trains, uint16 ``train.bin`` / ``val.bin``); a fresh ``np.memmap`` and ``torch.stack`` of B random
    blocks per batch; an estimate of both splits' loss (``eval_iters`` batches each) every
    ``eval_interval`` steps with ``ckpt.pt`` saved (``torch.save``) when validation improves;
    warmup + cosine from ``lr`` to ``min_lr``; torch's AdamW; clipping at 1.0; ``loss.item()`` every
    step (``log_interval=1``); steps 0 .. ``max_iters`` inclusive. The model is :class:`ReferenceGPT`.
    Returns the last validation estimate, ``finished_at`` (the wall clock when nanoGPT would exit) and,
    computed after that, the whole validation split's loss (nanoGPT itself reports only its estimate).
    """
    device = torch.device(device)
    out_dir = pathlib.Path(out)
    text = data.read_text_file(corpus)  # prepare.py
    chars = sorted(set(text))
    lookup = np.zeros(max(map(ord, chars)) + 1, dtype=np.uint16)
    lookup[[ord(c) for c in chars]] = np.arange(len(chars), dtype=np.uint16)
    ids = lookup[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]
    n_train = int(len(ids) * 0.9)
    ids[:n_train].tofile(out_dir / "train.bin")
    ids[n_train:].tofile(out_dir / "val.bin")

    def get_batch(split: str):
        split_ids = np.memmap(out_dir / f"{split}.bin", dtype=np.uint16, mode="r")
        starts = torch.randint(len(split_ids) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy(split_ids[i:i + block_size].astype(np.int64)) for i in starts])
        y = torch.stack([torch.from_numpy(split_ids[i + 1:i + 1 + block_size].astype(np.int64)) for i in starts])
        return x.to(device), y.to(device)

    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=len(chars), block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                       dropout=dropout, bias=bias)
    model = ReferenceGPT(config).to(device)
    optimizer = nanogpt_optimizer(model, lr, device)
    maybe_compile(model, device, enabled=compile)
    precision = nanogpt_precision(device)

    @torch.no_grad()
    def estimate_loss() -> dict:
        model.eval()
        losses = {}
        for split in ("train", "val"):
            total = 0.0
            for _ in range(eval_iters):
                x, y = get_batch(split)
                with autocast(device, precision=precision):
                    total += model(x, y)[1].item()
            losses[split] = total / eval_iters
        model.train()
        return losses

    def get_lr(step: int) -> float:
        if step < warmup_iters:
            return lr * (step + 1) / (warmup_iters + 1)
        if step > max_iters:
            return min_lr
        coefficient = 0.5 * (1.0 + math.cos(math.pi * (step - warmup_iters) / (max_iters - warmup_iters)))
        return min_lr + coefficient * (lr - min_lr)

    best_val_loss, losses = math.inf, {}
    x, y = get_batch("train")
    for step in range(max_iters + 1):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step)
        if step % eval_interval == 0:
            losses = estimate_loss()
            print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
            if losses["val"] < best_val_loss:
                best_val_loss = losses["val"]
                if step > 0:
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": step,
                                "best_val_loss": best_val_loss}, out_dir / "ckpt.pt")
        with autocast(device, precision=precision):
            _, loss = model(x, y)
        x, y = get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # log_interval=1: a host sync and a print every step
    finished_at = time.time()  # nanoGPT's train.py ends here; what follows is not timed
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():  # the whole validation split, every block once, as minillm reports it
        for x, y in data.iter_lm_blocks(ids[n_train:], block_size, 4 * batch_size, device):
            with autocast(device, precision=precision):
                total += model(x, y)[1].item() * y.numel()
            count += y.numel()
    return {"finished_at": finished_at, "val_loss_estimate": losses.get("val", math.nan), "val_loss": total / count}


def _nanogpt_child(arguments: str) -> None:
    """Entry point of the subprocess that runs :func:`nanogpt_recipe` and prints its result as JSON."""
    result = nanogpt_recipe(**json.loads(arguments))
    print("RESULT " + json.dumps(result), flush=True)


def _run_process(name: str, command: list[str], log_path: pathlib.Path) -> tuple[float, str]:
    """Run ``command`` with its output in ``log_path``; (launch wall-clock time, output). A failure is one error."""
    launched = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    output = log_path.read_text(encoding="utf-8")
    if status != 0:
        last_lines = "\n".join(output.strip().splitlines()[-5:])
        raise MinillmError(f"the {name} run failed (exit {status}); it ended with:\n{last_lines}")
    return launched, output


def run_whole_runs(config: BenchConfig, device: torch.device) -> dict:
    """Alternate whole runs, each a fresh process: ours is the ``pretrain gpt`` command exactly as a user types it
    (its wall time counts everything: start-up, tokenizing, training, the whole-split evaluation, a sample, the
    plot); nanoGPT's counts from launch until its loop ends. Reports median wall times and validation losses."""
    preset, shape, batch_size = _shape(config, device)
    corpus = config.data or str(datasets.data_path("tinyshakespeare.txt"))
    data.read_text_file(corpus)  # a missing or binary corpus is one error before anything runs
    sizes = {name: shape[name] for name in ("n_layer", "n_head", "n_embd", "block_size")}
    warmup = min(100, config.max_iters // 2)  # both recipes warm up for 100 steps (fewer in a tiny run)
    print(f"whole runs on {device}: minillm (precision {config.precision}) vs nanoGPT's loop ({nanogpt_precision(device)}), "
          f"{', '.join(f'{k} {v}' for k, v in sizes.items())}, batch {batch_size}, {config.max_iters:,} steps, "
          f"{config.rounds} alternating rounds", flush=True)
    walls: dict[str, list[float]] = {"minillm": [], "nanoGPT": []}
    losses: dict[str, list[float]] = {"minillm": [], "nanoGPT": []}
    with tempfile.TemporaryDirectory(prefix="minillm-bench-") as scratch:
        scratch = pathlib.Path(scratch)
        for round_index in range(config.rounds):
            ours_out = scratch / f"minillm-{round_index}"
            command = [sys.executable, "-m", "minillm", "pretrain", "gpt", "--data", corpus, "--tokenizer", "char",
                       *[f"--{k.replace('_', '-')}={v}" for k, v in sizes.items()], f"--batch-size={batch_size}",
                       f"--max-iters={config.max_iters}", f"--warmup-iters={warmup}", f"--dropout={config.dropout}", "--bias" if config.bias else "--no-bias",
                       f"--device={device}", f"--precision={config.precision}", f"--compile={config.compile}",
                       f"--seed={config.seed}", "--no-progress", "--out", str(ours_out)]
            launched, _ = _run_process("minillm", command, scratch / f"minillm-{round_index}.log")
            walls["minillm"].append(time.time() - launched)
            losses["minillm"].append(json.loads((ours_out / "results.json").read_text())["val_loss"])

            their_out = scratch / f"nanogpt-{round_index}"
            their_out.mkdir()
            arguments = json.dumps({"corpus": corpus, "out": str(their_out), **sizes, "batch_size": batch_size,
                                    "max_iters": config.max_iters, "warmup_iters": warmup, "dropout": config.dropout, "bias": config.bias,
                                    "device": str(device), "compile": config.compile == "yes", "seed": config.seed})
            launched, output = _run_process("nanoGPT", [sys.executable, "-c", "import sys; from minillm.bench import _nanogpt_child; "
                                             "_nanogpt_child(sys.argv[1])", arguments], scratch / f"nanogpt-{round_index}.log")
            result = json.loads(output.rsplit("RESULT ", 1)[1])
            walls["nanoGPT"].append(result["finished_at"] - launched)
            losses["nanoGPT"].append(result["val_loss"])
            print(f"round {round_index + 1}: minillm {walls['minillm'][-1]:.1f} s (val loss {losses['minillm'][-1]:.4f}), "
                  f"nanoGPT {walls['nanoGPT'][-1]:.1f} s (val loss {losses['nanoGPT'][-1]:.4f}; its own 20-batch "
                  f"estimate {result['val_loss_estimate']:.4f})", flush=True)
    ours, theirs = statistics.median(walls["minillm"]), statistics.median(walls["nanoGPT"])
    print(f"median wall time: minillm {ours:.1f} s, nanoGPT {theirs:.1f} s: minillm takes {ours / theirs:.2f}x its time; "
          f"median val loss (whole split): minillm {statistics.median(losses['minillm']):.4f}, nanoGPT "
          f"{statistics.median(losses['nanoGPT']):.4f}", flush=True)
    return {"preset": preset, "walls": walls, "val_losses": losses, "speed_ratio": ours / theirs}
