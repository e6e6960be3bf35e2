"""One training loop for every model in minillm: GPT and BERT pretraining, fine-tuning, contrastive learning.

What a model-specific part provides is a *task* (duck-typed, see :class:`LanguageModelingTask`):

- ``sample_batch(batch_size, generator, device, rank, world_size)``: a random training batch,
- ``loss(model, batch) -> tensor``: the mean loss of a batch,
- ``eval_batches(batch_size, device, max_batches=None)``: a fixed sequence of validation batches (all
  of the split when ``max_batches`` is None),
- ``batch_tokens(batch) -> int``: what the throughput counts, and what validation losses are
  weighted by unless the task has ``eval_weight(batch) -> int`` (e.g. examples, for a classifier);
- optionally ``evaluate_batch(model, batch) -> (loss, correct)``: a classifier's loss and its number
  of right predictions in one forward pass, so that validation also reports accuracy and
  ``--select-by accuracy`` can pick the best model by it.

:class:`Trainer` does the rest, the same way for every task: AdamW (``minillm.optim``, or torch's
fused kernel), linear warmup then cosine decay, gradient accumulation and clipping, bf16 autocast on
CUDA and on CPUs with bf16 instructions (``--precision``), ``torch.compile``, an estimate of the validation loss every ``eval_interval`` steps and the
whole validation split at the end, early stopping, the best model kept, a progress bar with loss,
tokens/s and ETA, ``<out>/log.jsonl``, a loss curve, and checkpoints that resume exactly. Under
``torchrun`` it runs data-parallel (DistributedDataParallel): every process draws its share of
one global batch, gradients are averaged, and only rank 0 writes anything.
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

from minillm import MinillmError, data, optim, plots
from minillm.checkpoint import (atomic_write_text, load_training_state, save_training_state, save_weights,
                                write_json)
from minillm.config import QuickConfig
from minillm.device import autocast, describe_device, keep_freed_memory, maybe_compile, pick_device, seed_everything

CHECKPOINT = "checkpoint.safetensors"  # the latest full training state: resume from it
BEST_MODEL = "model.safetensors"  # the weights with the best validation loss: sample or fine-tune from it
LOG = "log.jsonl"
RUN_FILES = ("config.json", CHECKPOINT, BEST_MODEL, LOG, "loss.png", "results.json", "tokenizer.json", "samples.txt")


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
    precision: Literal["auto", "bf16", "fp32"] = field(
        default="auto", metadata={"help": "matmul precision: auto is bf16 autocast on CUDA GPUs and on CPUs with bf16 "
                                          "instructions (AVX512-BF16, AMX), fp32 elsewhere; MINILLM_PRECISION overrides auto"})
    device: str = field(default="auto", metadata={"help": "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps"})
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
# Data parallelism
# ---------------------------------------------------------------------------------------------


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_request: str) -> tuple[Distributed, torch.device]:
    """Join the process group that ``torchrun`` describes (RANK, WORLD_SIZE, LOCAL_RANK in the
    environment): NCCL between GPUs, gloo between CPU processes. Without torchrun, one process."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Distributed(), pick_device(device_request)
    info = Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_request)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


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


class LanguageModelingTask:
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


