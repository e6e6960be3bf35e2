"""Pipeline parallelism: a GPT cut into stages, one per process, fed micro-batches one after another.

::

    stage 0: ids -> wte + wpe -> blocks 0..k-1      --send activations-->
    stage 1:                     blocks k..2k-1     --send activations-->   ...
    stage p-1:                   blocks .. -> ln_f -> lm_head -> loss
                                 <--send the gradients of the activations back--

A model too large for one device is cut by depth: each of p processes holds a few consecutive blocks and
passes its output on. Run one batch through naively and p-1 of the p devices wait at any moment. GPipe
(Huang et al., 2019, "GPipe: Efficient Training of Giant Neural Networks using Pipeline Parallelism") cuts
the batch into m micro-batches: every stage runs all m forwards (stage s works on micro-batch i while
stage s+1 works on i-1), then all m backwards, the gradients adding up over the micro-batches. The
pipeline still has to fill and drain; with equal stages each device idles the *bubble*

.. math::  \\frac{p - 1}{m + p - 1}

of its time. 1F1B (PipeDream-Flush, Narayanan et al., 2021) runs the same work in another order: a stage
starts the backward of a micro-batch as soon as it can, so the bubble is the same but a stage holds the
activations of at most p - s micro-batches instead of m.

Here: :func:`split_gpt` (the stages), :func:`gpipe_step` (GPipe by hand, with ``dist.send``/``dist.recv``),
:func:`build_schedule` (the same through ``torch.distributed.pipelining``), :func:`simulate_pipeline` (an exact
timeline of both schedules), and the chapter's demonstrations, which run in processes started by
:func:`minillm.distributed.spawn`.
"""

from __future__ import annotations

import contextlib
import copy
import numbers
import os
import pathlib
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Literal, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minillm import MinillmError
from minillm.distributed import spawn
from minillm.gpt import GPT, GPTConfig

Schedule = Literal["gpipe", "1f1b"]

# ---------------------------------------------------------------------------------------------
# Cutting a GPT into stages
# ---------------------------------------------------------------------------------------------


class GPTStage(nn.Module):
    """Consecutive pieces of a :class:`~minillm.gpt.GPT`: ``[wte + wpe] -> blocks -> [ln_f -> lm_head]``.

    The first stage reads token ids (B, T), the others hidden states (B, T, n_embd); the last returns logits
    (B, T, vocab), the others hidden states. Parameters keep the unsplit model's names (``blocks.3.mlp.c_fc.weight``
    lives in the stage that holds block 3), so a stage's state dict is a slice of the model's.
    """

    def __init__(self, model: GPT, block_indices: range, first: bool, last: bool):
        super().__init__()
        self.wte = model.wte if first else None
        self.wpe = model.wpe if first else None
        self.drop = model.drop if first else None
        self.rotary = model.rotary  # buffers only (no parameters): every stage with blocks needs the angles
        self.blocks = nn.ModuleDict({str(index): model.blocks[index] for index in block_indices})
        self.ln_f = model.ln_f if last else None
        self.tied = model.lm_head.weight is model.wte.weight  # GPT-2's output layer is its token embedding
        self.lm_head = None
        if last:  # a last stage that is not also the first gets its own copy of a tied matrix (equal values)
            self.lm_head = copy.deepcopy(model.lm_head) if self.tied and not first else model.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wte is not None:
            length = x.shape[1]
            x = self.wte(x)  # (B, T) ids -> (B, T, n_embd)
            if self.wpe is not None:
                x = x + self.wpe(length)  # + (T, n_embd)
            x = self.drop(x)
        for block in self.blocks.values():
            x = block(x, None, self.rotary)  # (B, T, n_embd)
        if self.lm_head is not None:
            x = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        return x

    def tied_weight(self) -> nn.Parameter | None:
        """This stage's copy of the token-embedding matrix that the unsplit model shares with its output layer,
        or None (a middle stage, an untied model, or a single stage that holds both uses in one matrix)."""
        if not self.tied or (self.wte is not None and self.lm_head is not None):
            return None
        holder = self.wte if self.wte is not None else self.lm_head
        return holder.weight if holder is not None else None


