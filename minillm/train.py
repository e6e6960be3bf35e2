"""One training loop for every model in minillm: GPT and BERT pretraining, fine-tuning, contrastive learning.

What a model-specific part provides is a *task*: a subclass of :class:`Task` (random training batches,
the loss, fixed validation batches, what the throughput counts, and for a classifier the number of right
predictions). :class:`Trainer` does the rest, the same way for every task: AdamW (``minillm.optim``, or
torch's fused kernel), linear warmup then cosine decay, gradient accumulation and clipping, bf16 autocast
on CUDA and on CPUs with bf16 instructions (``--precision``), ``torch.compile``, an estimate of the
validation loss every ``eval_interval`` steps and the whole validation split at the end, early stopping,
the best model kept, a progress bar with loss, tokens/s and ETA, the run folder's log, loss curve and
checkpoints that resume exactly (:mod:`minillm.runs`). Under ``torchrun`` it runs data-parallel: every
process draws its share of one global batch and gradients are averaged, either with a whole copy of the
model in each process (``--parallel ddp``, DistributedDataParallel) or with the weights, gradients and
optimizer state split across the processes (``--parallel fsdp``, :mod:`minillm.fully_sharded`); only
rank 0 writes anything, and its checkpoints are the files a one-process run writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Literal

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from minillm import MinillmError, RunInterrupted, optim, plots
from minillm.activation_checkpointing import enable_activation_checkpointing, transformer_blocks
from minillm.checkpoint import (
    check_finite,
    load_model_state,
    load_training_state,
    read_safetensors,
    save_training_state,
    save_weights,
)
from minillm.config import QuickConfig
from minillm.device import autocast, describe_device, keep_freed_memory, maybe_compile, seed_everything
from minillm.distributed import Distributed, accumulating, setup_distributed  # noqa: F401 (Distributed: re-exported)
from minillm.files import atomic_write_text, write_json
from minillm.fully_sharded import shard_model
from minillm.loss_scaling import make_grad_scaler
from minillm.runs import (
    BEST_MODEL,
    CHECKPOINT,
    CONFIG,
    LOG,
    LOSS_PLOT,
    RESULTS,
    check_run_folder,
    clear_run_folder,
    read_log,
    run_kind,
)


@dataclass
class TrainConfig(QuickConfig):
    """The training loop's settings (every pretraining and fine-tuning command adds its own on top)."""

    out: str = field(default="runs/train", metadata={"help": "run folder: checkpoints, log.jsonl, loss.png, results.json"})
    max_iters: int = field(default=2000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=12, metadata={"help": "examples per micro-batch, per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches accumulated into one optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=1e-4, metadata={"help": "learning rate at the end of the cosine decay"})
    warmup_iters: int = field(default=100, metadata={"help": "steps of linear warmup"})
    lr_decay_iters: int = field(default=0, metadata={"help": "step where the cosine decay ends (0: --max-iters)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decoupled weight decay on matrices (not biases, norms)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.99, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient's global norm to this (0: off)"})
    optimizer: Literal["minillm", "torch", "torch-fused"] = field(
        default="minillm", metadata={"help": "AdamW written by hand (minillm.optim), torch.optim.AdamW, or its fused kernel"})
    eval_interval: int = field(default=250, metadata={"help": "estimate the validation loss every N steps (and checkpoint)"})
    eval_iters: int = field(default=20, metadata={"help": "validation batches per estimate"})
    patience: int = field(default=0, metadata={"help": "stop after N estimates without improvement (0: never)"})
    select_by: Literal["loss", "accuracy"] = field(
        default="loss", metadata={"help": "what picks the best model and stops early: the validation loss, or (a classifier) "
                                          "the validation accuracy, ties broken by the loss"})
    compile: Literal["auto", "yes", "no"] = field(
        default="auto", metadata={"help": "torch.compile the model (auto: on CUDA only, where it pays)"})
    precision: Literal["auto", "bf16", "fp16", "fp32"] = field(
        default="auto", metadata={"help": "matmul precision: auto is bf16 autocast on CUDA GPUs and on CPUs with bf16 "
                                          "instructions (AVX512-BF16, AMX), fp32 elsewhere; fp16 is for GPUs without bf16 "
                                          "(T4, V100) and scales the loss (a gradient scaler skips steps that overflow); "
                                          "MINILLM_PRECISION overrides auto"})
    activation_checkpointing: bool = field(
        default=False, metadata={"help": "recompute each Transformer block's activations in the backward pass instead "
                                         "of keeping them: far less memory, about a third more compute per step"})
    device: str = field(default="auto", metadata={"help": "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps"})
    parallel: Literal["ddp", "fsdp"] = field(
        default="ddp", metadata={"help": "under torchrun: ddp keeps a whole copy of the model in every process and "
                                         "averages gradients; fsdp (FSDP2, ZeRO-3) splits weights, gradients and "
                                         "optimizer state across the processes, gathering each block when it runs"})
    seed: int = field(default=1337, metadata={"help": "random seed (initialization, batches, dropout)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its last checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "delete the run already in --out and start afresh"})
    log_interval: int = field(default=10, metadata={"help": "update the progress bar every N steps"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def validate(self):
        for name in ("max_iters", "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_iters", "lr_decay_iters", "patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} cannot be negative, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need --lr > 0 and 0 <= --min-lr <= --lr, got {self.lr} and {self.min_lr}")
        if self.warmup_iters > self.decay_iters:
            raise ValueError(f"--warmup-iters ({self.warmup_iters}) cannot exceed the decay length ({self.decay_iters})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1) or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("need 0 <= --beta1, --beta2 < 1 and non-negative --weight-decay and --grad-clip")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: choose one")

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.max_iters


TRAIN_FIELDS = {name for name in TrainConfig.__dataclass_fields__}


# ---------------------------------------------------------------------------------------------
# The language-modelling task (GPT): next-token prediction over a token-id array
# ---------------------------------------------------------------------------------------------


class LengthBuckets:
    """Random batches of examples of similar length, every example as likely as with uniform sampling.

    Padding a batch to its longest example wastes the compute of every pad position: SST-2 sentence
    pairs average 15 tokens but a random batch of 64 pads to ~47, so two thirds of a step would
    be padding. Here the examples are sorted by length (ties in a seeded random order) and cut into
    buckets of ``bucket_size`` neighbours. A batch picks one bucket with probability |bucket| / n,
    then draws its examples uniformly from that bucket (with replacement), so each example is drawn
    with probability count / n per draw, as uniform sampling gives; only which examples share a batch
    changes (they have similar lengths, as ``group_by_length`` arranges in other trainers). The draw
    uses only the generator, so a resumed run draws the same batches.
    """

    def __init__(self, lengths, bucket_size: int, seed: int = 0):
        lengths = np.asarray(lengths)
        if bucket_size < 1 or len(lengths) == 0:
            raise ValueError("LengthBuckets needs a positive bucket_size and at least one example")
        tie_break = np.random.default_rng(seed).permutation(len(lengths))
        self.order = torch.from_numpy(np.lexsort((tie_break, lengths)))  # example indices, shortest first
        self.bucket_size = bucket_size

    def sample(self, count: int, generator: torch.Generator) -> list[int]:
        n = len(self.order)
        position = int(torch.randint(n, (1,), generator=generator))  # a uniform example picks its bucket
        start = position // self.bucket_size * self.bucket_size
        bucket = self.order[start:min(start + self.bucket_size, n)]
        return bucket[torch.randint(len(bucket), (count,), generator=generator)].tolist()


class ExampleDraws:
    """Random training-example indices for a task: batches of similar length (:class:`LengthBuckets`, each
    bucket ``length_grouping`` global batches wide), or uniform draws when ``length_grouping`` is 0."""

    def __init__(self, lengths, length_grouping: int = 16, seed: int = 0):
        self.lengths, self.length_grouping, self.seed, self.buckets = list(lengths), length_grouping, seed, None

    def __call__(self, count: int, generator: torch.Generator) -> list[int]:
        if not self.length_grouping:
            return torch.randint(len(self.lengths), (count,), generator=generator).tolist()
        if self.buckets is None or self.buckets.bucket_size != count * self.length_grouping:
            self.buckets = LengthBuckets(self.lengths, count * self.length_grouping, seed=self.seed)
        return self.buckets.sample(count, generator)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices and embeddings only: decaying biases and LayerNorm gains
    toward 0 only fights the normalization (as GPT-2 and nanoGPT do)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    betas = (config.beta1, config.beta2)
    if config.optimizer == "minillm":
        return optim.AdamW(groups, lr=config.lr, betas=betas)
    if config.optimizer == "torch-fused" and device.type not in ("cuda", "cpu"):
        raise MinillmError(f"--optimizer torch-fused runs on CUDA or CPU, not {device.type}")
    return torch.optim.AdamW(groups, lr=config.lr, betas=betas, fused=config.optimizer == "torch-fused")


@dataclass
class TrainResult:
    steps: int
    best_step: int
    best_val_loss: float  # the best estimate during training
    val_loss: float  # the whole validation split, best model
    seconds: float
    tokens_per_s: float
    stopped_early: bool
    out: pathlib.Path
    val_accuracy: float | None = None  # the whole validation split, best model, for a classifier

    @property
    def val_perplexity(self) -> float:
        return math.exp(self.val_loss)


class Task:
    """What the loop needs from a model-specific part: every task (:class:`~minillm.pretrain.LanguageModelingTask`,
    :class:`~minillm.bert_pretraining.BertPretrainingTask`, :class:`~minillm.finetune.ClassificationTask`,
    :class:`~minillm.contrastive.SimCSETask`) subclasses it and implements the first four methods.

    - ``sample_batch``: a random training batch; under data parallelism every process draws the same global
      batch (``batch_size x world_size`` examples, from the shared ``generator``) and keeps its rows;
    - ``loss``: the mean loss of a batch (a scalar tensor);
    - ``eval_batches``: a fixed sequence of validation batches, all of the split when ``max_batches`` is None;
    - ``batch_tokens``: what the throughput counts;
    - ``eval_weight``: what one batch's validation loss is weighted by (tokens unless a task says otherwise,
      e.g. examples for a classifier);
    - ``evaluate_batch``: the loss and, for a task with ``counts_correct``, the number of right predictions,
      from one forward pass, so that validation also reports accuracy (``--select-by accuracy``).
    """

    loss_unit = "nats"  # what the loss is a mean over, for the plot's label ("nats/token" has a perplexity)
    counts_correct = False  # True: evaluate_batch counts right predictions (a classifier)

    def sample_batch(self, batch_size: int, generator: torch.Generator, device, rank: int = 0, world_size: int = 1):
        raise NotImplementedError

    def loss(self, model, batch) -> torch.Tensor:
        raise NotImplementedError

    def eval_batches(self, batch_size: int, device, max_batches: int | None = None) -> Iterator:
        raise NotImplementedError

    def batch_tokens(self, batch) -> int:
        raise NotImplementedError

    def eval_weight(self, batch) -> int:
        return self.batch_tokens(batch)

    def evaluate_batch(self, model, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.loss(model, batch), None


@dataclass
class LoopState:
    """What a checkpoint saves besides weights, optimizer and RNG: where the run stands (resume restores it)."""

    history: list = field(default_factory=list)  # [step, mean training loss] per log interval, for the plot
    best_val_loss: float = math.inf
    best_val_accuracy: float = -math.inf
    best_step: int = -1
    evals_since_best: int = 0
    interval_loss_sum: float = 0.0  # the training losses since the last evaluation, summed
    interval_steps: int = 0
    skipped_steps: int = 0  # fp16: optimizer steps skipped because a gradient overflowed


class Trainer:
    """Train ``model`` on ``task`` as ``config`` says; see the module docstring.

    ``run_info`` is JSON-able and saved as ``<out>/config.json`` and in every checkpoint (e.g. the
    model's configuration and the tokenizer's file name, :func:`minillm.runs.run_info`); on ``--resume``
    the run in ``--out`` must have been made with the same ``run_info["model"]``.

    :meth:`fit` reads top to bottom: :meth:`_start` (the run folder, seeds, optimizer, resume), then per step
    :meth:`_step` (forward, backward, clip, update), :meth:`_log_progress` every ``log_interval`` steps, and
    :meth:`_evaluate_and_checkpoint` every ``eval_interval``; :meth:`_finish` restores the best weights and
    scores them on the whole validation split.
    """

    def __init__(self, model: torch.nn.Module, task: Task, config: TrainConfig, run_info: dict | None = None,
                 log: Callable[[str], None] | None = None):
        self.model, self.task, self.config = model, task, config
        self.run_info = run_info or {}
        self.out = pathlib.Path(config.out)
        self.dist, self.device = setup_distributed(config.device)
        self.print = (log or (lambda message: print(message, flush=True))) if self.dist.is_main else (lambda message: None)
        if config.parallel == "fsdp" and not self.dist.enabled:
            raise MinillmError("--parallel fsdp splits the model across several processes and this run has one: start "
                               "it with torchrun --nproc_per_node N (N >= 2), or leave out --parallel fsdp")
        self.sharded = config.parallel == "fsdp"  # the weights, gradients and optimizer state split (FSDP)

    # -- the loop --------------------------------------------------------------------------------

    def fit(self, stop_after: int | None = None, prepare: Callable[[pathlib.Path], None] | None = None) -> TrainResult:
        """Train to ``max_iters`` (or early stopping); ``stop_after=k`` stops after step k as Ctrl-C
        would (checkpoint saved, run resumable), for tests and demonstrations. ``prepare(out)`` runs
        once the run folder is checked and empty, before training (not on resume): write what the
        run needs beside its checkpoints there, e.g. the tokenizer."""
        c = self.config
        step = self._start(prepare)
        train_model = self._training_model(step)
        interrupted = self._catch_ctrl_c()
        self.bar = tqdm(total=c.max_iters, initial=step, desc="training", disable=not (c.progress and self.dist.is_main),
                        dynamic_ncols=True, mininterval=0.5)
        start_time = self.interval_start = time.perf_counter()
        self.interval_tokens = run_tokens = 0
        # The losses since the last estimate are summed on the device (no host sync per step) in float64,
        # and saved in checkpoints, so a resumed run adds them up in exactly the same order.
        self.interval_sum = torch.tensor(self.state.interval_loss_sum, dtype=torch.float64, device=self.device)
        # A micro-batch's first and last finite losses, for a divergence's diagnosis (:meth:`_divergence`)
        self.first_loss = None  # the first micro-batch's loss, kept as a tensor (set in the first step)
        self.last_finite_loss = torch.tensor(math.nan, dtype=torch.float64, device=self.device)
        self.logged = (self.state.interval_loss_sum, self.state.interval_steps)  # (sum, steps) at the last log line
        stopped_early = False
        self.model.train()
        try:
            while step < c.max_iters:
                lr = self._lr(step)
                tokens = self._step(train_model, lr)
                step += 1
                self.state.interval_steps += 1
                self.interval_tokens += tokens
                run_tokens += tokens

                at_eval = step % c.eval_interval == 0 or step == c.max_iters
                stopping = interrupted() or (stop_after is not None and step >= stop_after)
                if step % c.log_interval == 0 or at_eval or stopping:
                    self._log_progress(step, lr)
                if at_eval:
                    stopped_early = self._evaluate_and_checkpoint(step, lr)
                elif stopping:
                    self._save(step)
                if stopped_early:
                    break
                if stopping:
                    break
        finally:
            self.bar.close()
            interrupted.restore()
        if interrupted():  # Ctrl-C: the checkpoint is saved; the caller must not go on as if the run had finished
            raise RunInterrupted(f"interrupted at step {step:,}; the checkpoint {self.out / CHECKPOINT} is saved: "
                                 "rerun the same command with --resume to continue")
        if step < c.max_iters and not stopped_early:
            self.print(f"\nstopped at step {step:,}; checkpoint saved: continue with --resume")
        seconds = time.perf_counter() - start_time
        if step < c.max_iters and not stopped_early:  # stopped on request: no final evaluation
            return TrainResult(step, self.state.best_step, self.state.best_val_loss, math.nan, seconds,
                               run_tokens / seconds if seconds else 0.0, False, self.out)
        return self._finish(step, seconds, run_tokens, stopped_early)

    def _start(self, prepare: Callable[[pathlib.Path], None] | None) -> int:
        """Check (and on --overwrite empty) the run folder, seed, build the optimizer, and on --resume load the
        checkpoint; returns the step to start from."""
        c, out = self.config, self.out
        if c.select_by == "accuracy" and not self.task.counts_correct:
            raise MinillmError("--select-by accuracy needs a classification task (one that counts right predictions)")
        if self.dist.is_main:
            check_run_folder(out, c.resume, c.overwrite, kind=run_kind(self.run_info))
            if not c.resume:  # the run it replaces (--overwrite), or the stub of one that failed before step 1
                clear_run_folder(out)
            out.mkdir(parents=True, exist_ok=True)
            if prepare is not None and not c.resume:
                prepare(out)
        if self.dist.enabled:
            dist.barrier()
        seed_everything(c.seed + self.dist.rank)  # dropout differs between processes; batches do not
        self.model.to(self.device)
        if self.sharded:  # before the optimizer is made: it holds (and updates) each process's slice
            shard_model(self.model, self.device, transformer_blocks(self.model))
        self.optimizer = make_optimizer(self.model, c, self.device)
        self.scaler = make_grad_scaler(self.device, c.precision)  # fp16 only; None for bf16 and fp32
        self.generator = torch.Generator().manual_seed(c.seed)  # the data order: the same in every process
        self.state, step = LoopState(), 0
        if c.resume:
            header = load_training_state(out / CHECKPOINT, self.model, self.optimizer, {"data": self.generator})
            saved_model = header.get("run_info", {}).get("model")
            if saved_model != self.run_info.get("model"):
                raise MinillmError(f"the run in {out} was made with model {saved_model}, not {self.run_info.get('model')}: "
                                   "resume with the same model options, or start a new --out")
            if self.scaler is not None and "grad_scaler" in header:
                self.scaler.load_state_dict(header["grad_scaler"])
            step = header["step"]
            self.state = LoopState(**{key: header.get(key, default) for key, default in asdict(LoopState()).items()})
            self._truncate_log(step)
            self.print(f"resuming {out} at step {step:,}")
        check_finite(dict(self.model.named_parameters()), "the starting model" if not c.resume else str(out / CHECKPOINT))
        if self.dist.is_main:
            write_json(out / CONFIG, {**self.run_info, "train_config": asdict(c)})
        return step

    def _training_model(self, step: int) -> torch.nn.Module:
        """The model the steps run: compiled where it pays (``--compile``), wrapped in DDP under torchrun (FSDP
        shards the model itself, in :meth:`_start`)."""
        c = self.config
        checkpointed = enable_activation_checkpointing(self.model) if c.activation_checkpointing else 0
        use_compile = c.compile == "yes" or (c.compile == "auto" and self.device.type == "cuda")
        maybe_compile(self.model, self.device, enabled=use_compile, log=self.print)
        train_model = self.model
        if self.dist.enabled and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(self.model, device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None)
        if self.device.type == "cpu":
            keep_freed_memory()  # every step's activations reuse the last step's pages, no page faults
        self.print(f"training on {describe_device(self.device, c.precision)}"
                   + (f", {self.dist.world_size} processes" + (" (fully sharded)" if self.sharded else "")
                      if self.dist.enabled else "")
                   + (f", activation checkpointing in {checkpointed} blocks" if checkpointed else "")
                   + f": {sum(p.numel() for p in self.model.parameters()):,} parameters, steps "
                   f"{step:,} -> {c.max_iters:,}, {c.batch_size * c.grad_accum * self.dist.world_size} "
                   "examples per step")
        return train_model

    def _step(self, train_model: torch.nn.Module, lr: float) -> int:
        """One optimizer step: ``grad_accum`` micro-batches forward and backward (gradients synchronized across
        processes on the last one only), clipping, the update. Returns the tokens it trained on, all processes."""
        c = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        tokens = 0
        for micro_step in range(c.grad_accum):
            batch = self.task.sample_batch(c.batch_size, self.generator, self.device, self.dist.rank, self.dist.world_size)
            last = micro_step == c.grad_accum - 1
            sync = contextlib.nullcontext() if last else accumulating(train_model)
            with sync:
                with autocast(self.device, precision=c.precision):
                    loss = self.task.loss(train_model, batch) / c.grad_accum
                (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            self.interval_sum += loss.detach().double()
            self.last_finite_loss = torch.where(torch.isfinite(loss.detach()), loss.detach().double(),
                                                self.last_finite_loss)  # no host sync: read only if the run diverges
            if self.first_loss is None:
                self.first_loss = loss.detach().double()
            tokens = self.task.batch_tokens(batch) * c.grad_accum * self.dist.world_size
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # fp16: the gradients divided by the loss scale, before clipping
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self._scaled_step()
        self.optimizer.zero_grad(set_to_none=True)
        return tokens

    def _scaled_step(self) -> None:
        """fp16: the optimizer step, skipped by the gradient scaler when a gradient overflowed (counted), then the
        loss scale's update (halved after an overflow, doubled after 2000 good steps; :mod:`minillm.loss_scaling`)."""
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.get_scale() < scale:  # it backed off: this step's gradients overflowed, the step was skipped
            self.state.skipped_steps += 1

    def _scaler_report(self) -> str:
        """fp16: the loss scale and the steps skipped so far, for the log lines; empty for bf16 and fp32."""
        if self.scaler is None:
            return ""
        return f", loss scale 2^{math.log2(self.scaler.get_scale()):g}, {self.state.skipped_steps:,} steps skipped"

    def _log_progress(self, step: int, lr: float) -> None:
        """The one host sync per log interval: the mean training loss since the last log line, on the progress
        bar and in the history; a loss that is no longer finite stops the run, keeping the last good checkpoint."""
        state = self.state
        state.interval_loss_sum = self._mean_over_processes(self.interval_sum).item()
        if not math.isfinite(state.interval_loss_sum):
            raise MinillmError(self._divergence(step))
        logged_sum, logged_steps = self.logged
        mean_loss = (state.interval_loss_sum - logged_sum) / (state.interval_steps - logged_steps)
        self.logged = (state.interval_loss_sum, state.interval_steps)
        state.history.append([step, mean_loss])
        elapsed = time.perf_counter() - self.interval_start
        tokens_per_s = self.interval_tokens / elapsed if elapsed > 0 else 0.0
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self.bar.update(step - self.bar.n)

    def _divergence(self, step: int) -> str:
        """Why the loss stopped being finite, told apart by what came before it. The starting weights were finite
        (checked when loaded), so either the loss rose before it broke (the steps were too large: the learning
        rate) or it broke from an ordinary value (one batch gave no defined loss: the data or the task)."""
        kept = f"the last good checkpoint ({self.out / CHECKPOINT}, if any) is kept"
        scale = self.config.grad_accum  # the micro-batch losses were divided by it
        last, first = self.last_finite_loss.item() * scale, self.first_loss.item() * scale
        typical = min([loss for _, loss in self.state.history if math.isfinite(loss)]
                      + [value for value in (first, last) if math.isfinite(value)], default=math.nan)
        if math.isfinite(last) and last <= 2.0 * typical + 1.0:
            return (f"the loss became NaN or infinite by step {step:,} right after an ordinary loss of {last:.3f}, "
                    "without the rise a too-high learning rate gives first: one batch gave no defined loss, which "
                    f"points at the data or the task (please report it); {kept}")
        before = f" (it had risen to {last:.3g}, from {typical:.3g})" if math.isfinite(last) else ""
        return (f"training diverged: the loss became NaN or infinite by step {step:,}{before}; {kept}; "
                "try a lower --lr or --grad-clip")

    def _evaluate_and_checkpoint(self, step: int, lr: float) -> bool:
        """Estimate the validation loss (and accuracy), log it, keep the weights if they are the best so far,
        save a checkpoint, and start a new interval. Returns True when early stopping ends the run."""
        c, state = self.config, self.state
        val_loss, val_accuracy = self.evaluate(c.eval_iters)
        train_loss = state.interval_loss_sum / state.interval_steps
        elapsed = time.perf_counter() - self.interval_start
        entry = {"step": step, "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
                 "tokens_per_s": self.interval_tokens / elapsed if elapsed > 0 else 0.0}
        if self.scaler is not None:
            entry |= {"loss_scale": self.scaler.get_scale(), "skipped_steps": self.state.skipped_steps}
        self._log_eval(entry if val_accuracy is None else {**entry, "val_accuracy": val_accuracy})
        message = f"step {step:,}: train loss {train_loss:.4f}, val loss {val_loss:.4f}"
        message += "" if val_accuracy is None else f", val accuracy {val_accuracy:.1%}"
        message += self._scaler_report()
        self.bar.write(message) if not self.bar.disable else self.print(message)
        state.interval_loss_sum, state.interval_steps = 0.0, 0
        self.interval_sum.zero_()
        self.logged = (0.0, 0)
        if self._improves(val_loss, val_accuracy):
            state.best_val_loss, state.best_step, state.evals_since_best = val_loss, step, 0
            state.best_val_accuracy = -math.inf if val_accuracy is None else val_accuracy
            if self.dist.is_main or self.sharded:  # a sharded model is gathered by every process to rank 0
                save_weights(self.out / BEST_MODEL, self.model, {"run_info": self.run_info, "step": step,
                                                                 "val_loss": val_loss})
        else:
            state.evals_since_best += 1
        self._save(step)
        self.interval_start, self.interval_tokens = time.perf_counter(), 0
        if c.patience and state.evals_since_best >= c.patience:
            self.print(f"early stopping: no improvement in {c.patience} estimates; best was step {state.best_step:,}")
            return True
        return False

    def _finish(self, step: int, seconds: float, run_tokens: int, stopped_early: bool) -> TrainResult:
        """Restore the best weights, evaluate on the whole validation split, write results and the loss curve."""
        out, state = self.out, self.state
        if self.dist.enabled:
            dist.barrier()  # rank 0 has written the best weights
        if (out / BEST_MODEL).exists():
            tensors, _ = read_safetensors(out / BEST_MODEL)
            load_model_state(self.model, tensors, str(out / BEST_MODEL))
        val_loss, val_accuracy = self.evaluate(None)
        result = TrainResult(step, state.best_step, state.best_val_loss, val_loss, seconds,
                             run_tokens / seconds if seconds else 0.0, stopped_early, out, val_accuracy)
        loss_unit = self.task.loss_unit  # only a per-token loss has a perplexity
        perplexity = f", perplexity {result.val_perplexity:.2f}" if loss_unit == "nats/token" else ""
        accuracy = "" if val_accuracy is None else f", accuracy {val_accuracy:.1%}"
        self.print(f"best model: step {result.best_step:,}; whole validation split: loss {val_loss:.4f}{perplexity}{accuracy}"
                   + (f" (fp16{self._scaler_report()})" if self.scaler is not None else ""))
        if self.dist.is_main:
            write_json(out / RESULTS, {"steps": step, "best_step": result.best_step,
                                       "best_val_loss_estimate": result.best_val_loss, "val_loss": val_loss,
                                       "val_perplexity": result.val_perplexity, "train_seconds": seconds,
                                       "tokens_per_s": result.tokens_per_s, "stopped_early": stopped_early,
                                       **({} if val_accuracy is None else {"val_accuracy": val_accuracy}),
                                       **({} if self.scaler is None else {"skipped_steps": state.skipped_steps})})
            plot_run(out, ylabel=f"loss ({loss_unit})")
        return result

    # -- helpers ---------------------------------------------------------------------------------

    def _lr(self, step: int) -> float:
        c = self.config
        return optim.warmup_cosine_lr(step, max_lr=c.lr, warmup_steps=c.warmup_iters, total_steps=c.decay_iters,
                                      min_lr=c.min_lr)

    @torch.no_grad()
    def evaluate(self, max_batches: int | None) -> tuple[float, float | None]:
        """``(loss, accuracy)`` on ``max_batches`` fixed validation batches of ``batch_size`` (None: the whole
        split, in batches 4x larger: without gradients they fit, and larger matmuls run faster): the mean loss,
        weighted by the task's ``eval_weight``, and the share of right predictions for a task that counts them
        (None for others)."""
        self.model.eval()
        total, count, correct, examples = 0.0, 0, 0, 0
        batch_size = self.config.batch_size * (4 if max_batches is None else 1)
        for batch in self.task.eval_batches(batch_size, self.device, max_batches):
            with autocast(self.device, precision=self.config.precision):
                loss, right = self.task.evaluate_batch(self.model, batch)
            n = self.task.eval_weight(batch)
            total, count = total + loss.item() * n, count + n
            if right is not None:
                correct, examples = correct + int(right), examples + n
        self.model.train()
        return self._rank_zero_decides(total / count, correct / examples if self.task.counts_correct else None)

    def _rank_zero_decides(self, loss: float, accuracy: float | None) -> tuple[float, float | None]:
        """Rank 0's estimate, in every process. Each process evaluates the same batches on the same weights, but
        the estimate decides what happens next (keep the best model, stop early), and a process that decided
        otherwise (a different rounding, one bad batch) would wait forever in a collective its peers skipped."""
        if not self.dist.enabled:
            return loss, accuracy
        values = [loss, accuracy]
        dist.broadcast_object_list(values, src=0)
        return values[0], values[1]

    def _improves(self, loss: float, accuracy: float | None) -> bool:
        """Is this estimate the best so far: a lower loss, or with ``select_by="accuracy"`` a higher
        accuracy (an equal one with a lower loss)?"""
        if self.config.select_by == "loss":
            return loss < self.state.best_val_loss
        return (accuracy, -loss) > (self.state.best_val_accuracy, -self.state.best_val_loss)

    def _save(self, step: int) -> None:
        if self.dist.is_main or self.sharded:  # a sharded model is gathered by every process to rank 0
            save_training_state(self.out / CHECKPOINT, self.model, self.optimizer, step=step,
                                generators={"data": self.generator},
                                metadata={"run_info": self.run_info, "train_config": asdict(self.config),
                                          **asdict(self.state),
                                          **({} if self.scaler is None else {"grad_scaler": self.scaler.state_dict()})})

    def _mean_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the processes (itself in one process): the training loss of the global
        batch, the same number in every process, so that all of them see a divergence at the same step."""
        if not self.dist.enabled:
            return value
        total = value.clone()
        dist.all_reduce(total)
        return total / self.dist.world_size

    def _log_eval(self, entry: dict) -> None:
        if self.dist.is_main:
            with open(self.out / LOG, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")

    def _truncate_log(self, step: int) -> None:
        """On resume, drop log lines written after the checkpoint (they will be written again)."""
        path = self.out / LOG
        if self.dist.is_main and path.exists():
            lines = [line for line in path.read_text(encoding="utf-8").splitlines()
                     if line.strip() and json.loads(line)["step"] <= step]
            atomic_write_text(path, "".join(line + "\n" for line in lines))

    def _catch_ctrl_c(self) -> "_CtrlC":
        return _CtrlC(enabled=not self.dist.enabled and self.dist.is_main and _in_main_thread())


class _CtrlC:
    """The first Ctrl-C sets a flag (the loop finishes its step, checkpoints and stops); a second one stops at
    once. Calling the object asks whether Ctrl-C was pressed; :meth:`restore` puts the old handler back."""

    def __init__(self, enabled: bool):
        self.pressed, self.previous = False, None
        if enabled:
            self.previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame):
        self.pressed = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __call__(self) -> bool:
        return self.pressed

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def plot_run(out: str | os.PathLike, ylabel: str = "loss (nats/token)") -> pathlib.Path | None:
    """``<out>/loss.png``: the training loss at every log interval and the validation estimates.
    ``ylabel`` names the loss's unit: per token for a language model, per example for a classifier."""
    out = pathlib.Path(out)
    log = read_log(out)
    if not log:
        return None
    history = read_safetensors(out / CHECKPOINT)[1].get("history", []) if (out / CHECKPOINT).exists() else []
    curves = {}
    if history:
        curves["train (per log interval)"] = ([h[0] for h in history], [h[1] for h in history])
    curves["validation (estimate)"] = ([e["step"] for e in log], [e["val_loss"] for e in log])
    return plots.plot_loss_curves(curves, out / LOSS_PLOT, title=f"Training loss: {out.name}", ylabel=ylabel)
