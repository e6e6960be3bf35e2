"""``python -m minillm generate``: sample text from a pretrained GPT run folder.

::

    python -m minillm generate --ckpt runs/shakespeare-char --prompt "ROMEO:" --max-new-tokens 300
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from minillm import runs
from minillm.config import QuickConfig
from minillm.device import pick_device
from minillm.pretrain import sample_text


@dataclass
class GenerateConfig(QuickConfig):
    """Sample text from a pretrained GPT run folder."""

    ckpt: str = field(default="runs/gpt", metadata={"help": "run folder written by 'pretrain gpt' (or a .safetensors file in it)"})
    prompt: str = field(default="\n", metadata={"help": "text to continue"})
    max_new_tokens: int = field(default=300, metadata={"help": "tokens to sample"})
    temperature: float = field(default=0.8, metadata={"help": "softmax temperature; 0 is greedy decoding"})
    top_k: int | None = field(default=200, metadata={"help": "sample among the k most likely tokens (none: all)"})
    top_p: float | None = field(default=None, metadata={"help": "nucleus sampling: the smallest set with this much probability"})
    num_samples: int = field(default=1, metadata={"help": "how many samples"})
    kv_cache: bool = field(default=True, metadata={"help": "decode with the KV cache"})
    seed: int = field(default=1337, metadata={"help": "random seed of the sampler"})
    device: str = field(default="auto", metadata={"help": "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps"})

    def validate(self):
        if self.max_new_tokens < 1 or self.num_samples < 1:
            raise ValueError("--max-new-tokens and --num-samples must be at least 1")
        if self.temperature < 0:
            raise ValueError(f"--temperature cannot be negative, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top-k must be at least 1 (or none), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1] (or none), got {self.top_p}")



def generate(config: GenerateConfig) -> list[str]:
    device = pick_device(config.device)
    model, tokenizer, _ = runs.load_run(config.ckpt, device, expect="gpt")
    samples = []
    for index in range(config.num_samples):
        start = time.perf_counter()
        text = sample_text(model, tokenizer, config.prompt, config.max_new_tokens, config.temperature, config.top_k,
                           config.top_p, device, config.seed + index, config.kv_cache)
        seconds = time.perf_counter() - start
        print(text)
        print(f"--- {config.max_new_tokens} tokens in {seconds:.2f} s ({config.max_new_tokens / seconds:,.0f} tokens/s)\n", flush=True)
        samples.append(text)
    return samples
