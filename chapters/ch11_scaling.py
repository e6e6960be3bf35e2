"""Chapter 11: making a model fit, and scaling it out over several processes.

Counts where a GPT's training memory goes (weights, gradients, AdamW states, activations) and how DDP and
ZeRO-1/2/3 (FSDP) divide it over N ranks, checked against what PyTorch really holds; shows why fp16 needs a loss
scaler and bf16 does not; measures what activation checkpointing saves; and splits a model over processes three
ways, each written by hand first and then done with PyTorch's own engine, the two checked equal: fully sharded
data parallelism (a real `pretrain gpt` run under torchrun), tensor parallelism (Megatron's column- and
row-parallel layers) and pipeline parallelism (GPipe and 1F1B, and the bubble they leave).

    python chapters/ch11_scaling.py            # a few minutes on a 2-core CPU
    python chapters/ch11_scaling.py --quick    # under a minute; what the tests run
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from minillm import MinillmError, datasets, memory
from minillm.activation_checkpointing import compare_activation_checkpointing
from minillm.config import QuickConfig, run_chapter
from minillm.distributed import spawn
from minillm.files import write_json
from minillm.gpt import GPT, GPTConfig
from minillm.loss_scaling import DynamicLossScaler, activation_gradients, count_underflow, plot_gradient_range
from minillm.pipeline_parallel import bubble_demonstration, gpipe_bubble_fraction, pipeline_matches_unsplit
from minillm.tensor_parallel import demonstrate as tensor_parallel_demo
from minillm.tokenization import CharTokenizer

GPT2_SMALL = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0)
GPT2_XL = GPTConfig(vocab_size=50257, block_size=1024, n_layer=48, n_head=25, n_embd=1600, dropout=0.0)


@dataclass
class Config(QuickConfig):
    """Chapter 11: memory arithmetic, fp16 loss scaling, activation checkpointing, FSDP, tensor and pipeline
    parallelism."""

    ranks: int = field(default=8, metadata={"help": "ranks N in the memory table (the GPUs of one machine)"})
    micro_batch: int = field(default=8, metadata={"help": "sequences per rank in the memory table (of 1,024 tokens)"})
    processes: int = field(default=2, metadata={"help": "CPU processes the parallel demonstrations run on"})
    n_layer: int = field(default=4, metadata={"help": "layers of the small GPT the measurements train"})
    n_embd: int = field(default=128, metadata={"help": "width of that GPT"})
    n_head: int = field(default=4, metadata={"help": "attention heads of that GPT"})
    block_size: int = field(default=64, metadata={"help": "context of that GPT"})
    batch_size: int = field(default=8, metadata={"help": "sequences per step in the measurements"})
    seed: int = field(default=1337, metadata={"help": "random seed"})
    out: str = field(default="runs/ch11", metadata={"help": "folder for plots and results.json"})
    micro_batches: str = field(default="1,2,4,8", metadata={"help": "GPipe micro-batch counts the bubble is measured for"})
    stage_seconds: float = field(default=0.02, metadata={"help": "forward time of a pipeline stage in the bubble "
                                                                  "measurement (backward: twice that)"})
    steps: int = field(default=40, metadata={"help": "AdamW steps before the gradients are looked at"})
    parallel_steps: int = field(default=10, metadata={"help": "steps of the one-process, DDP and FSDP runs compared"})
    QUICK = {"n_layer": 2, "n_embd": 64, "block_size": 32, "batch_size": 4, "micro_batches": "1,2,4",
             "stage_seconds": 0.005, "steps": 10, "parallel_steps": 6}

    def validate(self):
        for name in ("ranks", "micro_batch", "processes", "n_layer", "n_embd", "n_head", "block_size", "batch_size",
                     "steps", "parallel_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        counts = [int(m) for m in self.micro_batches.split(",") if m.strip()]
        if not counts or min(counts) < 1:
            raise ValueError(f"--micro-batches must list counts of at least 1, got {self.micro_batches!r}")
        if not self.stage_seconds > 0:
            raise ValueError(f"--stage-seconds must be positive, got {self.stage_seconds}")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head})")


def memory_section(config: Config, out: pathlib.Path) -> dict:
    """1. Where the memory goes: the table for GPT-2 small and XL, and the formula checked on a small GPT."""
    tokens = config.micro_batch * 1024
    for name, gpt in (("GPT-2 small (124M)", GPT2_SMALL), ("GPT-2 XL (1.6B)", GPT2_XL)):
        print(f"\n{name}: {memory.parameter_count(gpt):,} parameters, {config.micro_batch} x 1,024 tokens per rank, "
              f"16-bit weights and gradients + fp32 master weights and AdamW moments (GiB per rank)")
        print(memory.memory_table(gpt, tokens, config.ranks))
    memory.plot_memory_per_rank(GPT2_XL, tokens, out / "memory_per_rank.png",
                                title=f"GPT-2 XL, {config.micro_batch} x 1,024 tokens per rank")
    return {"gpt2_xl_per_rank_gib": {sharding: memory.training_memory(GPT2_XL, tokens, "zero-mixed", config.ranks,
                                                                       sharding).total / memory.GiB
                                     for sharding in memory.SHARDINGS}}


def small_gpt(config: Config, dropout: float = 0.0) -> tuple[GPT, torch.Tensor]:
    """The measurements' GPT over Tiny Shakespeare's characters, and a batch of its text: (B, T + 1) ids."""
    text = datasets.tiny_shakespeare_path().read_text(encoding="utf-8")[:200_000]
    tokenizer = CharTokenizer.train(text)  # nanoGPT's: one id per character, in sorted order
    ids = torch.tensor(tokenizer.encode(text))
    torch.manual_seed(config.seed)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=config.block_size, n_layer=config.n_layer,
                          n_head=config.n_head, n_embd=config.n_embd, dropout=dropout, bias=False))
    starts = torch.randint(0, len(ids) - config.block_size - 1, (config.batch_size,))
    return model, torch.stack([ids[s:s + config.block_size + 1] for s in starts.tolist()])


def precision_section(config: Config, out: pathlib.Path) -> dict:
    """2. fp16 needs a loss scaler, bf16 does not: where a trained GPT's gradients fall against the formats' ranges,
    and the scaler written by hand taking the same steps as torch.amp.GradScaler."""
    model, batch = small_gpt(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(config.steps):  # a few steps, so the gradients are a trained model's, not an initialization's
        model(batch[:, :-1], batch[:, 1:])[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    gradients = activation_gradients(model, lambda m: m(batch[:, :-1], batch[:, 1:])[1])
    shares = count_underflow(gradients).shares()
    plot_gradient_range(gradients, out / "gradient_range.png")
    print(f"\nThe gradients reaching every linear layer's output, after {config.steps} steps ({gradients.numel():,}):")
    for name, share in shares.items():
        print(f"  {name:<28} {share:7.2%}")

    # The same 12 fp16 steps with the scaler by hand and with PyTorch's, from a scale so large that it overflows.
    scales = {}
    for name, scaler in (("by hand", DynamicLossScaler(2.0**24, growth_interval=3)),
                         ("torch", torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=3))):
        model, batch = small_gpt(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scales[name] = []
        for _ in range(12):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(batch[:, :-1], batch[:, 1:])[1]
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            scales[name].append(scaler.get_scale())
        scales[name + " weights"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    same_weights = torch.equal(scales["by hand weights"], scales["torch weights"])
    print("  loss scale after each fp16 step, by hand:", " ".join(f"2^{torch.tensor(s).log2().item():g}"
                                                                   for s in scales["by hand"]))
    print(f"  torch.amp.GradScaler: the same scales {scales['by hand'] == scales['torch']}, the same weights {same_weights}")
    return {"underflow": shares, "scales_equal": scales["by hand"] == scales["torch"], "weights_equal": same_weights}


def checkpointing_section(config: Config) -> dict:
    """3. Activation checkpointing: what a training step keeps for its backward pass, and its time, with and
    without; the formula of section 1 against the count."""
    model, batch = small_gpt(config)
    inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # each its own storage, as the formula counts
    costs = compare_activation_checkpointing(model, lambda m: m(inputs, targets)[1], repeats=3)
    tokens = batch.shape[0] * config.block_size
    predicted = {}
    for name, checkpointing in (("stored", False), ("recomputed", True)):
        per_token = memory.activation_bytes_per_token(model.config, "fp32", checkpointing)
        predicted[name] = tokens * (config.n_layer * per_token["per_block"] + per_token["outside"]) + 4  # + the loss
    print(f"\nActivation checkpointing, {config.n_layer} blocks, {tokens:,} tokens (fp32):")
    for name, cost in costs.items():
        print(f"  {name:<10} keeps {cost.saved_bytes / 2**20:7.2f} MiB for the backward pass (formula "
              f"{predicted[name] / 2**20:.2f}), {cost.seconds * 1000:6.1f} ms per step")
    return {name: {"saved_bytes": cost.saved_bytes, "formula_bytes": predicted[name], "seconds": cost.seconds}
            for name, cost in costs.items()}


def fsdp_section(config: Config, out: pathlib.Path) -> dict:
    """4. FSDP: the same pretraining command in one process with batch 2B, and under torchrun with batch B per process,
    sharded (FSDP) and, in the full chapter, replicated (DDP)."""
    steps = config.parallel_steps
    common = ["-m", "minillm", "pretrain", "gpt", "--n-layer", str(config.n_layer), "--n-head", str(config.n_head),
              "--n-embd", str(config.n_embd), "--block-size", str(config.block_size), "--dropout", "0",
              "--max-iters", str(steps), "--eval-interval", str(steps), "--eval-iters", "4", "--warmup-iters", "2",
              "--precision", "fp32", "--device", "cpu", "--sample-tokens", "0", "--no-progress", "--overwrite"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(config.processes)]
    launches = {"one process": [sys.executable, *common, "--batch-size", str(config.processes * config.batch_size),
                                "--out", str(out / "one_process")],
                "FSDP": [*torchrun, *common, "--batch-size", str(config.batch_size), "--parallel", "fsdp",
                         "--out", str(out / "fsdp")]}
    if not config.quick:
        launches["DDP"] = [*torchrun, *common, "--batch-size", str(config.batch_size), "--out", str(out / "ddp")]
    results = {}
    print(f"\n`pretrain gpt`, {steps} steps: one process with batch {config.processes * config.batch_size}, against "
          f"{config.processes} processes with batch {config.batch_size} each")
    for name, command in launches.items():
        started = time.perf_counter()
        finished = subprocess.run(command, capture_output=True, text=True, timeout=1200)
        if finished.returncode != 0:
            raise MinillmError(f"the {name} run failed: {finished.stderr.strip().splitlines()[-1:]}")
        run = pathlib.Path(command[command.index("--out") + 1])
        results[name] = {"val_loss": json.loads((run / "results.json").read_text())["val_loss"],
                         "seconds": time.perf_counter() - started}
        print(f"  {name:<12} validation loss {results[name]['val_loss']:.7f} ({results[name]['seconds']:.0f} s with start-up)")
    results["difference"] = abs(results["FSDP"]["val_loss"] - results["one process"]["val_loss"])
    print(f"  FSDP - one process: {results['difference']:.1e} (float32 sums in another order; over many more steps such "
          "differences grow, for DDP as for FSDP)")
    return results


MULTI_NODE = """torchrun --nnodes 2 --nproc-per-node 8 --node-rank 0 \\
    --rdzv-backend c10d --rdzv-endpoint HOST0:29500 --rdzv-id my-run \\
    -m minillm pretrain gpt --parallel fsdp --batch-size 8 --out /shared/runs/gpt"""


def tensor_parallel_section(config: Config) -> dict:
    """5. Tensor parallelism: one block split over the processes, by hand and with DTensor, against the whole block."""
    ranks = spawn(tensor_parallel_demo, config.processes)
    first = ranks[0]
    print(f"\nTensor parallelism over {config.processes} processes (one GPT block, fp32):")
    for name, shape in first["weight_shapes"].items():
        if len(shape) == 2:
            print(f"  {name:<22} whole {str(first['full_weight_shapes'][name]):<12} -> on each rank {shape}")
    print(f"  all-reduces per block: {first['all_reduces_forward']} forward, {first['all_reduces_backward']} backward "
          f"(DTensor: {first['engine_all_reduces_forward']} and {first['engine_all_reduces_backward']}), "
          f"{first['bytes_per_all_reduce'][0]:,} bytes each")
    print(f"  largest difference to the whole block: output {first['output_difference']:.1e}, weight gradients "
          f"{first['weight_gradient_difference']:.1e} (DTensor: {first['engine_output_difference']:.1e})")
    return {key: first[key] for key in ("all_reduces_forward", "all_reduces_backward", "engine_all_reduces_forward",
                                        "engine_all_reduces_backward", "output_difference",
                                        "weight_gradient_difference", "engine_output_difference",
                                        "parameter_bytes", "full_parameter_bytes")}


def pipeline_section(config: Config, out: pathlib.Path) -> dict:
    """6. Pipeline parallelism: GPipe by hand and torch's GPipe and 1F1B against the unsplit model; the bubble."""
    counts = [int(m) for m in config.micro_batches.split(",") if m.strip()]
    equal = pipeline_matches_unsplit(n_stages=config.processes, micro_batch_counts=(1, 2, 4))
    print(f"\nPipeline parallelism, a GPT in {config.processes} stages (float64), against the unsplit model:")
    for key, differences in equal.items():
        if isinstance(key, tuple):
            print(f"  {key[0]:<12} m = {key[1]}: loss difference {differences['loss difference']:.1e}, "
                  f"gradient difference {differences['gradient difference']:.1e}")
    bubble = bubble_demonstration(out, micro_batch_counts=counts, forward_seconds=config.stage_seconds,
                                  backward_seconds=2 * config.stage_seconds)
    print("  GPipe's bubble, 2 stages: m, measured idle share (mean of the stages), formula (p-1)/(m+p-1)")
    measured = {m: sum(row["measured"]) / len(row["measured"]) for m, row in bubble["measured"].items()}
    for m, share in measured.items():
        print(f"    m = {m}: {share:.3f}  vs  {float(gpipe_bubble_fraction(2, m)):.3f}")
    for schedule, row in bubble["simulated"].items():
        print(f"  simulated {schedule}, 4 stages, 8 micro-batches: bubble {float(max(row['bubble'])):.3f} on every stage, micro-batches "
              f"held per stage at most {row['peak in flight']}")
    return {"largest_difference": max(max(d["loss difference"], d["gradient difference"]) for k, d in equal.items()
                                      if isinstance(k, tuple)),
            "bubble": {str(m): {"measured": share, "formula": float(gpipe_bubble_fraction(2, m))} for m, share in measured.items()},
            "simulated": {schedule: {"bubble": [float(b) for b in row["bubble"]], "peak_in_flight": row["peak in flight"]}
                          for schedule, row in bubble["simulated"].items()}}


