"""Chapter 06: GPT, pretrained on Tiny Shakespeare with the one training loop every later chapter uses.

Tokenizes the play by characters (first 90% trains, last 10% validates, as nanoGPT splits it), builds
a GPT, trains it with minillm.train (AdamW, warmup + cosine, clipping, checkpoints; bf16 on a GPU or
a CPU with bf16 instructions, torch.compile on a GPU), reports validation loss and perplexity, samples
at several temperatures, with top-k and top-p, and measures what the KV cache buys.

    python chapters/ch06_gpt.py            # a CPU: nanoGPT's CPU shape, ~2 min; a GPU: the "baby GPT"
    python chapters/ch06_gpt.py --quick    # seconds; what the tests run
"""

from __future__ import annotations

import math
import pathlib
import time
from dataclasses import asdict, dataclass, field

import torch

from minillm import runs
from minillm.config import run_chapter
from minillm.device import describe_device, pick_device
from minillm.files import read_json, write_json
from minillm.gpt import GPT
from minillm.pretrain import GPTPretrainConfig, LanguageModelingTask, sample_text, tokenize_corpus
from minillm.train import Trainer

# nanoGPT's "baby GPT" for a GPU: 10.7M parameters, context 256 (its best val loss: 1.4697 on an A100).
BABY_GPT = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2, max_iters=5000,
                lr=1e-3, min_lr=1e-4, warmup_iters=100, eval_interval=250, eval_iters=200)


@dataclass
class Config(GPTPretrainConfig):
    """Chapter 06: pretrain a GPT on Tiny Shakespeare, evaluate, sample, and time the KV cache."""

    out: str = field(default="runs/ch06", metadata={"help": "run folder; a run already there is kept: --resume continues it, --overwrite replaces it"})
    gpu_preset: bool = field(default=True, metadata={"help": "on CUDA, train nanoGPT's baby GPT (6x384, context 256, 5,000 steps) "
                                                            "unless sizes are given on the command line"})
    kv_tokens: int = field(default=0, metadata={"help": "tokens generated to time decoding with and without the KV cache "
                                                          "(0: one context window, block_size - 1)"})


def main(config: Config) -> dict:
    out = pathlib.Path(config.out)
    device = pick_device(config.device)
    if device.type == "cuda" and config.gpu_preset and not config.quick:
        config = Config(**{**asdict(config), **BABY_GPT})
    runs.check_run_folder(out, config.resume, config.overwrite, kind="gpt")  # before any work: a run there is kept
    print(f"Running on {describe_device(device, config.precision)}")

    # 1. Data: characters, the first 90% to train on, the last 10% to validate on.
    tokenizer, train_ids, val_ids = tokenize_corpus(config)
    task = LanguageModelingTask(train_ids, val_ids, config.block_size, eval_seed=config.seed)

    # 2. The model: token + position embeddings, pre-norm blocks, a tied output layer.
    torch.manual_seed(config.seed)
    model = GPT(config.model_config(len(tokenizer)))
    print(f"GPT: {model.num_parameters():,} parameters, {config.n_layer} layers x {config.n_embd} wide, "
          f"{config.n_head} heads, context {config.block_size}; a uniform guess scores ln {len(tokenizer)} = "
          f"{math.log(len(tokenizer)):.2f} nats")

    # 3. Train with the shared loop: progress bar, log.jsonl, checkpoints, the best model, loss.png.
    run_info = runs.run_info("gpt", model.config, data=str(config.corpus_path))
    trainer = Trainer(model, task, config, run_info)
    result = trainer.fit(prepare=lambda folder: tokenizer.save(folder / runs.TOKENIZER))
    print(f"\nValidation (whole split, best model from step {result.best_step:,}): loss {result.val_loss:.4f} nats/char, "
          f"perplexity {result.val_perplexity:.2f}, in {result.seconds:.0f} s ({result.tokens_per_s:,.0f} tokens/s)")

    # 4. Sampling: the same model, decoded four ways.
    model.eval()
    samples = {}
    for name, settings in {"greedy (temperature 0)": dict(temperature=0), "temperature 0.8, top-k 200": dict(temperature=0.8, top_k=200),
                           "temperature 1.2": dict(temperature=1.2, top_k=None), "top-p 0.9": dict(temperature=1.0, top_k=None, top_p=0.9)}.items():
        samples[name] = sample_text(model, tokenizer, "ROMEO:", config.sample_tokens, device=trainer.device, seed=config.seed,
                                    **settings)
        print(f"\n--- {name} ---\n{samples[name]}")

    # 5. The KV cache: each new token attends to cached keys and values instead of recomputing the prefix.
    #    It pays within a context window; past it the window slides and (with learned positions) is re-read.
    n_tokens, speed = config.kv_tokens or config.block_size - 1, {}
    prompt = torch.tensor([tokenizer.encode("\n")], device=trainer.device)
    for use_cache in (True, False):
        start = time.perf_counter()
        model.generate(prompt, n_tokens, temperature=0, use_kv_cache=use_cache)
        speed[use_cache] = n_tokens / (time.perf_counter() - start)
    print(f"\nGreedy decoding of {n_tokens} tokens (one context window): {speed[True]:,.0f} tokens/s with the KV cache, "
          f"{speed[False]:,.0f} recomputing the prefix (x{speed[True] / speed[False]:.1f}); the tokens are identical (tests/test_gpt.py)")

    summary = {
        "validation loss (nats/char), whole split": f"{result.val_loss:.4f}",
        "validation perplexity": f"{result.val_perplexity:.2f}",
        "parameters, steps, training time": f"{model.num_parameters():,}, {result.steps:,}, {result.seconds:.0f} s",
        "decoding tokens/s, KV cache / recompute": f"{speed[True]:,.0f} / {speed[False]:,.0f}",
    }
    results = {"val_loss": result.val_loss, "val_perplexity": result.val_perplexity, "best_step": result.best_step,
               "train_seconds": result.seconds, "tokens_per_s": result.tokens_per_s, "samples": samples,
               "kv_cache_tokens_per_s": speed[True], "recompute_tokens_per_s": speed[False],
               "config": asdict(config), "summary": summary}
    write_json(out / "results.json", {**read_json(out / "results.json"), **results})  # beside the loop's own results
    print(f"\nSaved {out / 'loss.png'}, the checkpoints and {out / 'results.json'}")
    return results


if __name__ == "__main__":
    run_chapter(main, Config)
