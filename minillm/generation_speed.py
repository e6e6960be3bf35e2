"""Greedy decoding speed, side by side: minillm's :meth:`GPT.generate <minillm.gpt.GPT.generate>` with its KV
cache against Hugging Face ``transformers``' ``GPT2LMHeadModel.generate`` on the *same* weights.

The weights are written once in Hugging Face's GPT-2 layout (:meth:`GPT.save_hf <minillm.gpt.GPT.save_hf>`), then
read by both sides: ``GPT.from_hf`` for minillm, ``from_pretrained`` for transformers. Each side decodes the same
prompts greedily (``temperature=0`` / ``do_sample=False``) for the same number of new tokens, with its cache; the
two are timed in alternation, ``repeats`` times each, and the medians compared, so that whatever else the machine
does slows both alike. The tokens each side produced are compared too: the same weights and greedy decoding
should give the same continuation (float reassociation may flip a near-tie; the share of equal tokens is reported).

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

    @property
    def speedup(self) -> float:
        return self.hf_seconds / self.minillm_seconds

    def row(self) -> dict:
        tokens = self.batch_size * self.new_tokens
        return {"sequences": self.batch_size, "new tokens each": self.new_tokens,
                "minillm tokens/s": tokens / self.minillm_seconds, "transformers tokens/s": tokens / self.hf_seconds,
                "speedup": self.speedup, "same tokens": self.same_tokens}


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
                              same)
        log(f"  {batch_size} sequence(s) x {new_tokens} new tokens: minillm {race.minillm_seconds:.2f} s, transformers "
            f"{race.hf_seconds:.2f} s ({race.speedup:.2f}x); {same:.0%} of the tokens equal")
        races.append(race)
    return races