def stage_layers(n_layer: int, n_stages: int) -> list[range]:
    """The blocks of each stage: ``n_layer`` blocks in ``n_stages`` consecutive runs as equal as can be, the
    first stages taking one more when it does not divide (e.g. 5 blocks in 2 stages: 0-2 and 3-4)."""
    if not 1 <= n_stages <= n_layer:
        raise ValueError(f"n_stages must be between 1 and the model's {n_layer} blocks, got {n_stages}")
    size, extra = divmod(n_layer, n_stages)
    starts = [stage * size + min(stage, extra) for stage in range(n_stages + 1)]
    return [range(starts[stage], starts[stage + 1]) for stage in range(n_stages)]


def split_gpt(model: GPT, n_stages: int) -> list[GPTStage]:
    """``model`` cut into ``n_stages`` :class:`GPTStage` s; running them one after another computes the model's logits.

    The stages hold copies (the model passed in is left as it was). A tied model (``wte`` is ``lm_head``) cannot
    share one matrix between two processes, so, as Megatron-LM does (Shoeybi et al., 2019), the first and the
    last stage each hold a copy; the model's gradient of the shared matrix is the sum of what both uses
    contribute, so :func:`sum_tied_gradients` adds the two copies' gradients before each optimizer step, and
    the copies, starting equal and updated alike, stay equal.
    """
    model = copy.deepcopy(model)  # the stages own their parameters
    layers = stage_layers(model.config.n_layer, n_stages)
    return [GPTStage(model, blocks, first=index == 0, last=index == n_stages - 1) for index, blocks in enumerate(layers)]


def tied_embedding_group(n_stages: int) -> dist.ProcessGroup | None:
    """The process group of the first and the last stage, which hold the two copies of a tied embedding (every
    process must call this, as it must every ``new_group``); None with one stage."""
    return dist.new_group([0, n_stages - 1]) if n_stages > 1 else None


def sum_tied_gradients(stage: GPTStage, group: dist.ProcessGroup | None) -> None:
    """Megatron's embedding all-reduce: on the first and the last stage, the tied matrix's gradient becomes
    :math:`\\nabla_{W} = \\nabla_W^{\\text{wte}} + \\nabla_W^{\\text{lm\\_head}}`, the unsplit model's."""
    weight = stage.tied_weight()
    if weight is not None and group is not None:
        dist.all_reduce(weight.grad, group=group)


def language_model_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean next-token cross-entropy of :meth:`GPT.forward` on logits (B, T, vocab) and targets (B, T).

    The mean over m equal micro-batches of this loss is the whole batch's loss when no target is ignored
    (-100); with ignored targets the micro-batches' means would weigh their tokens unequally.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)  # (B*T, V)


# ---------------------------------------------------------------------------------------------
# GPipe by hand
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """One piece of work on one stage: the forward ("F") or backward ("B") of a micro-batch, from start to end."""

    kind: str
    micro_batch: int
    start: float
    end: float


@contextlib.contextmanager
def _timed(events: list | None, kind: str, micro_batch: int):
    start = time.perf_counter()
    yield
    if events is not None:
        events.append(Interval(kind, micro_batch, start, time.perf_counter()))


