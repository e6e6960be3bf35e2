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

import pathlib
import time
from dataclasses import asdict, dataclass, field

from minillm import memory
from minillm.config import QuickConfig, run_chapter
from minillm.distributed import spawn
from minillm.files import write_json
from minillm.gpt import GPTConfig
from minillm.pipeline_parallel import bubble_demonstration, gpipe_bubble_fraction, pipeline_matches_unsplit
from minillm.tensor_parallel import demonstrate as tensor_parallel_demo

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
    QUICK = {"n_layer": 2, "n_embd": 64, "block_size": 32, "batch_size": 4, "micro_batches": "1,2,4",
             "stage_seconds": 0.005}

    def validate(self):
        for name in ("ranks", "micro_batch", "processes", "n_layer", "n_embd", "n_head", "block_size", "batch_size"):
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
    results["tensor_parallel"] = tensor_parallel_section(config)
    results["pipeline_parallel"] = pipeline_section(config, out)
    results["seconds"] = time.perf_counter() - start
    results["summary"] = (f"ZeRO-3 on {config.ranks} ranks: GPT-2 XL needs "
                          f"{results['memory']['gpt2_xl_per_rank_gib']['zero3']:.1f} GiB per rank "
                          f"(DDP: {results['memory']['gpt2_xl_per_rank_gib']['ddp']:.1f})")
    write_json(out / "results.json", results)
    print(f"\n{results['summary']}\nresults in {out}/results.json ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    run_chapter(main, Config)