def main(config: Config) -> dict:
    start, out = time.perf_counter(), pathlib.Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"config": asdict(config)}
    results["memory"] = memory_section(config, out)
    results["precision"] = precision_section(config, out)
    results["activation_checkpointing"] = checkpointing_section(config)
    results["fsdp"] = fsdp_section(config, out)
    results["tensor_parallel"] = tensor_parallel_section(config)
    results["pipeline_parallel"] = pipeline_section(config, out)
    print(f"\nOn several machines (7): run this on each, --node-rank 1 on the second; HOST0 is machine 0:\n{MULTI_NODE}")
    results["seconds"] = time.perf_counter() - start
    per_rank, checkpointing = results["memory"]["gpt2_xl_per_rank_gib"], results["activation_checkpointing"]
    bubble = results["pipeline_parallel"]["bubble"]
    results["summary"] = {
        f"GPT-2 XL training memory per rank on {config.ranks} ranks, DDP -> ZeRO-3 (GiB)":
            f"{per_rank['ddp']:.1f} -> {per_rank['zero3']:.1f}",
        "activations kept, stored -> recomputed (checkpointing)":
            f"{checkpointing['stored']['saved_bytes'] / 2**20:.2f} -> {checkpointing['recomputed']['saved_bytes'] / 2**20:.2f} MiB",
        "gradients that vanish in fp16 / fp16 x 2^16 / bf16":
            " / ".join(f"{results['precision']['underflow'][k]:.2%}" for k in ("fp16: 0", "fp16 after x2^16: 0", "bf16: 0")),
        "FSDP vs one process, validation loss difference": f"{results['fsdp']['difference']:.1e}",
        "GPipe bubble, 2 stages, measured vs formula": ", ".join(f"m={m}: {b['measured']:.2f} vs {b['formula']:.2f}"
                                                                for m, b in bubble.items()),
    }
    write_json(out / "results.json", results)
    print("\n" + "\n".join(f"{name}: {value}" for name, value in results["summary"].items()))
    print(f"results in {out}/results.json ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    run_chapter(main, Config)
