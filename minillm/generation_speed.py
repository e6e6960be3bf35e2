"""Greedy decoding speed, side by side: minillm's :meth:`GPT.generate <minillm.gpt.GPT.generate>` with its KV
cache against Hugging Face ``transformers``' ``GPT2LMHeadModel.generate`` on the *same* weights.

The weights are written once in Hugging Face's GPT-2 layout (:meth:`GPT.save_hf <minillm.gpt.GPT.save_hf>`), then
read by both sides: ``GPT.from_hf`` for minillm, ``from_pretrained`` for transformers. Each side decodes the same
prompts greedily (``temperature=0`` / ``do_sample=False``) for the same number of new tokens, with its cache; the
two are timed in alternation, ``repeats`` times each, and the medians compared, so that whatever else the machine
does slows both alike. The tokens each side produced are compared too: the same weights and greedy decoding
should give the same continuation (float reassociation may flip a near-tie; the share of equal tokens is reported).

**The roofline.** Decoding one token multiplies a (B, n_embd) row block by every weight matrix: at batch 1 each
weight is read once for 2 floating-point operations, so the step's floor is the time to stream the weights from
memory, ``weight_bytes / bandwidth`` (Williams et al., 2009, "Roofline"). :func:`read_bandwidth` measures the
machine's side of that (a sum over a tensor far larger than the caches); :attr:`GenerationRace.weights_gb_per_s`
is what each side achieved. When both sides spend the step in the same matrix products (at GPT-2 small's size, on
a CPU: torch's BLAS, at the same fraction of the floor), a faster decoding loop cannot show; a model whose
arithmetic is small (chapter 06's) is where the loop's own overhead is the time.

A benchmark, not a test: ``python chapters/ch12_deployment.py`` and the README report its numbers.
"""

from __future__ import annotations

import pathlib
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

from minillm import MinillmError
from minillm.gpt import GPT, GPTConfig
from minillm.timing import synchronize

GPT2_SMALL = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)


@dataclass
class GenerationRace:
    batch_size: int
    new_tokens: int
    minillm_seconds: float
    hf_seconds: float
    same_tokens: float  # share of generated tokens equal on both sides
    weight_bytes: int  # bytes of weights one decoding step reads (every matrix but the position table)

    @property
    def speedup(self) -> float:
        return self.hf_seconds / self.minillm_seconds

    def weights_gb_per_s(self, seconds: float) -> float:
        """Weight bytes streamed per second if every one of the ``new_tokens`` steps reads them all once."""
        return self.weight_bytes * self.new_tokens / seconds / 1e9

    def row(self) -> dict:
        tokens = self.batch_size * self.new_tokens
        return {"sequences": self.batch_size, "new tokens each": self.new_tokens,
                "minillm tokens/s": tokens / self.minillm_seconds, "transformers tokens/s": tokens / self.hf_seconds,
                "speedup": self.speedup, "same tokens": self.same_tokens,
                "minillm weights GB/s": self.weights_gb_per_s(self.minillm_seconds),
                "transformers weights GB/s": self.weights_gb_per_s(self.hf_seconds)}


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """GB/s at which this machine reads memory: the median time of summing ``megabytes`` of float32 (far more than
    any cache holds; a sum reads each byte once and does one addition per 4 bytes: bound by memory, not arithmetic)."""
    data = torch.ones(megabytes * 2**20 // 4)
    data.sum()  # the first pass faults the pages in
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(times) / 1e9


def decoding_weight_bytes(model: GPT) -> int:
    """Bytes one decoding step reads from the weights: all parameters but the learned position table (a step reads
    one of its rows); the tied ``lm_head`` / ``wte`` matrix counts once (read by the head, one row by the lookup)."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if not name.startswith("wpe"))


def hf_gpt2(directory: pathlib.Path, device):
    """``transformers.GPT2LMHeadModel`` from a directory :meth:`GPT.save_hf` wrote, or one clear error."""
    try:
        import transformers
    except ImportError:
        raise MinillmError("the generation race needs Hugging Face transformers: pip install -r requirements.txt") from None
    return transformers.GPT2LMHeadModel.from_pretrained(directory).to(device).eval()


@torch.no_grad()
def race_generation(config: GPTConfig | None = None, batch_sizes=(1, 8), prompt_tokens: int = 32, new_tokens: int = 64,
                    repeats: int = 3, device="cpu", seed: int = 0, log=print) -> list[GenerationRace]:
    """Time greedy generation of ``new_tokens`` after ``prompt_tokens`` random prompt tokens, for each batch size
    (concurrent sequences), minillm vs transformers on the same GPT-2-shaped weights (default: GPT-2 small's
    shape, 124M parameters, randomly initialized: speed does not depend on what the weights learned)."""
    config = config or GPTConfig(**GPT2_SMALL, dropout=0.0, bias=True)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as directory:
        GPT(config).save_hf(directory)
        ours = GPT.from_hf(directory).to(device).eval()
        theirs = hf_gpt2(pathlib.Path(directory), device)
    races = []
    generator = torch.Generator().manual_seed(seed)
    for batch_size in batch_sizes:
        prompts = torch.randint(0, config.vocab_size, (batch_size, prompt_tokens), generator=generator).to(device)
        mask = torch.ones_like(prompts)
        times: dict[str, list[float]] = {"minillm": [], "hf": []}
        outputs = {}
        runners = {
            "minillm": lambda: ours.generate(prompts, new_tokens, temperature=0.0),
            "hf": lambda: theirs.generate(prompts, attention_mask=mask, max_new_tokens=new_tokens,
                                          min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                          pad_token_id=0),
        }
        for name, run in runners.items():  # one untimed call each: allocator growth, first-call costs
            run()
        for _ in range(repeats):
            for name, run in runners.items():
                synchronize(device)
                start = time.perf_counter()
                outputs[name] = run()
                synchronize(device)
                times[name].append(time.perf_counter() - start)
        same = (outputs["minillm"][:, prompt_tokens:] == outputs["hf"][:, prompt_tokens:]).float().mean().item()
        race = GenerationRace(batch_size, new_tokens, statistics.median(times["minillm"]), statistics.median(times["hf"]),
                              same, decoding_weight_bytes(ours))
        log(f"  {batch_size} sequence(s) x {new_tokens} new tokens: minillm {race.minillm_seconds:.2f} s, transformers "
            f"{race.hf_seconds:.2f} s ({race.speedup:.2f}x); {same:.0%} of the tokens equal; weights streamed at "
            f"{race.weights_gb_per_s(race.minillm_seconds):.1f} / {race.weights_gb_per_s(race.hf_seconds):.1f} GB/s")
        races.append(race)
    return races