def gpipe_step(stage: nn.Module, n_microbatches: int, activation_shape: Sequence[int], inputs: torch.Tensor | None = None,
               targets: torch.Tensor | None = None, loss_fn: Callable = language_model_loss,
               events: list | None = None) -> torch.Tensor | None:
    """One GPipe forward and backward of a batch on this process's stage (stage = rank, one per process).

    The first stage cuts ``inputs`` (B, ...) into m micro-batches, the last cuts ``targets``; between stages the
    activations of one micro-batch have the fixed ``activation_shape`` (e.g. (B/m, T, n_embd)). Each stage runs

    - the m forwards in order: receive x_i from stage s-1, y_i = stage(x_i), send y_i to stage s+1;
      the last stage computes :math:`\\ell_i / m` instead of sending;
    - the m backwards in reverse order: receive :math:`\\partial L/\\partial y_i` from stage s+1, backpropagate
      through the stage (the parameters' ``.grad`` add up over i), send :math:`\\partial L / \\partial x_i` to s-1.

    so the gradients are those of :math:`L = \\frac{1}{m}\\sum_i \\ell_i`. Returns L on the last stage, None on the
    others. ``events``, when a list, receives each forward's and backward's :class:`Interval` (``perf_counter``).
    """
    rank, n_stages = dist.get_rank(), dist.get_world_size()
    first, last = rank == 0, rank == n_stages - 1
    if n_microbatches < 1:
        raise ValueError(f"n_microbatches must be at least 1, got {n_microbatches}")
    for name, batch in (("inputs", inputs if first else None), ("targets", targets if last else None)):
        if batch is not None and batch.shape[0] % n_microbatches:
            raise ValueError(f"a batch of {batch.shape[0]} {name} does not cut into {n_microbatches} equal micro-batches")
    dtype = next(stage.parameters()).dtype
    micro_inputs = inputs.chunk(n_microbatches) if first else None
    micro_targets = targets.chunk(n_microbatches) if last else None
    stage_inputs, stage_outputs, losses = [], [], []  # held from a micro-batch's forward until its backward

    for i in range(n_microbatches):  # all the forwards
        if first:
            x = micro_inputs[i]
        else:
            x = torch.empty(activation_shape, dtype=dtype)
            dist.recv(x, src=rank - 1)
            x.requires_grad_()  # its gradient is what goes back to stage s-1
        with _timed(events, "F", i):
            y = stage(x)
            if last:
                y = loss_fn(y, micro_targets[i]) / n_microbatches  # this micro-batch's share of the mean
        if last:
            losses.append(y.detach())
        else:
            dist.send(y.detach(), dst=rank + 1)
        stage_inputs.append(x)
        stage_outputs.append(y)

    for i in reversed(range(n_microbatches)):  # all the backwards, the last micro-batch first
        output_grad = None  # the last stage's output is its loss: d loss / d loss = 1
        if not last:
            output_grad = torch.empty(activation_shape, dtype=dtype)
            dist.recv(output_grad, src=rank + 1)
        with _timed(events, "B", i):
            stage_outputs[i].backward(output_grad)  # adds this micro-batch's gradient to every parameter's .grad
        if not first:
            dist.send(stage_inputs[i].grad, dst=rank - 1)
        stage_inputs[i] = stage_outputs[i] = None  # this micro-batch's activations can go
    return torch.stack(losses).sum() if last else None


# ---------------------------------------------------------------------------------------------
# The same through PyTorch's engine
# ---------------------------------------------------------------------------------------------


def build_schedule(stage: nn.Module, schedule: Schedule, n_microbatches: int, loss_fn: Callable = language_model_loss,
                   device: torch.device | str = "cpu"):
    """This process's stage (stage = rank) in ``torch.distributed.pipelining``: a ``PipelineStage`` run by
    ``ScheduleGPipe`` or ``Schedule1F1B`` (which needs at least as many micro-batches as stages). ``loss_fn(output,
    target)`` is each micro-batch's loss on the last stage; the schedule divides the gradients by m
    (``scale_grads``), so they are those of the mean loss, as in :func:`gpipe_step`."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    kinds = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
    if schedule not in kinds:
        raise ValueError(f"schedule must be one of {sorted(kinds)}, got {schedule!r}")
    n_stages = dist.get_world_size()
    if schedule == "1f1b" and n_microbatches < n_stages:
        raise ValueError(f"1F1B needs at least as many micro-batches as stages ({n_stages}), got {n_microbatches}")
    pipeline_stage = PipelineStage(stage, dist.get_rank(), n_stages, torch.device(device))
    return kinds[schedule](pipeline_stage, n_microbatches, loss_fn=loss_fn, scale_grads=True)


def schedule_step(schedule, inputs: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> torch.Tensor | None:
    """One forward and backward of a batch through a :func:`build_schedule` schedule: the first stage gives the
    inputs, the last the targets; returns the mean of the micro-batches' losses on the last stage, else None."""
    rank, n_stages = dist.get_rank(), dist.get_world_size()
    args = (inputs,) if rank == 0 else ()
    if rank != n_stages - 1:
        schedule.step(*args)
        return None
    losses: list[torch.Tensor] = []  # the schedule fills it with one loss per micro-batch
    schedule.step(*args, target=targets, losses=losses)
    return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------------
