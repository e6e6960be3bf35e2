"""Chapter 09: efficient and prompt-based fine-tuning, and hyperparameter search.

Fine-tunes the BERT minillm ships (or chapter 07's, with --bert) on SST-2 six ways with the same
data and budget: every weight (chapter 08), the classifier only, the top block, bottleneck adapters
(Houlsby et al., 2019), LoRA (Hu et al., 2021) and a soft prompt (Lester et al., 2021); one table of
SST-2 dev accuracy, trainable parameters, training time and memory. Then a grid search and a random
search over LoRA's hyperparameters, each trial a short fine-tuning run in its own folder. Every run
is a trial of minillm.hpsearch.run_trials: run the chapter again and finished runs are loaded, not
redone.

    python chapters/ch09_efficient.py                     # the shipped BERT
    python chapters/ch09_efficient.py --bert runs/ch07    # chapter 07's BERT instead
    python chapters/ch09_efficient.py --quick             # seconds; what the tests run
"""

from __future__ import annotations

import hashlib
import pathlib
import time
from dataclasses import asdict, dataclass, field

import torch

from minillm import MinillmError, datasets, plots, runs
from minillm.bert import BertForSequenceClassification
from minillm.bert_pretraining import chapter07_pretraining
from minillm.config import run_chapter
from minillm.device import describe_device, pick_device, seed_everything
from minillm.files import write_json
from minillm.finetune import ClassificationTask, FinetuneConfig, encode_for_bert, finetune
from minillm.hpsearch import best_trial, grid, random_search, results_table, run_trials
from minillm.peft import (
    METHOD_RECIPES,
    PEFT_OPTIONS,
    PeftOptions,
    apply_method,
    count_parameters,
    saved_activation_bytes,
    training_memory_bytes,
)
from minillm.tokenization import special_token_ids

GRID = {"lr": [1e-3, 3e-3, 1e-2], "weight_decay": [0.0, 0.1]}  # the searches over LoRA: 6 combinations
RANDOM = {"lr": ("log-uniform", 1e-4, 1e-2), "batch_size": [16, 32, 64], "weight_decay": ("uniform", 0.0, 0.1),
          "lora_r": [2, 4, 8, 16]}  # ... and --random-trials draws
MIB = 2**20
UNUSED = ("lr", "min_lr", "weight_decay")  # FinetuneConfig's, but each run has its own


@dataclass
class Config(PeftOptions, FinetuneConfig):  # PeftOptions: --top-layers, --lora-r, ... (the method table's)
    """Chapter 09: six ways to fine-tune BERT on SST-2, then grid and random search over LoRA's hyperparameters."""

    out: str = field(default="runs/ch09", metadata={"help": "run folder (finished runs in it are reused)"})
    bert: str = field(default="shipped", metadata={"help": "the BERT to start from: 'shipped' (pretrained for hours on "
                                                           "IMDB's reviews, data/pretrained), 'pretrain' (chapter 07's "
                                                           "recipe, now, into <out>/bert_pretraining) or a run folder"})
    max_length: int = field(default=44, metadata={"help": "tokens per example (+ 20 prompt vectors = BERT's 64 positions)"})
    epochs: int = field(default=1, metadata={"help": "passes over the training phrases, for every method"})
    sst2_limit: int = field(default=0, metadata={"help": "SST-2 training phrases for the method table (0: all 67,349)"})
    search_limit: int = field(default=10000, metadata={"help": "SST-2 training phrases for each search trial (one epoch)"})
    random_trials: int = field(default=6, metadata={"help": "random-search trials"})
    lr: float = field(default=1e-3, init=False)  # UNUSED, not options: each method has its METHOD_RECIPES, each
    min_lr: float = field(default=1e-4, init=False)  # trial its own lr; every run decays to a tenth of its peak
    weight_decay: float = field(default=0.01, init=False)
    QUICK = {**FinetuneConfig.QUICK, "sst2_limit": 800, "max_length": 24, "prompt_tokens": 8, "search_limit": 300,
             "random_trials": 2}

    def validate(self):
        super().validate()
        self.validate_options()


