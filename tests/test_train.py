"""minillm.train: exact resume, nothing lost on failure, early stopping, accumulation, data parallelism.

Runs are tiny GPTs on a synthetic token stream (a few hundred steps of work in all). Resumed runs
must match uninterrupted ones exactly (bit for bit: same RNG states, same batches, same order of
operations), in fp32 and in bf16; gradient accumulation and two-process data parallelism must match
one big batch up to float32 rounding of the gradient sums (atol 1e-5 after a few AdamW steps, whose
normalized updates keep parameter differences at the level of the rounding), so those tests run in
fp32: under bf16 autocast every matmul output is rounded to 8 significant bits, and a batch of 8 and
two of 4 round differently.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

from minillm import MinillmError
from minillm.checkpoint import read_safetensors
from minillm.gpt import GPT, GPTConfig
from minillm.pretrain import LanguageModelingTask
from minillm.runs import BEST_MODEL, CHECKPOINT, read_log
from minillm.train import TrainConfig, Trainer

MODEL = dict(vocab_size=7, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.1)


def token_stream(n=3000, seed=0) -> np.ndarray:
    """A learnable stream: mostly counting up modulo 7, with some noise."""
    rng = np.random.default_rng(seed)
    ids = np.arange(n) % 7
    noise = rng.random(n) < 0.2
    ids[noise] = rng.integers(0, 7, noise.sum())
    return ids.astype(np.uint16)


def make_task(block_size=8):
    ids = token_stream()
    return LanguageModelingTask(ids[:2500], ids[2500:], block_size, eval_seed=0)


def config(out, **overrides) -> TrainConfig:
    values = dict(out=str(out), max_iters=12, batch_size=4, eval_interval=4, eval_iters=3, log_interval=2,
                  warmup_iters=2, lr=3e-3, min_lr=3e-4, progress=False, device="cpu", seed=7)
    return TrainConfig(**{**values, **overrides})


def new_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**MODEL, **overrides}))


def train(out, stop_after=None, task=None, model=None, **overrides):
    model = model or new_model()
    trainer = Trainer(model, task or make_task(), config(out, **overrides), {"model": MODEL}, log=lambda message: None)
    return trainer.fit(stop_after=stop_after), model


def weights(model) -> dict:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict, **tolerance):
    assert a.keys() == b.keys()
    for name in a:
        if tolerance:
            torch.testing.assert_close(a[name], b[name], **tolerance, msg=name)
        else:
            assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_stopped_run_resumed_equals_the_uninterrupted_run_bit_for_bit(tmp_path, precision):
    full, full_model = train(tmp_path / "full", precision=precision)
    _, _ = train(tmp_path / "resumed", stop_after=6, precision=precision)  # stops mid-interval, checkpoint at step 6
    assert read_safetensors(tmp_path / "resumed" / CHECKPOINT)[1]["step"] == 6
    resumed, resumed_model = train(tmp_path / "resumed", resume=True, precision=precision)
    strip = lambda log: [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in log]  # noqa: E731
    assert strip(read_log(tmp_path / "resumed")) == strip(read_log(tmp_path / "full"))
    assert [e["step"] for e in read_log(tmp_path / "full")] == [4, 8, 12]
    assert resumed.val_loss == full.val_loss and resumed.best_step == full.best_step
    assert_same_weights(weights(resumed_model), weights(full_model))


class CrashingTask:
    """The real task, but the ``crash_at``-th training batch raises, as a kill would stop the run."""

    def __init__(self, task, crash_at):
        self.task, self.calls, self.crash_at = task, 0, crash_at

    def __getattr__(self, name):
        return getattr(self.task, name)

    def sample_batch(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("killed")
        return self.task.sample_batch(*args, **kwargs)


def test_a_run_killed_between_checkpoints_resumes_from_the_last_one_exactly(tmp_path):
    _, full_model = train(tmp_path / "full")
    with pytest.raises(RuntimeError, match="killed"):
        train(tmp_path / "killed", task=CrashingTask(make_task(), crash_at=7))  # during step 7; checkpoint at 4
    assert read_safetensors(tmp_path / "killed" / CHECKPOINT)[1]["step"] == 4
    assert [e["step"] for e in read_log(tmp_path / "killed")] == [4]
    _, resumed_model = train(tmp_path / "killed", resume=True)
    assert_same_weights(weights(resumed_model), weights(full_model))
    assert [e["step"] for e in read_log(tmp_path / "killed")] == [4, 8, 12]


class PoisonedTask:
    """The real task, whose training loss turns NaN from the ``poison_from``-th training batch on (a batch that
    gives no defined loss); with ``blow_up`` it first grows by 1e30 (what a far too high learning rate does)."""

    def __init__(self, task, poison_from, blow_up=False):
        self.task, self.calls, self.poison_from, self.blow_up = task, 0, poison_from, blow_up

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss(self, model, batch):
        loss = self.task.loss(model, batch)
        if model.training:
            self.calls += 1
            if self.blow_up and self.calls == self.poison_from:
                return loss * 1e30
            if self.calls >= self.poison_from + self.blow_up:
                return loss * float("nan")
        return loss


def test_a_nan_loss_stops_the_run_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(MinillmError, match="by step 6 right after an ordinary loss of .* points at the data or the task"):
        train(tmp_path, task=PoisonedTask(make_task(), poison_from=6))
    tensors, header = read_safetensors(tmp_path / CHECKPOINT)
    assert header["step"] == 4 and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    best, _ = read_safetensors(tmp_path / BEST_MODEL)
    assert all(torch.isfinite(t).all() for t in best.values())


def test_a_loss_that_rises_before_it_breaks_is_a_divergence_that_points_at_the_learning_rate(tmp_path):
    with pytest.raises(MinillmError, match=r"training diverged: .* by step 6 \(it had risen to .*e\+30.*--lr"):
        train(tmp_path, task=PoisonedTask(make_task(), poison_from=5, blow_up=True))


def test_a_model_whose_weights_hold_nan_is_refused_before_the_first_step(tmp_path):
    model = new_model()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(MinillmError, match="the starting model is damaged: its weight .* holds NaN"):
        train(tmp_path, model=model)
    assert not (tmp_path / CHECKPOINT).exists()


def test_a_folder_holding_a_run_is_refused_unless_resuming_or_overwriting(tmp_path):
    train(tmp_path, max_iters=4)
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(MinillmError, match="already holds a run"):
        train(tmp_path, max_iters=4)
    assert (tmp_path / CHECKPOINT).read_bytes() == before  # nothing touched
    result, _ = train(tmp_path, max_iters=8, overwrite=True)
    assert result.steps == 8 and [e["step"] for e in read_log(tmp_path)] == [4, 8]
    with pytest.raises(MinillmError, match="nothing to resume"):
        train(tmp_path / "empty", resume=True)
    with pytest.raises(MinillmError, match="was made with model"):
        Trainer(new_model(), make_task(), config(tmp_path, resume=True, max_iters=12), {"model": {"other": 1}},
                log=lambda m: None).fit()


class ScriptedValidationTask:
    """The real task, except that validation losses follow a script, to steer early stopping."""

    def __init__(self, task, val_losses):
        self.task, self.val_losses, self.evals = task, val_losses, 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def eval_batches(self, batch_size, device, max_batches=None):
        value = self.val_losses[min(self.evals, len(self.val_losses) - 1)]
        self.evals += 1
        yield value

    def loss(self, model, batch):
        if isinstance(batch, float):
            return torch.tensor(batch)
        return self.task.loss(model, batch)

    @staticmethod
    def batch_tokens(batch):
        return 1 if isinstance(batch, float) else batch[0].numel()

    eval_weight = batch_tokens

    def evaluate_batch(self, model, batch):
        return self.loss(model, batch), None


def test_early_stopping_keeps_and_restores_the_best_model(tmp_path):
    task = ScriptedValidationTask(make_task(), [3.0, 2.0, 2.5, 2.6, 2.7, 9.9])
    result, model = train(tmp_path, task=task, max_iters=40, patience=2)
    assert result.stopped_early and result.steps == 16 and result.best_step == 8 and result.best_val_loss == 2.0
    best, header = read_safetensors(tmp_path / BEST_MODEL)
    assert header["step"] == 8
    assert_same_weights({k: v for k, v in weights(model).items() if k in best}, best)  # the best weights are restored
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["stopped_early"] and results["best_step"] == 8 and (tmp_path / "loss.png").exists()


def test_the_loss_plot_names_the_tasks_unit(tmp_path, monkeypatch):
    from minillm import plots

    labels = []
    monkeypatch.setattr(plots, "plot_loss_curves", lambda curves, path, **kw: labels.append(kw["ylabel"]))
    train(tmp_path / "lm", max_iters=4)
    task = make_task()
    task.loss_unit = "nats/widget"
    train(tmp_path / "widgets", task=task, max_iters=4)
    assert labels == ["loss (nats/token)", "loss (nats/widget)"]


def test_log_has_one_line_per_estimate_with_the_documented_fields(tmp_path):
    train(tmp_path)
    log = read_log(tmp_path)
    assert [set(e) for e in log] == [{"step", "train_loss", "val_loss", "lr", "tokens_per_s"}] * 3
    assert log[0]["train_loss"] > log[-1]["train_loss"] and all(e["tokens_per_s"] > 0 for e in log)
    from minillm.optim import warmup_cosine_lr

    expected_lrs = [warmup_cosine_lr(e["step"] - 1, max_lr=3e-3, warmup_steps=2, total_steps=12, min_lr=3e-4) for e in log]
    assert [e["lr"] for e in log] == pytest.approx(expected_lrs)  # the lr of each estimate's last step


def test_gradient_accumulation_equals_one_batch_of_the_same_size(tmp_path):
    _, big = train(tmp_path / "big", max_iters=4, batch_size=8, model=new_model(dropout=0.0), precision="fp32")
    _, accumulated = train(tmp_path / "acc", max_iters=4, batch_size=4, grad_accum=2, model=new_model(dropout=0.0),
                           precision="fp32")
    assert_same_weights(weights(accumulated), weights(big), rtol=1e-4, atol=1e-5)


def test_bf16_training_on_the_cpu_follows_the_fp32_run(tmp_path):
    """Mixed precision changes the rounding, not the training: the same run in bf16 and in fp32 ends with
    validation losses within 1% (bf16 rounds each matmul output to 8 significant bits, a relative error of
    at most 2^-9 = 0.2% per product; measured: 0.06%), while the loss falls 30% below a uniform guess's."""
    runs = {precision: train(tmp_path / precision, max_iters=100, eval_interval=50, lr=1e-2, min_lr=1e-3,
                             precision=precision)[0] for precision in ("fp32", "bf16")}
    assert runs["fp32"].val_loss < 0.7 * math.log(7)
    assert runs["bf16"].val_loss == pytest.approx(runs["fp32"].val_loss, rel=1e-2)
    assert runs["bf16"].val_loss != runs["fp32"].val_loss  # bf16 did run: the roundings differ