# The bubble: an exact timeline of a schedule
# ---------------------------------------------------------------------------------------------


def gpipe_bubble_fraction(n_stages: int, n_microbatches: int) -> Fraction:
    """The share of each stage's time spent idle in GPipe with equal stages: :math:`(p - 1) / (m + p - 1)`."""
    return Fraction(n_stages - 1, n_microbatches + n_stages - 1)


def _ratio(numerator, denominator):
    exact = isinstance(numerator, numbers.Rational) and isinstance(denominator, numbers.Rational)
    return Fraction(numerator) / Fraction(denominator) if exact else numerator / denominator


@dataclass
class PipelineTimeline:
    """What each stage did and when: ``stages[s]`` lists stage s's :class:`Interval` s in the order they ran.

    Time runs from 0 to the ``makespan``, the end of the last piece of work; a stage is idle whenever it is
    not working, before its first piece, between pieces, and after its last.
    """

    stages: list[list[Interval]]

    @property
    def makespan(self):
        return max(interval.end for intervals in self.stages for interval in intervals)

    def busy(self, stage: int):
        return sum(interval.end - interval.start for interval in self.stages[stage])

    def bubble_fraction(self, stage: int):
        """Idle time over the makespan: a ``Fraction`` when the times are integers or fractions."""
        return _ratio(self.makespan - self.busy(stage), self.makespan)

    def idle_intervals(self, stage: int) -> list[tuple[float, float]]:
        gaps, clock = [], 0
        for interval in sorted(self.stages[stage], key=lambda interval: interval.start):
            if interval.start > clock:
                gaps.append((clock, interval.start))
            clock = max(clock, interval.end)
        if clock < self.makespan:
            gaps.append((clock, self.makespan))
        return gaps

    def peak_in_flight(self, stage: int) -> int:
        """The most micro-batches whose activations the stage holds at once (forward done, backward not yet)."""
        held = peak = 0
        for interval in self.stages[stage]:
            held += 1 if interval.kind == "F" else -1
            peak = max(peak, held)
        return peak


def pipeline_order(schedule: Schedule, n_stages: int, n_microbatches: int, stage: int) -> list[tuple[str, int]]:
    """The order in which a stage runs its work, as ("F" or "B", micro-batch) pairs.

    GPipe: F0 .. F(m-1), then B(m-1) .. B0 (:func:`gpipe_step`'s order). 1F1B: p-s-1 forwards to fill the
    pipeline, then one forward and one backward in turn, then the remaining backwards (``Schedule1F1B``'s order).
    """
    if schedule == "gpipe":
        return [("F", i) for i in range(n_microbatches)] + [("B", i) for i in reversed(range(n_microbatches))]
    if schedule != "1f1b":
        raise ValueError(f"schedule must be 'gpipe' or '1f1b', got {schedule!r}")
    warmup = min(n_stages - stage - 1, n_microbatches)
    order = [("F", i) for i in range(warmup)]
    for i in range(n_microbatches - warmup):
        order += [("F", warmup + i), ("B", i)]
    return order + [("B", i) for i in range(n_microbatches - warmup, n_microbatches)]