def check_run_folder(out: pathlib.Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write into a folder that holds another run, unless told to resume or overwrite it."""
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if resume:
        if not (out / CHECKPOINT).exists():
            raise MinillmError(f"nothing to resume: {out / CHECKPOINT} does not exist")
        return
    if existing and not overwrite:
        raise MinillmError(f"{out} already holds a run ({', '.join(existing)}): pass --resume to continue it, "
                           "--overwrite to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise MinillmError(f"--out {out} is a file, not a folder")


def clear_run_folder(out: pathlib.Path) -> None:
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


class Trainer:
    """Train ``model`` on ``task`` as ``config`` says; see the module docstring.

    ``run_info`` is JSON-able and saved as ``<out>/config.json`` and in every checkpoint (e.g. the
    model's configuration and the tokenizer's file name); on ``--resume`` the run in ``--out``
    must have been made with the same ``run_info["model"]``.
    """

    def __init__(self, model: torch.nn.Module, task, config: TrainConfig, run_info: dict | None = None,
                 log: Callable[[str], None] | None = None):
        self.model, self.task, self.config = model, task, config
        self.run_info = run_info or {}
        self.out = pathlib.Path(config.out)
        self.dist, self.device = setup_distributed(config.device)
        self.print = (log or (lambda message: print(message, flush=True))) if self.dist.is_main else (lambda message: None)

    # -- helpers ---------------------------------------------------------------------------------

    def _lr(self, step: int) -> float:
        c = self.config
        return optim.warmup_cosine_lr(step, max_lr=c.lr, warmup_steps=c.warmup_iters, total_steps=c.decay_iters,
                                      min_lr=c.min_lr)

    @torch.no_grad()
    def evaluate(self, max_batches: int | None) -> tuple[float, float | None]:
        """``(loss, accuracy)`` on ``max_batches`` fixed validation batches of ``batch_size`` (None: the whole
        split, in batches 4x larger: without gradients they fit, and larger matmuls run faster): the mean loss,
        token-weighted (or as the task's ``eval_weight`` says), and the share of right predictions for a task
        with ``evaluate_batch`` (None for others)."""
        self.model.eval()
        total, count, correct, examples = 0.0, 0, 0, 0
        batch_size = self.config.batch_size * (4 if max_batches is None else 1)
        weight = getattr(self.task, "eval_weight", self.task.batch_tokens)  # what one unit of loss is counted per
        scorer = getattr(self.task, "evaluate_batch", None)
        for batch in self.task.eval_batches(batch_size, self.device, max_batches):
            with autocast(self.device, precision=self.config.precision):
                if scorer is None:
                    loss = self.task.loss(self.model, batch)
                else:
                    loss, right = scorer(self.model, batch)
                    correct, examples = correct + int(right), examples + self.task.eval_weight(batch)
            n = weight(batch)
            total, count = total + loss.item() * n, count + n
        self.model.train()
        return total / count, (correct / examples if scorer is not None else None)

    def _improves(self, loss: float, accuracy: float | None, state: dict) -> bool:
        """Is this estimate the best so far: a lower loss, or with ``select_by="accuracy"`` a higher
        accuracy (an equal one with a lower loss)?"""
        if self.config.select_by == "loss":
            return loss < state["best_val_loss"]
        return (accuracy, -loss) > (state["best_val_accuracy"], -state["best_val_loss"])

    def _save(self, step: int, state: dict) -> None:
        if self.dist.is_main:
            save_training_state(self.out / CHECKPOINT, self.model, self.optimizer, step=step,
                                generators={"data": self.generator},
                                metadata={"run_info": self.run_info, "train_config": asdict(self.config), **state})

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

    # -- the loop --------------------------------------------------------------------------------

    def fit(self, stop_after: int | None = None, prepare: Callable[[pathlib.Path], None] | None = None) -> TrainResult:
        """Train to ``max_iters`` (or early stopping); ``stop_after=k`` stops after step k as Ctrl-C
        would (checkpoint saved, run resumable), for tests and demonstrations. ``prepare(out)`` runs
        once the run folder is checked and empty, before training (not on resume): write what the
        run needs beside its checkpoints there, e.g. the tokenizer."""
        c, out = self.config, self.out
        if c.select_by == "accuracy" and not hasattr(self.task, "evaluate_batch"):
            raise MinillmError("--select-by accuracy needs a classification task (one that counts right predictions)")
        if self.dist.is_main:
            check_run_folder(out, c.resume, c.overwrite)
            if c.overwrite:
                clear_run_folder(out)
            out.mkdir(parents=True, exist_ok=True)
            if prepare is not None and not c.resume:
                prepare(out)
        if self.dist.enabled:
            dist.barrier()
        seed_everything(c.seed + self.dist.rank)  # dropout differs between processes; batches do not
        self.model.to(self.device)
        self.optimizer = make_optimizer(self.model, c, self.device)
        self.generator = torch.Generator().manual_seed(c.seed)  # the data order: the same in every process
        state = {"history": [], "best_val_loss": math.inf, "best_val_accuracy": -math.inf, "best_step": -1,
                 "evals_since_best": 0, "interval_loss_sum": 0.0, "interval_steps": 0}
        step = 0
        if c.resume:
            header = load_training_state(out / CHECKPOINT, self.model, self.optimizer, {"data": self.generator})
            saved_model = header.get("run_info", {}).get("model")
            if saved_model != self.run_info.get("model"):
                raise MinillmError(f"the run in {out} was made with model {saved_model}, not {self.run_info.get('model')}: "
                                   "resume with the same model options, or start a new --out")
            step = header["step"]
            state = {key: header.get(key, default) for key, default in state.items()}
            self._truncate_log(step)
            self.print(f"resuming {out} at step {step:,}")
        if self.dist.is_main:
            write_json(out / "config.json", {**self.run_info, "train_config": asdict(c)})

        use_compile = c.compile == "yes" or (c.compile == "auto" and self.device.type == "cuda")
        maybe_compile(self.model, self.device, enabled=use_compile, log=self.print)
        train_model = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(self.model, device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None)
        tokens_per_step = 0
        if self.device.type == "cpu":
            keep_freed_memory()  # every step's activations reuse the last step's pages, no page faults
        self.print(f"training on {describe_device(self.device, c.precision)}"
                   + (f", {self.dist.world_size} processes" if self.dist.enabled else "")
                   + f": {sum(p.numel() for p in self.model.parameters()):,} parameters, steps {step:,} -> {c.max_iters:,}, "
                   f"{c.batch_size * c.grad_accum * self.dist.world_size} examples per step")

        interrupted = {"flag": False}
        previous_handler = None
        if not self.dist.enabled and self.dist.is_main and _in_main_thread():
            def on_sigint(signum, frame):  # first Ctrl-C: finish the step, checkpoint, stop; second: stop now
                interrupted["flag"] = True
                signal.signal(signal.SIGINT, signal.default_int_handler)
            previous_handler = signal.signal(signal.SIGINT, on_sigint)

        bar = tqdm(total=c.max_iters, initial=step, desc="training", disable=not (c.progress and self.dist.is_main),
                   dynamic_ncols=True, mininterval=0.5)
        start_time = interval_start = time.perf_counter()
        interval_tokens = run_tokens = 0
        # The losses since the last estimate are summed on the device (no host sync per step) in float64,
        # and saved in checkpoints, so a resumed run adds them up in exactly the same order.
        interval_sum = torch.tensor(state["interval_loss_sum"], dtype=torch.float64, device=self.device)
        logged_sum, logged_steps = state["interval_loss_sum"], state["interval_steps"]
        stopped_early = False
        self.model.train()
        try:
            while step < c.max_iters:
                lr = self._lr(step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                for micro_step in range(c.grad_accum):
                    batch = self.task.sample_batch(c.batch_size, self.generator, self.device, self.dist.rank,
                                                   self.dist.world_size)
                    last = micro_step == c.grad_accum - 1
                    sync = contextlib.nullcontext() if (last or not self.dist.enabled) else train_model.no_sync()
                    with sync:
                        with autocast(self.device, precision=c.precision):
                            loss = self.task.loss(train_model, batch) / c.grad_accum
                        loss.backward()
                    interval_sum += loss.detach().double()
                    tokens_per_step = self.task.batch_tokens(batch) * c.grad_accum * self.dist.world_size
                if c.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                state["interval_steps"] += 1
                interval_tokens += tokens_per_step
                run_tokens += tokens_per_step

                at_eval = step % c.eval_interval == 0 or step == c.max_iters
                stopping = interrupted["flag"] or (stop_after is not None and step >= stop_after)
                if step % c.log_interval == 0 or at_eval or stopping:
                    state["interval_loss_sum"] = interval_sum.item()  # the one host sync per log interval
                    if not math.isfinite(state["interval_loss_sum"]):
                        raise MinillmError(
                            f"training diverged: the loss became {state['interval_loss_sum']} by step {step:,}. The last "
                            f"good checkpoint ({out / CHECKPOINT}, if any) is kept; try a lower --lr or --grad-clip")
                    mean_loss = (state["interval_loss_sum"] - logged_sum) / (state["interval_steps"] - logged_steps)
                    logged_sum, logged_steps = state["interval_loss_sum"], state["interval_steps"]
                    state["history"].append([step, mean_loss])
                    elapsed = time.perf_counter() - interval_start
                    tokens_per_s = interval_tokens / elapsed if elapsed > 0 else 0.0
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                    bar.update(step - bar.n)
                if at_eval:
                    val_loss, val_accuracy = self.evaluate(c.eval_iters)
                    train_loss = state["interval_loss_sum"] / state["interval_steps"]
                    elapsed = time.perf_counter() - interval_start
                    entry = {"step": step, "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
                             "tokens_per_s": interval_tokens / elapsed if elapsed > 0 else 0.0}
                    self._log_eval(entry if val_accuracy is None else {**entry, "val_accuracy": val_accuracy})
                    message = f"step {step:,}: train loss {train_loss:.4f}, val loss {val_loss:.4f}"
                    message += "" if val_accuracy is None else f", val accuracy {val_accuracy:.1%}"
                    bar.write(message) if not bar.disable else self.print(message)
                    state["interval_loss_sum"], state["interval_steps"] = 0.0, 0
                    interval_sum.zero_()
                    logged_sum, logged_steps = 0.0, 0
                    if self._improves(val_loss, val_accuracy, state):
                        state["best_val_loss"], state["best_step"], state["evals_since_best"] = val_loss, step, 0
                        state["best_val_accuracy"] = -math.inf if val_accuracy is None else val_accuracy
                        if self.dist.is_main:
                            save_weights(out / BEST_MODEL, self.model, {"run_info": self.run_info, "step": step,
                                                                        "val_loss": val_loss})
                    else:
                        state["evals_since_best"] += 1
                    self._save(step, state)
                    interval_start, interval_tokens = time.perf_counter(), 0
                    if c.patience and state["evals_since_best"] >= c.patience:
                        self.print(f"early stopping: no improvement in {c.patience} estimates; best was step {state['best_step']:,}")
                        stopped_early = True
                        break
                elif stopping:
                    self._save(step, state)
                if stopping:
                    self.print(f"\nstopped at step {step:,}; checkpoint saved: continue with --resume")
                    break
        finally:
            bar.close()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        seconds = time.perf_counter() - start_time
        if step < c.max_iters and not stopped_early:  # stopped on request: no final evaluation
            return TrainResult(step, state["best_step"], state["best_val_loss"], math.nan, seconds,
                               run_tokens / seconds if seconds else 0.0, False, out)
        return self._finish(step, state, seconds, run_tokens, stopped_early)

    def _finish(self, step: int, state: dict, seconds: float, run_tokens: int, stopped_early: bool) -> TrainResult:
        """Restore the best weights, evaluate on the whole validation split, write results and the loss curve."""
        from minillm.checkpoint import load_model_state, read_safetensors

        out = self.out
        if self.dist.enabled:
            dist.barrier()  # rank 0 has written the best weights
        if (out / BEST_MODEL).exists():
            tensors, _ = read_safetensors(out / BEST_MODEL)
            load_model_state(self.model, tensors, str(out / BEST_MODEL))
        val_loss, val_accuracy = self.evaluate(None)
        result = TrainResult(step, state["best_step"], state["best_val_loss"], val_loss, seconds,
                             run_tokens / seconds if seconds else 0.0, stopped_early, out, val_accuracy)
        loss_unit = getattr(self.task, "loss_unit", "nats")  # only a per-token loss has a perplexity
        perplexity = f", perplexity {result.val_perplexity:.2f}" if loss_unit == "nats/token" else ""
        accuracy = "" if val_accuracy is None else f", accuracy {val_accuracy:.1%}"
        self.print(f"best model: step {result.best_step:,}; whole validation split: loss {val_loss:.4f}{perplexity}{accuracy}")
        if self.dist.is_main:
            write_json(out / "results.json", {"steps": step, "best_step": result.best_step,
                                              "best_val_loss_estimate": result.best_val_loss, "val_loss": val_loss,
                                              "val_perplexity": result.val_perplexity, "train_seconds": seconds,
                                              "tokens_per_s": result.tokens_per_s, "stopped_early": stopped_early,
                                              **({} if val_accuracy is None else {"val_accuracy": val_accuracy})})
            plot_run(out, ylabel=f"loss ({loss_unit})")
        return result


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def read_log(out: str | os.PathLike) -> list[dict]:
    """The eval lines of ``<out>/log.jsonl``."""
    path = pathlib.Path(out) / LOG
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.exists() else []


def plot_run(out: str | os.PathLike, ylabel: str = "loss (nats/token)") -> pathlib.Path | None:
    """``<out>/loss.png``: the training loss at every log interval and the validation estimates.
    ``ylabel`` names the loss's unit: per token for a language model, per example for a classifier."""
    from minillm.checkpoint import read_safetensors

    out = pathlib.Path(out)
    log = read_log(out)
    if not log:
        return None
    history = read_safetensors(out / CHECKPOINT)[1].get("history", []) if (out / CHECKPOINT).exists() else []
    curves = {}
    if history:
        curves["train (per log interval)"] = ([h[0] for h in history], [h[1] for h in history])
    curves["validation (estimate)"] = ([e["step"] for e in log], [e["val_loss"] for e in log])
    return plots.plot_loss_curves(curves, out / "loss.png", title=f"Training loss: {out.name}", ylabel=ylabel)