def test_bad_training_settings_are_refused_with_one_sentence():
    for overrides, message in ((dict(max_iters=0), "--max-iters must be at least 1"),
                               (dict(min_lr=1.0), "--min-lr"), (dict(resume=True, overwrite=True), "contradict"),
                               (dict(warmup_iters=50, max_iters=10), "--warmup-iters")):
        with pytest.raises(ValueError, match=message):
            config("x", **overrides)


@pytest.mark.slow
def test_two_gloo_processes_take_the_same_steps_as_one_process_with_the_global_batch(tmp_path):
    """torchrun with 2 CPU processes of batch 4 each, against 1 process of batch 8: same parameters."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join("abcdefg"[i] for i in token_stream(6000)), encoding="utf-8")
    common = ["pretrain", "gpt", "--data", str(corpus), "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
              "--block-size", "8", "--max-iters", "6", "--eval-interval", "3", "--eval-iters", "2", "--dropout", "0",
              "--sample-tokens", "0", "--no-progress", "--device", "cpu", "--warmup-iters", "2", "--precision", "fp32"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment.pop("MINILLM_QUICK", None)
    single = subprocess.run([sys.executable, "-m", "minillm", *common, "--batch-size", "8", "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=environment, cwd=REPO_ROOT, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    parallel = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "minillm", *common, "--batch-size", "4", "--out", str(tmp_path / "two")],
                              capture_output=True, text=True, env=environment, cwd=REPO_ROOT, timeout=300)
    assert parallel.returncode == 0, parallel.stdout[-2000:] + parallel.stderr[-3000:]
    assert "2 processes" in parallel.stdout and parallel.stdout.count("whole validation split") == 1  # rank 0 prints
    one, _ = read_safetensors(tmp_path / "one" / CHECKPOINT)
    two, _ = read_safetensors(tmp_path / "two" / CHECKPOINT)
    model_one = {k: v for k, v in one.items() if k.startswith("model/")}
    model_two = {k: v for k, v in two.items() if k.startswith("model/")}
    assert_same_weights(model_two, model_one, rtol=1e-4, atol=1e-5)
    whole_split = [json.loads((tmp_path / run / "results.json").read_text())["val_loss"] for run in ("one", "two")]
    assert whole_split[0] == pytest.approx(whole_split[1], abs=1e-5)  # estimates differ: batches of 8 vs 4


# ---------------------------------------------------------------------------------------------
# LengthBuckets: similar-length batches without changing how often each example is drawn
# ---------------------------------------------------------------------------------------------


def test_length_buckets_draw_every_example_as_often_as_uniform_sampling():
    """Each of n examples is drawn with probability 1/n per draw. With D draws the count of one example is
    Binomial(D, 1/n): mean D/n, sd sqrt(D/n (1 - 1/n)); every count lies within 5 sd of the mean (for 60
    examples the chance that any one strays that far by luck is below 1e-4)."""
    from minillm.train import LengthBuckets

    lengths = [1 + (i * 7) % 23 for i in range(60)]  # uneven lengths, many ties
    buckets = LengthBuckets(lengths, bucket_size=16, seed=3)  # 60 = 3 full buckets + one of 12
    generator = torch.Generator().manual_seed(0)
    counts = np.zeros(60)
    draws = 0
    for _ in range(6000):
        drawn = buckets.sample(8, generator)
        np.add.at(counts, drawn, 1)
        draws += 8
    mean, sd = draws / 60, math.sqrt(draws / 60 * (1 - 1 / 60))
    assert np.all(np.abs(counts - mean) < 5 * sd), (counts.min(), counts.max(), mean, sd)


def test_length_buckets_batches_hold_similar_lengths_and_repeat_under_a_seed():
    from minillm.train import LengthBuckets

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 64, size=5000)
    buckets = LengthBuckets(lengths, bucket_size=64 * 16)
    first = [buckets.sample(64, torch.Generator().manual_seed(s)) for s in range(20)]
    again = [buckets.sample(64, torch.Generator().manual_seed(s)) for s in range(20)]
    assert first == again
    # Real tokens / padded tokens. Lengths uniform on 3..63 put ~12 length values in each bucket of 1,024
    # examples (mean/max ~0.8); a uniform batch of 64 nearly always holds a length near 63 (~0.5).
    uniform = np.mean([lengths[b].mean() / lengths[b].max() for b in (rng.integers(0, 5000, 64) for _ in range(20))])
    fill = np.mean([lengths[b].mean() / lengths[b].max() for b in first])
    assert fill > 0.75 and uniform < 0.6