def simulate_pipeline(n_stages: int, n_microbatches: int, schedule: Schedule = "gpipe", forward_cost=1,
                      backward_cost=2, send_cost=0) -> PipelineTimeline:
    """The timeline of a schedule on ideal devices: every stage's forward of a micro-batch takes ``forward_cost``,
    its backward ``backward_cost``, and a message between stages ``send_cost``.

    Each stage runs its :func:`pipeline_order` and starts a piece of work as soon as the stage is free and what
    it needs has arrived: the forward of micro-batch i on stage s needs stage s-1's forward of i, the backward
    needs stage s+1's backward of i (the last stage's needs only its own forward, which came earlier). With
    integer or ``Fraction`` costs every time, and so the bubble, is exact.
    """
    if n_stages < 1 or n_microbatches < 1:
        raise ValueError(f"a pipeline needs at least one stage and one micro-batch, got {n_stages} and {n_microbatches}")
    orders = [pipeline_order(schedule, n_stages, n_microbatches, stage) for stage in range(n_stages)]
    cost = {"F": forward_cost, "B": backward_cost}
    finished = {}  # (stage, kind, micro-batch) -> when it ended
    timeline = [[] for _ in range(n_stages)]
    while any(len(timeline[stage]) < len(orders[stage]) for stage in range(n_stages)):
        progressed = False
        for stage in range(n_stages):
            while len(timeline[stage]) < len(orders[stage]):
                kind, i = orders[stage][len(timeline[stage])]
                source = stage - 1 if kind == "F" else stage + 1  # the stage whose result this work needs
                if 0 <= source < n_stages and (source, kind, i) not in finished:
                    break  # wait for it
                arrives = finished[(source, kind, i)] + send_cost if 0 <= source < n_stages else 0
                start = max(timeline[stage][-1].end if timeline[stage] else 0, arrives)
                timeline[stage].append(Interval(kind, i, start, start + cost[kind]))
                finished[(stage, kind, i)] = start + cost[kind]
                progressed = True
        if not progressed:
            raise MinillmError(f"the {schedule} schedule deadlocks with {n_stages} stages and {n_microbatches} micro-batches")
    return PipelineTimeline(timeline)


# ---------------------------------------------------------------------------------------------
# Demonstrations (each runs in processes started by minillm.distributed.spawn)
# ---------------------------------------------------------------------------------------------

DEMO_CONFIG = GPTConfig(vocab_size=37, block_size=16, n_layer=4, n_head=2, n_embd=16, dropout=0.0)


def _largest_gradient_difference(stage: nn.Module, reference: Mapping[str, torch.Tensor]) -> float:
    return max((parameter.grad - reference[name]).abs().max().item() for name, parameter in stage.named_parameters())


def compare_stage_with_unsplit(rank: int, world_size: int, config: GPTConfig, micro_batch_counts: Sequence[int],
                               batch_size: int, seed: int) -> dict:
    """On one process: the unsplit model's loss and gradients on the whole batch, then this rank's stage through
    the hand-written GPipe and through torch's GPipe and 1F1B, compared with them."""
    torch.manual_seed(seed)
    model = GPT(config).double().eval()  # float64: what differs is rounding; eval: no dropout masks to differ
    stage = split_gpt(model, world_size)[rank]
    data = torch.Generator().manual_seed(seed + 1)  # the same batch in every process
    ids = torch.randint(config.vocab_size, (batch_size, config.block_size), generator=data)  # (B, T)
    targets = torch.randint(config.vocab_size, (batch_size, config.block_size), generator=data)  # (B, T)
    _, loss = model(ids, targets)
    loss.backward()
    reference = {name: model.get_parameter(name).grad for name, _ in stage.named_parameters()}
    group = tied_embedding_group(world_size)
    last = rank == world_size - 1
    results: dict = {"largest gradient": max(gradient.abs().max().item() for gradient in reference.values()),
                     "parameters": sum(parameter.numel() for parameter in stage.parameters())}
    for m in micro_batch_counts:
        activation_shape = (batch_size // m, config.block_size, config.n_embd)  # (B/m, T, C)
        stage.zero_grad(set_to_none=True)
        pipeline_loss = gpipe_step(stage, m, activation_shape, ids, targets)
        sum_tied_gradients(stage, group)
        hand_written = {name: parameter.grad.clone() for name, parameter in stage.named_parameters()}
        results[("hand-written GPipe", m)] = {
            "loss difference": abs(pipeline_loss.item() - loss.item()) if last else None,
            "gradient difference": _largest_gradient_difference(stage, reference)}
        for schedule in ("gpipe", "1f1b"):
            if schedule == "1f1b" and m < world_size:
                continue  # Schedule1F1B needs m >= p
            stage.zero_grad(set_to_none=True)
            pipeline_loss = schedule_step(build_schedule(stage, schedule, m), ids, targets)
            sum_tied_gradients(stage, group)
            results[(f"torch {schedule}", m)] = {
                "loss difference": abs(pipeline_loss.item() - loss.item()) if last else None,
                "gradient difference": _largest_gradient_difference(stage, reference),
                "gradient difference to hand-written": _largest_gradient_difference(stage, hand_written)}
    return results


def pipeline_matches_unsplit(n_stages: int = 2, micro_batch_counts: Sequence[int] = (1, 2, 4), batch_size: int = 8,
                             config: GPTConfig = DEMO_CONFIG, seed: int = 0) -> dict:
    """A tiny GPT (float64) in ``n_stages`` processes, one batch through the hand-written GPipe and through
    ``torch.distributed.pipelining``'s GPipe and 1F1B for each m, against the unsplit model on the whole batch.

    Returns ``{(method, m): {"loss difference", "gradient difference"[, "gradient difference to hand-written"]}}``
    (the largest absolute difference over every parameter of every stage; the tied matrix is compared on both
    stages that hold it), and ``"largest gradient"``, the scale they compare to.
    """
    stage_layers(config.n_layer, n_stages)  # a clear error for too many stages, before any process starts
    if any(batch_size % m for m in micro_batch_counts):
        raise ValueError(f"every micro-batch count must divide the batch size {batch_size}, got {list(micro_batch_counts)}")
    return merge_ranks(spawn(compare_stage_with_unsplit, n_stages, config, tuple(micro_batch_counts), batch_size, seed))


def merge_ranks(per_rank: Sequence[dict]) -> dict:
    """The processes' comparisons as one: the largest difference of any stage (the loss is the last stage's)."""
    merged: dict = {"largest gradient": max(result["largest gradient"] for result in per_rank),
                    "parameters per stage": [result["parameters"] for result in per_rank]}
    for key in per_rank[0]:
        if isinstance(key, tuple):
            merged[key] = {what: max(result[key][what] for result in per_rank if result[key][what] is not None)
                           for what in per_rank[0][key]}
    return merged


class _FixedWork(torch.autograd.Function):
    """The identity, taking a fixed time: ``forward_seconds`` in the forward, ``backward_seconds`` in the backward."""

    @staticmethod
    def forward(ctx, x, forward_seconds: float, backward_seconds: float):
        ctx.backward_seconds = backward_seconds
        time.sleep(forward_seconds)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_seconds)
        return grad, None, None


