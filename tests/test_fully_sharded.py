"""--parallel fsdp: the Trainer with its model sharded by FSDP2 (minillm.fully_sharded) over gloo processes.

What is checked, against one process that trains on the global batch (fp32, dropout 0): the same steps with every
optimizer, gradient accumulation and clipping; early stopping and the best model restored; the checkpoints are the
files a one-process run writes, so a run resumes across modes (FSDP -> FSDP exactly, FSDP -> DDP, FSDP -> one
process, one process -> FSDP); a loss that turns NaN in one process stops every process with the divergence
message. Then through the command line: torchrun with 2 processes, and two single-process "nodes" that meet
through a c10d rendezvous on the loopback address.

Tolerances: two processes sum the gradients of half batches, one process the whole batch, so float rounding
differs at ~1e-7 per step; after a few Adam steps (whose update divides by sqrt(v) and so magnifies rounding
in tiny gradients) the weights agree to ~1e-6. rtol 1e-4 / atol 1e-5 leaves margin and is still far below a
wrong step (a missing average, a dropped shard or an unclipped gradient moves weights by ~1e-3 or more).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import REPO_ROOT

from minillm import MinillmError
from minillm.checkpoint import read_safetensors
from minillm.distributed import spawn
from minillm.fully_sharded import shard_model
from minillm.gpt import GPT, GPTConfig
from minillm.pretrain import LanguageModelingTask
from minillm.runs import BEST_MODEL, CHECKPOINT, RESULTS
from minillm.train import TrainConfig, Trainer

MODEL = GPTConfig(vocab_size=7, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True)
OPTIMIZERS = ("minillm", "torch", "torch-fused")
# lr 0.05 makes the second estimate worse than the first: patience 1 stops the run at step 2 and restores step 1
EARLY_STOPPING = {"lr": 0.05, "min_lr": 0.005, "grad_clip": 0.0, "grad_accum": 1, "eval_interval": 1, "patience": 1,
                  "max_iters": 10}


def lm_task() -> LanguageModelingTask:
    """A learnable stream of 7 token ids: counting up modulo 7, with 20% noise."""
    rng = np.random.default_rng(0)
    ids = np.arange(3000) % 7
    noise = rng.random(3000) < 0.2
    ids[noise] = rng.integers(0, 7, noise.sum())
    ids = ids.astype(np.uint16)
    return LanguageModelingTask(ids[:2500], ids[2500:], MODEL.block_size, eval_seed=0)


def train_config(out, batch_size: int, **overrides) -> TrainConfig:
    """4 steps of 2 micro-batches each, clipped to a norm the gradients exceed (0.05: clipping acts every step)."""
    settings = dict(out=str(out), max_iters=4, batch_size=batch_size, grad_accum=2, grad_clip=0.05, lr=1e-2, min_lr=1e-3,
                    warmup_iters=1, eval_interval=2, eval_iters=2, log_interval=1, device="cpu", precision="fp32",
                    progress=False, seed=0)
    return TrainConfig(**{**settings, **overrides})


def trainer(out, batch_size: int, task=None, **overrides) -> Trainer:
    torch.manual_seed(0)  # the same initial weights in every process and in the one-process reference
    return Trainer(GPT(MODEL), task or lm_task(), train_config(out, batch_size, **overrides), log=lambda message: None)


def train(out, batch_size: int, stop_after: int | None = None, task=None, **overrides):
    return trainer(out, batch_size, task, **overrides).fit(stop_after=stop_after)


def clipped_gradients(model, rank: int = 0, world_size: int = 1) -> tuple[float, dict]:
    """The gradient's global norm and the whole gradient after clipping to 0.05, for a global batch of 4."""
    batch = lm_task().sample_batch(4 // world_size, torch.Generator().manual_seed(0), "cpu", rank, world_size)
    LanguageModelingTask.loss(model, batch).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    full = {name: getattr(p.grad, "full_tensor", p.grad.detach)() for name, p in model.named_parameters()}
    return float(getattr(norm, "full_tensor", norm.detach)()), full


class NaNInProcessOne(LanguageModelingTask):
    """The language-modelling loss, but NaN in process 1 from its third micro-batch on: one bad batch."""

    calls = 0

    def loss(self, model, batch):
        self.calls += 1
        loss = LanguageModelingTask.loss(model, batch)
        return loss * float("nan") if dist.get_rank() == 1 and self.calls >= 3 else loss


class WorseEstimatesInProcessOne(LanguageModelingTask):
    """Validation losses 1 higher in process 1 than in process 0 (training is untouched)."""

    def evaluate_batch(self, model, batch):
        loss, correct = super().evaluate_batch(model, batch)
        return loss + dist.get_rank(), correct


def _sharded_runs(rank: int, world_size: int, folder: str) -> str:
    """Every FSDP run of the module's tests, in one group of processes (each start costs seconds)."""
    import pathlib

    folder = pathlib.Path(folder)
    for optimizer in OPTIMIZERS:
        sharded = trainer(folder / f"fsdp-{optimizer}", 2, parallel="fsdp", optimizer=optimizer)
        sharded.fit()
        if optimizer == "minillm":  # what this process holds, in elements, against the whole model
            sharded.model.reshard()  # the last forward (an evaluation, no backward) left the root unsharded
            moments = [value for state in sharded.optimizer.state.values() for key, value in state.items()
                       if key.startswith("exp_avg")]
            held = {"weights": (sum(p.to_local().numel() for p in sharded.model.parameters()),
                                sum(p.numel() for p in sharded.model.parameters())),
                    "moments": (sum(m.to_local().numel() for m in moments), sum(m.numel() for m in moments))}
    torch.manual_seed(0)
    model = GPT(MODEL)
    clipping = clipped_gradients(shard_model(model, "cpu", model.blocks), rank, world_size)
    train(folder / "fsdp-early", 2, parallel="fsdp", **EARLY_STOPPING)
    train(folder / "fsdp-stopped", 2, stop_after=2, parallel="fsdp")
    if rank == 0:  # each resume gets its own copy of the stopped run
        for name in ("fsdp-then-fsdp", "fsdp-then-ddp", "fsdp-then-one"):
            shutil.copytree(folder / "fsdp-stopped", folder / name)
        shutil.copytree(folder / "one-stopped", folder / "one-then-fsdp")
    dist.barrier()
    train(folder / "fsdp-then-fsdp", 2, resume=True, parallel="fsdp")
    train(folder / "fsdp-then-ddp", 2, resume=True, parallel="ddp")
    train(folder / "one-then-fsdp", 2, resume=True, parallel="fsdp")
    task = lm_task()
    disagreeing = train(folder / "fsdp-disagreeing", 2, task=WorseEstimatesInProcessOne(task.train_ids, task.val_ids,
                                                                                          MODEL.block_size),
                        parallel="fsdp", **EARLY_STOPPING)
    try:  # last: a process that failed to stop here would leave the other waiting in a collective
        train(folder / "fsdp-nan", 2, task=NaNInProcessOne(task.train_ids, task.val_ids, MODEL.block_size),
              parallel="fsdp", grad_accum=1, eval_interval=100)
        message = "no error"
    except MinillmError as error:
        message = str(error)
    return {"nan": message, "disagreeing": (disagreeing.steps, disagreeing.best_step, disagreeing.val_loss),
            "held": held, "clipping": clipping}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The FSDP runs (2 gloo processes, 2 examples per micro-batch each) beside the one-process runs with the
    global batch of 4; returns the folder and what each process returned."""
    folder = tmp_path_factory.mktemp("fsdp")
    for optimizer in OPTIMIZERS:
        train(folder / f"one-{optimizer}", 4, optimizer=optimizer)
    train(folder / "one-early", 4, **EARLY_STOPPING)
    train(folder / "one-stopped", 4, stop_after=2)
    outcomes = spawn(_sharded_runs, 2, str(folder), timeout=120)
    shutil.copytree(folder / "fsdp-stopped", folder / "fsdp-then-one", dirs_exist_ok=True)
    train(folder / "fsdp-then-one", 4, resume=True)
    return folder, outcomes


def weights(path) -> dict:
    tensors, _ = read_safetensors(path)
    return {name: tensor for name, tensor in tensors.items() if not name.startswith("rng/")}


def assert_same_tensors(actual: dict, expected: dict, rtol=1e-4, atol=1e-5):
    assert sorted(actual) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=name)


def result(folder, run) -> dict:
    return json.loads((folder / run / RESULTS).read_text())


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_fsdp_takes_the_steps_of_one_process_with_the_global_batch_with_accumulation_and_clipping(runs, optimizer):
    """Weights and Adam moments (the whole checkpoint: the same names, the same file layout), the best model and
    the whole-split validation loss, after 4 clipped steps of 2 accumulated micro-batches."""
    folder, _ = runs
    sharded, one = folder / f"fsdp-{optimizer}", folder / f"one-{optimizer}"
    assert_same_tensors(weights(sharded / CHECKPOINT), weights(one / CHECKPOINT))
    assert_same_tensors(weights(sharded / BEST_MODEL), weights(one / BEST_MODEL))
    assert result(folder, sharded.name)["val_loss"] == pytest.approx(result(folder, one.name)["val_loss"], abs=1e-5)
    _, header = read_safetensors(sharded / CHECKPOINT)
    _, one_header = read_safetensors(one / CHECKPOINT)
    assert header["optimizer"] == one_header["optimizer"]  # param groups (lr, betas, ...) and scalar state


def test_each_process_holds_its_share_of_the_weights_and_adam_moments_not_a_copy(runs):
    """ZeRO-3: the slices of the processes add up to the model (no element twice), about half each (the
    7-row embedding splits 4 + 3)."""
    _, outcomes = runs
    for kind in ("weights", "moments"):
        (first, total), (second, same_total) = outcomes[0]["held"][kind], outcomes[1]["held"][kind]
        assert total == same_total and first + second == total, kind
        assert max(first, second) < 0.6 * total, kind


def test_fsdp_clips_the_whole_gradient_by_its_global_norm_as_one_process_does(runs):
    """Each process sees only its slice of the gradient; the norm must be that of the whole gradient (a
    per-slice norm would be smaller and scale each slice by a different factor)."""
    _, outcomes = runs
    torch.manual_seed(0)
    norm, gradients = clipped_gradients(GPT(MODEL))
    assert norm > 0.05  # the clipping acts
    for outcome in outcomes:
        assert outcome["clipping"][0] == pytest.approx(norm, rel=1e-5)
        assert_same_tensors(outcome["clipping"][1], gradients, rtol=1e-4, atol=1e-8)


def test_fsdp_early_stopping_stops_where_one_process_stops_and_restores_the_same_best_model(runs):
    folder, _ = runs
    sharded, one = result(folder, "fsdp-early"), result(folder, "one-early")
    assert sharded["stopped_early"] and one["stopped_early"]
    assert (sharded["steps"], sharded["best_step"]) == (one["steps"], one["best_step"]) == (2, 1)
    assert sharded["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)  # the whole split, on step 1's weights
    assert_same_tensors(weights(folder / "fsdp-early" / BEST_MODEL), weights(folder / "one-early" / BEST_MODEL))


def test_an_fsdp_run_stopped_and_resumed_under_fsdp_equals_the_uninterrupted_run_exactly(runs):
    """Same processes, same reductions: resuming must not change a single bit."""
    folder, _ = runs
    resumed, uninterrupted = weights(folder / "fsdp-then-fsdp" / CHECKPOINT), weights(folder / "fsdp-minillm" / CHECKPOINT)
    assert sorted(resumed) == sorted(uninterrupted)
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    assert result(folder, "fsdp-then-fsdp")["val_loss"] == result(folder, "fsdp-minillm")["val_loss"]


@pytest.mark.parametrize("stopped, resumed, reference", [
    ("fsdp", "ddp", "fsdp-minillm"),  # an FSDP checkpoint, continued with a whole model per process
    ("fsdp", "one", "one-minillm"),  # an FSDP checkpoint, continued by one process with the global batch
    ("one", "fsdp", "one-minillm"),  # a one-process checkpoint, continued sharded
])
def test_a_checkpoint_resumes_in_another_parallel_mode_and_ends_where_the_uninterrupted_run_ends(runs, stopped,
                                                                                                  resumed, reference):
    folder, _ = runs
    assert_same_tensors(weights(folder / f"{stopped}-then-{resumed}" / CHECKPOINT), weights(folder / reference / CHECKPOINT))
    assert result(folder, f"{stopped}-then-{resumed}")["val_loss"] == pytest.approx(result(folder, reference)["val_loss"],
                                                                                    abs=1e-5)


def test_a_loss_that_turns_nan_in_one_process_stops_every_process_with_the_divergence_message(runs):
    """The training loss is averaged over the processes before it is checked, so no process goes on alone
    into a collective its peers have left (the NaN comes at process 1's third step)."""
    _, outcomes = runs
    assert len(outcomes) == 2
    for outcome in outcomes:
        assert "NaN or infinite by step 3" in outcome["nan"], outcome["nan"]


def test_validation_estimates_that_differ_between_processes_are_rank_zeros_in_every_process(runs):
    """Process 1's estimates are 1 higher: every process still keeps the same best model and stops at the same
    step (else one would wait in a collective forever), and they are the decisions of the undisturbed run."""
    folder, outcomes = runs
    assert outcomes[0]["disagreeing"] == outcomes[1]["disagreeing"]
    steps, best_step, val_loss = outcomes[0]["disagreeing"]
    assert (steps, best_step) == (2, 1)
    assert val_loss == result(folder, "fsdp-early")["val_loss"]


def test_parallel_fsdp_in_one_process_is_a_one_sentence_error(tmp_path):
    with pytest.raises(MinillmError, match=r"--parallel fsdp splits the model across several processes and this run "
                                           r"has one: start it with torchrun"):
        Trainer(GPT(MODEL), lm_task(), train_config(tmp_path / "run", 4, parallel="fsdp"))


# ---------------------------------------------------------------------------------------------
# Through the command line: torchrun on one machine, and two "nodes" on the loopback address
# ---------------------------------------------------------------------------------------------


COMMON = ["pretrain", "gpt", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--max-iters", "6",
          "--eval-interval", "3", "--eval-iters", "2", "--dropout", "0", "--no-progress", "--device", "cpu",
          "--warmup-iters", "2", "--precision", "fp32", "--sample-tokens", "5"]


def environment() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("MINILLM_QUICK", None)
    return env


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """``python -m minillm pretrain gpt`` with the global batch of 8, on a corpus of 7 characters (newline among
    them: the end-of-run sample's prompt)."""
    folder = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    ids = np.arange(6000) % 7
    noise = rng.random(6000) < 0.2
    ids[noise] = rng.integers(0, 7, noise.sum())
    (folder / "corpus.txt").write_text("".join("abcdef\n"[i] for i in ids), encoding="utf-8")
    command = [sys.executable, "-m", "minillm", *COMMON, "--data", str(folder / "corpus.txt"), "--batch-size", "8",
               "--out", str(folder / "one")]
    single = subprocess.run(command, capture_output=True, text=True, env=environment(), cwd=REPO_ROOT, timeout=120)
    assert single.returncode == 0, single.stderr[-2000:]
    return folder


def assert_same_run(run, one):
    """The same checkpoint (weights and optimizer) and the same whole-split validation loss."""
    assert_same_tensors(weights(run / CHECKPOINT), weights(one / CHECKPOINT))
    assert json.loads((run / RESULTS).read_text())["val_loss"] == pytest.approx(
        json.loads((one / RESULTS).read_text())["val_loss"], abs=1e-4)


@pytest.mark.slow
def test_torchrun_fsdp_trains_the_steps_of_one_process_and_its_run_feeds_generate(one_process_run):
    folder = one_process_run
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "minillm",
               *COMMON, "--data", str(folder / "corpus.txt"), "--batch-size", "4", "--parallel", "fsdp",
               "--out", str(folder / "fsdp")]
    sharded = subprocess.run(command, capture_output=True, text=True, env=environment(), cwd=REPO_ROOT, timeout=180)
    assert sharded.returncode == 0, sharded.stdout[-2000:] + sharded.stderr[-3000:]
    assert "2 processes (fully sharded)" in sharded.stdout and sharded.stdout.count("whole validation split") == 1
    assert_same_run(folder / "fsdp", folder / "one")
    # every process sampled (a sharded forward needs all of them); rank 0 wrote the sample: prompt + 5 tokens
    assert len((folder / "fsdp" / "samples.txt").read_text(encoding="utf-8")) == 1 + 5 + 1
    from minillm.__main__ import main

    assert main(["generate", "--ckpt", str(folder / "fsdp"), "--prompt", "abc", "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_of_one_process_meeting_through_a_c10d_rendezvous_train_the_steps_of_one_process(one_process_run):
    """Two torchrun launches at once, as on two machines (--nnodes 2, one process each), that find each other
    through the rendezvous endpoint on 127.0.0.1; each is killed with its processes if it runs past 180 s."""
    folder = one_process_run
    endpoint = f"127.0.0.1:{free_port()}"
    launches = []
    for node_rank in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(node_rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                   "--rdzv_id", "minillm-test", "--rdzv_conf", "join_timeout=60", "--local_addr", "127.0.0.1",
                   "-m", "minillm", *COMMON, "--data", str(folder / "corpus.txt"), "--batch-size", "4",
                   "--parallel", "fsdp", "--out", str(folder / "nodes")]
        launches.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env=environment(), cwd=REPO_ROOT, start_new_session=True))
    outputs = []
    for launch in launches:
        try:
            outputs.append(launch.communicate(timeout=180))
        except subprocess.TimeoutExpired:
            for each in launches:  # the launch and its worker processes: their own session
                if each.poll() is None:
                    os.killpg(each.pid, signal.SIGKILL)
            pytest.fail("the two-node run did not finish in 180 s")
    for launch, (stdout, stderr) in zip(launches, outputs):
        assert launch.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert "2 processes (fully sharded)" in "".join(stdout for stdout, _ in outputs)
    assert_same_run(folder / "nodes", folder / "one")
