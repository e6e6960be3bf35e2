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

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from minillm import MinillmError
from minillm.benchmark import synchronize
from minillm.config import QuickConfig
from minillm.device import autocast, autocast_dtype, describe_device, maybe_compile, pick_device, seed_everything
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
        self.n_head = config.n_head
        self.wte = torch.nn.Embedding(config.vocab_size, d)
        self.wpe = torch.nn.Embedding(config.block_size, d)
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({
            "ln_1": torch.nn.LayerNorm(d, bias=bias), "c_attn": torch.nn.Linear(d, 3 * d, bias=bias),
            "c_proj": torch.nn.Linear(d, d, bias=bias), "ln_2": torch.nn.LayerNorm(d, bias=bias),
            "c_fc": torch.nn.Linear(d, 4 * d, bias=bias), "gelu": torch.nn.GELU(),
            "mlp_proj": torch.nn.Linear(4 * d, d, bias=bias)}) for _ in range(config.n_layer))
        self.ln_f = torch.nn.LayerNorm(d, bias=bias)
        self.lm_head = torch.nn.Linear(d, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor):
        batch, length = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(length, device=idx.device))  # (B, T, C)
        for block in self.blocks:
            q, k, v = block["c_attn"](block["ln_1"](x)).split(x.shape[-1], dim=2)
            q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + block["c_proj"](y.transpose(1, 2).reshape(batch, length, -1))  # (B, T, C)
            x = x + block["mlp_proj"](block["gelu"](block["c_fc"](block["ln_2"](x))))
        logits = self.lm_head(self.ln_f(x))
        return logits, torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


@dataclass
class BenchConfig(QuickConfig):
    """Measure the training step of a GPT shape: tokens/s, ms per step, and MFU on CUDA."""

    preset: Literal["auto", "cpu-recipe", "baby-gpt", "gpt2-124m"] = field(
        default="auto", metadata={"help": "model shape and batch (auto: gpt2-124m on CUDA, cpu-recipe elsewhere)"})
    n_layer: int | None = field(default=None, metadata={"help": "override the preset's layers"})
    n_head: int | None = field(default=None, metadata={"help": "override the preset's heads"})
    n_embd: int | None = field(default=None, metadata={"help": "override the preset's width"})
    block_size: int | None = field(default=None, metadata={"help": "override the preset's context"})
    vocab_size: int | None = field(default=None, metadata={"help": "override the preset's vocabulary"})
    batch_size: int | None = field(default=None, metadata={"help": "override the preset's batch size"})
    steps: int = field(default=30, metadata={"help": "timed training steps"})
    warmup: int = field(default=5, metadata={"help": "untimed steps first (compilation, autotuning)"})
    compile: Literal["auto", "yes", "no"] = field(default="auto", metadata={"help": "torch.compile (auto: on CUDA)"})
    optimizer: Literal["minillm", "torch", "torch-fused"] = field(
        default="minillm", metadata={"help": "the AdamW that steps: hand-written, torch's, torch's fused"})
    bias: bool = field(default=False, metadata={"help": "biases in linear layers and norms"})
    dropout: float = field(default=0.0, metadata={"help": "dropout probability"})
    peak_tflops: float | None = field(default=None, metadata={"help": "the device's bf16 peak in TFLOP/s, if not known"})
    compare: bool = field(default=False, metadata={"help": "also time the same model written as nanoGPT writes it (ReferenceGPT + torch AdamW), alternating"})
    rounds: int = field(default=3, metadata={"help": "with --compare: alternate this many timed rounds of each, report medians"})
    device: str = field(default="auto", metadata={"help": "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps"})
    seed: int = field(default=1337, metadata={"help": "random seed"})
    QUICK = {"preset": "cpu-recipe", "steps": 3, "warmup": 1, "n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 16}

    def validate(self):
        if self.steps < 1 or self.warmup < 0 or self.rounds < 1:
            raise ValueError("--steps and --rounds must be at least 1 and --warmup not negative")


def _timed_steps(step: Callable[[], torch.Tensor], device: torch.device, steps: int) -> float:
    """Seconds per call of ``step``, over ``steps`` calls (the GPU finishes before the clock stops)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def _train_step(model, optimizer, x, y, device):
    def step():
        with autocast(device):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def run_bench(config: BenchConfig) -> dict:
    device = pick_device(config.device)
    seed_everything(config.seed)
    preset = config.preset if config.preset != "auto" else ("gpt2-124m" if device.type == "cuda" else "cpu-recipe")
    shape = dict(PRESETS[preset])
    for name in shape:
        if getattr(config, name) is not None:
            shape[name] = getattr(config, name)
    batch_size = shape.pop("batch_size")
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
    print(f"bench {preset} on {describe_device(device)}: {model.num_parameters():,} parameters, batch {batch_size} x "
          f"{model_config.block_size} tokens, compile {'on' if use_compile else 'off'}, optimizer {config.optimizer}", flush=True)
    runs = {"minillm": _train_step(model, optimizer, x, y, device)}
    if config.compare:
        reference = ReferenceGPT(model_config).to(device)
        maybe_compile(reference, device, enabled=use_compile)
        decay = [p for p in reference.parameters() if p.dim() >= 2]
        no_decay = [p for p in reference.parameters() if p.dim() < 2]
        reference_optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                                lr=1e-3, betas=(0.9, 0.99))
        runs["nanoGPT-style reference"] = _train_step(reference, reference_optimizer, x, y, device)

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
    result = {"preset": preset, "device": describe_device(device), "ms_per_step": seconds * 1e3,
              "tokens_per_s": tokens_per_s, "warmup_seconds": warmup_seconds, "parameters": model.num_parameters(),
              "dtype": str(autocast_dtype(device)).replace("torch.", "")}
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
        print(f"nanoGPT-style reference: {reference_seconds * 1e3:.1f} ms/step; minillm takes {seconds / reference_seconds:.2f}x "
              f"its time (medians of {config.rounds} alternating rounds of {config.steps} steps: "
              + ", ".join(f"{name} {' / '.join(f'{t * 1e3:.1f}' for t in times)} ms" for name, times in timings.items()) + ")",
              flush=True)
    return result