class FixedWorkStage(nn.Module):
    """A stage whose forward takes ``forward_seconds`` and backward ``backward_seconds``: a linear layer and a wait.

    It stands for a device busy with a stage's kernels: the wait leaves the CPU free, so on a shared machine the
    measured timeline shows the schedule and the messages, not two processes fighting over the cores.
    """

    def __init__(self, width: int, forward_seconds: float, backward_seconds: float):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.forward_seconds, self.backward_seconds = forward_seconds, backward_seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FixedWork.apply(self.linear(x), self.forward_seconds, self.backward_seconds)


def time_gpipe_stage(rank: int, world_size: int, micro_batch_counts: Sequence[int], forward_seconds: float,
                     backward_seconds: float, repeats: int) -> dict:
    """On one process: the hand-written GPipe over fixed-work stages, each m ``repeats`` times; this stage's
    intervals (seconds since all processes left a barrier) of the fastest repeat."""
    torch.manual_seed(0)
    width = 8
    stage = FixedWorkStage(width, forward_seconds, backward_seconds)
    timelines = {}
    for m in (1, *micro_batch_counts):  # the first m = 1 also warms the connection up; it is not kept
        best = None
        for _ in range(repeats):
            inputs = torch.randn(m, 1, width)  # (B, T, C), one row per micro-batch
            targets = torch.randint(width, (m, 1))  # (B, T)
            events: list[Interval] = []
            dist.barrier()
            start = time.perf_counter()
            gpipe_step(stage, m, (1, 1, width), inputs, targets, events=events)
            dist.barrier()
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # both stages keep the same repeat
            if best is None or elapsed.item() < best[0]:
                best = (elapsed.item(), [Interval(e.kind, e.micro_batch, e.start - start, e.end - start) for e in events])
        timelines[m] = best[1]
    return timelines