def main(config: Config) -> dict:
    start, out, device = time.perf_counter(), pathlib.Path(config.out), pick_device(config.device)
    runs.check_results_folder(out)  # a folder of runs: never a run folder itself
    print(f"Running on {describe_device(device, config.precision)}")
    bert_run = runs.bert_run(config.bert, out / "bert_pretraining", chapter07_pretraining(config))
    bert, tokenizer, _ = runs.load_run(bert_run, expect="bert")
    if config.max_length + config.prompt_tokens > bert.config.max_len:
        raise MinillmError(f"--max-length + --prompt-tokens exceed the BERT's {bert.config.max_len} positions")

    def sst2(limit: int):  # (task, dev): SST-2's first `limit` phrases, a leak-free slice of them held out; SST-2 dev
        splits = datasets.sst2_splits(config.val_fraction, seed=config.seed, limit=limit)
        encode = lambda examples: encode_for_bert(tokenizer, examples, config.max_length)  # noqa: E731
        pad = special_token_ids(tokenizer).pad
        dev = splits.test[:300] if config.quick else splits.test  # quick: a slice of SST-2 dev's 872 sentences
        return ClassificationTask(encode(splits.train), encode(splits.val), pad), encode(dev)

    def fine_tune(params: dict, folder: pathlib.Path, task, dev, **changes) -> dict:  # one run, a trial's metrics
        options = {**params, **changes}
        method = options.pop("method")
        peft_options = {name: options.pop(name, getattr(config, name)) for name in PEFT_OPTIONS}
        shared = {k: v for k, v in asdict(config).items() if k in FinetuneConfig.__dataclass_fields__}
        settings = FinetuneConfig(**{**shared, **options, "min_lr": options["lr"] / 10, "overwrite": True,
                                     "out": str(folder / "run")})
        seed_everything(config.seed)  # the same classifier initialization and batches for every run
        model = apply_method(BertForSequenceClassification.from_pretraining(bert, pooling=settings.pooling), method,
                             **peft_options, generator=torch.Generator().manual_seed(config.seed))
        trainable, total = count_parameters(model)
        longest = task.batch(sorted(task.train, key=lambda example: len(example[0]))[-settings.batch_size:])
        activations = saved_activation_bytes(model, lambda: ClassificationTask.loss(model, longest))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        scores = finetune(model, task, settings, dev, runs.run_info("classifier", {"method": method}))
        return {"dev_accuracy": scores["accuracy"], "val_loss": scores["val_loss"], "trainable": trainable, "total": total,
                "train_seconds": scores["train_seconds"], "memory_mib": (training_memory_bytes(model) + activations) / MIB,
                "activations_mib": activations / MIB,
                "cuda_peak_mib": torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None}

    # 1. Six methods, one budget (`epochs` over the first `sst2_limit` phrases), each with its METHOD_RECIPES.
    task, dev = sst2(config.sst2_limit)
    print(f"SST-2: {len(task.train):,} training phrases, {len(task.val):,} held out, {len(dev):,} dev sentences")
    settings = {**asdict(config), "bert": hashlib.sha1((bert_run / runs.BEST_MODEL).read_bytes()).hexdigest()[:12]}
    context = lambda *skip: {k: v for k, v in settings.items() if k not in {*skip, *UNUSED, "out", "progress",  # noqa: E731
                             "resume", "overwrite", "log_interval", "random_trials"}}  # what a run's result depends on
    trials = [{"method": m, "lr": lr, "weight_decay": weight_decay} for m, (lr, weight_decay) in METHOD_RECIPES.items()]
    methods = run_trials(trials, lambda params, folder: fine_tune(params, folder, task, dev), out / "methods",
                         metric="dev_accuracy", context=context("search_limit"))
    print(f"\nSST-2 dev ({len(dev)} sentences) after {config.epochs} epoch(s) over {len(task.train):,} phrases. Memory "
          "(MiB): weights + gradients + AdamW's 2 moments of the trainable weights + the activations saved for backward "
          "on the longest batch, counted from the model in fp32" + (", and CUDA's peak allocated" if device.type == "cuda" else ""))
    print(f"{'method':9} {'lr':>7} {'trainable':>10} {'share':>7} {'accuracy':>8} {'time s':>7} {'memory':>7} {'activations':>11}")
    for r in methods:
        print(f"{r['method']:9} {r['lr']:7.0e} {r['trainable']:10,} {r['trainable'] / r['total']:7.2%} "
              f"{r['dev_accuracy']:8.1%} {r['train_seconds']:7.1f} {r['memory_mib']:7.1f} {r['activations_mib']:11.1f}"
              + (f"  {r['cuda_peak_mib']:.0f}" if r["cuda_peak_mib"] is not None else ""))

    # 2. Hyperparameter search over LoRA, one epoch over `search_limit` phrases per trial. Trials are chosen by the
    #    held-out split's loss: SST-2 dev is where we report, and choosing on it would flatter the result.
    search_task, search_dev = sst2(config.search_limit)
    searches = {}
    lora_trial = lambda params, folder: fine_tune({"method": "lora", **params}, folder, search_task, search_dev,  # noqa: E731
                                                  epochs=1)
    grid_space = {"lr": GRID["lr"][:2], "weight_decay": GRID["weight_decay"][:1]} if config.quick else GRID  # quick: 2 trials
    for name, trials in (("grid", grid(grid_space)), ("random", random_search(RANDOM, config.random_trials, config.seed))):
        print(f"\n== {name} search over LoRA: {len(trials)} trials, one epoch over {len(search_task.train):,} phrases ==")
        rows = run_trials(trials, lora_trial, out / name, "val_loss", "min", context=context("sst2_limit", "epochs"))
        shown = {"trial", *trials[0], "val_loss", "dev_accuracy", "trainable", "train_seconds"}
        print(results_table([{k: v for k, v in r.items() if k in shown} for r in rows], "val_loss", "min"))
        searches[name] = rows

    # 3. Plots, headlines, results.json.
    names = [r["method"] for r in methods]
    plots.plot_scatter({"methods": ([r["trainable"] for r in methods], [r["dev_accuracy"] for r in methods])},
                       out / "methods.png", title="SST-2 dev accuracy vs trainable parameters", logx=True,
                       xlabel="trainable parameters", ylabel="dev accuracy", labels={"methods": names})
    plots.plot_bars({"weights + gradients + AdamW state": [r["memory_mib"] - r["activations_mib"] for r in methods],
                     "activations saved for backward": [r["activations_mib"] for r in methods]}, names,
                    out / "memory.png", title="Training memory (counted, fp32)", ylabel="MiB")
    groups = {f"grid, weight decay {wd:g}": [r for r in searches["grid"] if r["weight_decay"] == wd]
              for wd in grid_space["weight_decay"]} | {"random search": searches["random"]}
    plots.plot_scatter({name: ([r["lr"] for r in rows], [r["dev_accuracy"] for r in rows]) for name, rows in groups.items()},
                       out / "search.png", title="LoRA trials: SST-2 dev accuracy (r: rank, b: batch size)", logx=True,
                       xlabel="peak learning rate", ylabel="dev accuracy", labels={"random search": [
                           f"r{r['lora_r']} b{r['batch_size']}" for r in groups["random search"]]})
    describe = lambda r: f"lr {r['lr']:.2g}, weight decay {r['weight_decay']:.2g}" + (  # noqa: E731
        f", batch {r['batch_size']}, r {r['lora_r']}" if "lora_r" in r else "")
    summary = {f"SST-2 dev accuracy, {r['method']}": f"{r['dev_accuracy']:.1%} ({r['trainable']:,} trainable, "
               f"{r['train_seconds']:.0f} s, {r['memory_mib']:.1f} MiB)" for r in methods}
    for name, rows in searches.items():
        best = best_trial(rows, "val_loss", "min")
        summary[f"LoRA {name} search, best by held-out loss"] = f"{describe(best)}: dev {best['dev_accuracy']:.1%}"
    summary["wall time"] = f"{(time.perf_counter() - start) / 60:.1f} min (this call; runs finished before are loaded)"
    saved_config = {k: v for k, v in asdict(config).items() if k not in UNUSED}
    write_json(out / "results.json", {"methods": methods, **searches, "config": saved_config, "summary": summary})
    print("\n" + "\n".join(f"{key}: {value}" for key, value in summary.items()))
    print(f"Saved methods.png, memory.png, search.png and results.json in {out}")
    return summary


if __name__ == "__main__":
    run_chapter(main, Config)
