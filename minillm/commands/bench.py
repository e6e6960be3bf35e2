"""``python -m minillm bench``: how fast the training loop's step runs, in tokens/s and (on CUDA) MFU
(:mod:`minillm.timing`), alone or against a reference: the same GPT written nanoGPT's way and nanoGPT's
training loop (:mod:`minillm.nanogpt`), or Hugging Face ``transformers``' BERT.

Measured on random tokens, so data loading is not part of it; the first ``warmup`` steps (compilation,
allocator, autotuning) are not timed. ``--whole-run`` times whole commands instead, each in a fresh process.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from minillm import MinillmError, data, datasets
from minillm.config import QuickConfig
from minillm.device import (
    autocast,
    autocast_dtype,
    describe_device,
    keep_freed_memory,
    maybe_compile,
    pick_device,
    seed_everything,
)
from minillm.gpt import GPT, GPTConfig
from minillm.nanogpt import ReferenceGPT, nanogpt_optimizer, nanogpt_precision
from minillm.timing import flops_per_token, peak_flops, synchronize
from minillm.train import TrainConfig, make_optimizer

PRESETS = {
    # nanoGPT's CPU recipe for Tiny Shakespeare (the speed reference in docs/ch06_gpt.md)
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
    corpus = config.data or str(datasets.tiny_shakespeare_path())
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
            launched, output = _run_process("nanoGPT", [sys.executable, "-c", "import sys; from minillm.nanogpt import _nanogpt_child; "
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