def measure_gpipe_bubble(micro_batch_counts: Sequence[int] = (1, 2, 4, 8), forward_seconds: float = 0.02,
                         backward_seconds: float = 0.04, repeats: int = 3, n_stages: int = 2) -> dict:
    """The hand-written GPipe in ``n_stages`` processes whose stages do fixed work (:class:`FixedWorkStage`), timed.

    Returns ``{m: {"timeline": PipelineTimeline (seconds), "measured": [bubble of stage 0, of stage 1, ...],
    "formula": (p - 1) / (m + p - 1) as a float}}``, where a stage's measured bubble is 1 - its busy time over the
    step's wall time. The measured bubble lies a little above the formula: the messages and Python's own work
    between pieces of work are idle time the formula does not count.
    """
    per_rank = spawn(time_gpipe_stage, n_stages, tuple(micro_batch_counts), forward_seconds, backward_seconds, repeats)
    return bubble_results(per_rank, micro_batch_counts)


def bubble_results(per_rank: Sequence[dict], micro_batch_counts: Sequence[int]) -> dict:
    """The processes' intervals as one timeline per m, with the measured and the formula's bubble."""
    n_stages, results = len(per_rank), {}
    for m in micro_batch_counts:
        timeline = PipelineTimeline([intervals[m] for intervals in per_rank])
        results[m] = {"timeline": timeline, "measured": [timeline.bubble_fraction(stage) for stage in range(n_stages)],
                      "formula": float(gpipe_bubble_fraction(n_stages, m))}
    return results


def simulated_schedules(n_stages: int = 4, n_microbatches: int = 8, forward_cost=1, backward_cost=2) -> dict:
    """GPipe and 1F1B simulated (:func:`simulate_pipeline`): for each, the timeline, each stage's bubble (exact
    fractions), the formula's bubble, and the peak number of micro-batches each stage holds."""
    results = {}
    for schedule in ("gpipe", "1f1b"):
        timeline = simulate_pipeline(n_stages, n_microbatches, schedule, forward_cost, backward_cost)
        results[schedule] = {"timeline": timeline,
                             "bubble": [timeline.bubble_fraction(stage) for stage in range(n_stages)],
                             "formula": gpipe_bubble_fraction(n_stages, n_microbatches),
                             "peak in flight": [timeline.peak_in_flight(stage) for stage in range(n_stages)]}
    return results


def bubble_demonstration(folder: str | os.PathLike, micro_batch_counts: Sequence[int] = (1, 2, 4, 8),
                         forward_seconds: float = 0.02, backward_seconds: float = 0.04, simulated_stages: int = 4,
                         simulated_microbatches: int = 8) -> dict:
    """The chapter's bubble in one call: GPipe and 1F1B simulated (``simulated_stages``, ``simulated_microbatches``),
    the hand-written GPipe measured in 2 processes (:func:`measure_gpipe_bubble`), and two pictures in ``folder``:
    ``pipeline_timeline.png`` (both simulated schedules and the measured run with the most micro-batches) and
    ``pipeline_bubble.png`` (the formula against m, the measured points: the mean of the two stages).

    Returns ``{"simulated": {schedule: {"bubble", "formula", "peak in flight"}}, "measured": {m: {"measured",
    "formula"}}, "pictures": [the two paths]}``.
    """
    folder = pathlib.Path(folder)
    simulated = simulated_schedules(simulated_stages, simulated_microbatches)
    measured = measure_gpipe_bubble(micro_batch_counts, forward_seconds, backward_seconds)
    largest = max(micro_batch_counts)
    where = f"(p = {simulated_stages}, m = {simulated_microbatches})"
    timelines = {f"GPipe, simulated {where}": simulated["gpipe"]["timeline"],
                 f"1F1B, simulated {where}": simulated["1f1b"]["timeline"],
                 f"GPipe by hand, measured (p = 2, m = {largest})": measured[largest]["timeline"]}
    pictures = [plot_pipeline_timelines(timelines, folder / "pipeline_timeline.png"),
                plot_bubble_fraction({m: sum(result["measured"]) / 2 for m, result in measured.items()},
                                     folder / "pipeline_bubble.png", max_microbatches=max(16, largest))]
    return {"simulated": {schedule: {key: value for key, value in result.items() if key != "timeline"}
                          for schedule, result in simulated.items()},
            "measured": {m: {"measured": result["measured"], "formula": result["formula"]} for m, result in measured.items()},
            "pictures": pictures}


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def plot_pipeline_timelines(timelines: Mapping[str, PipelineTimeline], path: str | os.PathLike) -> pathlib.Path:
    """Gantt charts, one panel per named timeline: a row per stage (stage 0 on top), a box per forward (blue) and
    backward (orange) labelled with its micro-batch, the idle gaps hatched grey; each panel's title gives the
    bubble and the peak number of micro-batches a stage holds. Times in floats are seconds (a measured timeline),
    integers and fractions are the simulator's cost units."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from minillm.plots import save_figure

    heights = [len(timeline.stages) for timeline in timelines.values()]
    fig = Figure(figsize=(11, 1.2 + 0.55 * sum(heights) + 0.5 * len(heights)), layout="constrained")
    axes = fig.subplots(len(timelines), 1, squeeze=False, height_ratios=[h + 1.5 for h in heights])[:, 0]
    colours = {"F": "tab:blue", "B": "tab:orange"}
    for ax, (name, timeline) in zip(axes, timelines.items()):
        n_stages, span = len(timeline.stages), float(timeline.makespan)
        for stage, intervals in enumerate(timeline.stages):
            for interval in intervals:
                start, width = float(interval.start), float(interval.end - interval.start)
                ax.broken_barh([(start, width)], (stage - 0.4, 0.8), facecolor=colours[interval.kind], edgecolor="white")
                if width > span / 60:  # label the boxes wide enough to hold a number
                    ax.text(start + width / 2, stage, str(interval.micro_batch), ha="center", va="center",
                            fontsize=7, color="white")
            gaps = [(float(begin), float(end - begin)) for begin, end in timeline.idle_intervals(stage)]
            ax.broken_barh(gaps, (stage - 0.4, 0.8), facecolor="none", edgecolor="0.75", hatch="///", linewidth=0)
        bubbles = sorted({round(float(timeline.bubble_fraction(stage)), 3) for stage in range(n_stages)})
        bubble = f"{bubbles[0]:.1%}" if len(bubbles) == 1 else f"{bubbles[0]:.1%}-{bubbles[-1]:.1%}"
        peaks = ", ".join(str(timeline.peak_in_flight(stage)) for stage in range(n_stages))
        ax.set_title(f"{name}: idle {bubble} of each stage's time; micro-batches held at the peak, by stage: {peaks}",
                     fontsize=10)
        ax.set_yticks(range(n_stages), labels=[f"stage {stage}" for stage in range(n_stages)])
        ax.set_ylim(n_stages - 0.5, -0.5)  # stage 0 on top
        ax.set_xlim(0, span)
        ax.set_xlabel("seconds" if isinstance(timeline.makespan, float) else "time (cost units)")
    legend = [Patch(facecolor=colours["F"], label="forward"), Patch(facecolor=colours["B"], label="backward"),
              Patch(facecolor="none", edgecolor="0.6", hatch="///", label="idle (the bubble)")]
    fig.legend(handles=legend, loc="outside lower center", ncols=3, fontsize="small")
    return save_figure(fig, path)


def plot_bubble_fraction(measured: Mapping[int, float], path: str | os.PathLike, n_stages: int = 2,
                         max_microbatches: int = 16, more_stages: Sequence[int] = (4, 8)) -> pathlib.Path:
    """The bubble (p - 1) / (m + p - 1) against m, a curve for ``n_stages`` and each of ``more_stages``, with
    the ``measured`` bubbles ({m: fraction}, for ``n_stages``) as points."""
    from matplotlib.figure import Figure

    from minillm.plots import save_figure

    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    ms = list(range(1, max_microbatches + 1))
    for index, p in enumerate((n_stages, *more_stages)):
        ax.plot(ms, [float(gpipe_bubble_fraction(p, m)) for m in ms], color=f"C{index}", label=f"(p-1)/(m+p-1), p = {p}")
    ax.scatter(list(measured), list(measured.values()), color="C0", marker="o", s=40, zorder=3, edgecolor="black",
               label=f"measured, p = {n_stages} (hand-written GPipe)")
    ax.set(xlabel="micro-batches m", ylabel="idle fraction of each stage", title="The pipeline bubble", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, path)
