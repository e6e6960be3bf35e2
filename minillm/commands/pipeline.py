"""The main job: every chapter's real work, one stage after another, with a summary at the end.

Each stage runs a chapter script in its own process, as a module (``python -m minillm.chapters.chNN_<topic>``:
the scripts ship inside the package, so the main job needs no checkout of the repository), and writes
``<out>/<stage>/results.json`` last, atomically; a stage whose results exist (from a run of the same size) is not redone, so
an interrupted pipeline resumes where it stopped. At the end a Markdown table of every stage's
headline numbers is printed and saved as ``<out>/summary.md``, next to the stages' PNG plots.

By default (``--stages main``) the main job runs what the issue that defined it lists: tokenizer
training (03), GPT pretraining on Tiny Shakespeare with samples (06), BERT pretraining on IMDB's
unlabelled reviews (07), and fine-tuning on SST-2 with 1,000 labels and with all of them, chapter
07's BERT and the longer-pretrained BERT shipped in data/pretrained, each against its random-init twin
(08); ``--stages all`` runs every chapter.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys
import time
from dataclasses import dataclass, field

from minillm import MinillmError, runs
from minillm.config import QuickConfig
from minillm.files import atomic_write_text, read_json

# (stage name = the chapter's module in minillm.chapters, what it does, extra arguments; "{out}": the run folder)
STAGES: list[tuple[str, str, list[str]]] = [
    ("ch01_hello_pytorch", "tensors, autograd, a training loop, torch.compile", []),
    ("ch02_gradient_descent", "linear regression by hand; optimizers race on SST-2", []),
    ("ch03_tokenization", "cleaning; char, BPE and WordPiece tokenizers trained and compared", []),
    ("ch04_attention", "attention by hand; an attention-only model learns to reverse", []),
    ("ch05_transformer", "an encoder-decoder Transformer learns number words -> digits", []),
    ("ch06_gpt", "GPT pretrained on Tiny Shakespeare; samples; the KV cache", []),
    ("ch07_bert", "BERT pretrained on IMDB's unlabelled reviews: masked LM + next sentence; fill-in", []),
    ("ch08_finetune", "chapter 07's BERT and the shipped BERT, pretrained vs random init, "
     "fine-tuned on SST-2 with 1,000 labels and all", ["--bert", "{out}/ch07_bert"]),
    ("ch09_efficient", "head-only, top layers, adapters, LoRA, prompt tuning; grid and random "
     "search (the shipped BERT)", []),
    ("ch10_contrastive", "SimCSE sentence embeddings, probed before and after (the shipped BERT)", []),
    ("ch11_scaling", "memory arithmetic, fp16 loss scaling, activation checkpointing, FSDP, tensor and pipeline "
     "parallelism over CPU processes", []),
    ("ch12_deployment", "chapter 06's GPT and a BERT classifier evaluated, quantized to int8, distilled, exported to ONNX "
     "and served (OpenAI-compatible) under a load test", ["--gpt", "{out}/ch06_gpt"]),
]
# The main job: tokenizers, GPT pretraining with samples, BERT pretraining, fine-tuning and evaluation on SST-2.
MAIN_STAGES = ["ch03_tokenization", "ch06_gpt", "ch07_bert", "ch08_finetune"]
NEEDS = {"ch08_finetune": "ch07_bert", "ch12_deployment": "ch06_gpt"}  # a stage that reads another's run folder
RUN_STAGES = {"ch06_gpt", "ch07_bert", "ch10_contrastive"}  # a stage whose folder is one training run (--resume)


@dataclass
class PipelineConfig(QuickConfig):
    """Run the main job: tokenizers, GPT and BERT pretraining, fine-tuning on SST-2, a summary; resumable."""

    out: str = field(default="", metadata={"help": "run folder (default: runs/pipeline, or runs/pipeline-quick with --quick)"})
    force: bool = field(default=False, metadata={"help": "redo stages that already finished"})
    stages: str = field(default="main", metadata={"help": "'main' (" + ", ".join(MAIN_STAGES) + "), 'all' (every "
                                                          "chapter), or comma-separated stage names"})

    def validate(self):
        known = [name for name, *_ in STAGES]
        if self.stages not in ("main", "all"):
            unknown = [s for s in self.stages.split(",") if s not in known]
            if unknown:
                raise ValueError(f"unknown stage(s) {', '.join(unknown)}: choose from main, all, {', '.join(known)}")

    @property
    def selected(self) -> list[tuple[str, str, list[str]]]:
        names = {"main": MAIN_STAGES, "all": [name for name, *_ in STAGES]}.get(self.stages, self.stages.split(","))
        names = set(names) | {NEEDS[name] for name in names if name in NEEDS}  # a stage brings what it reads
        return [stage for stage in STAGES if stage[0] in names]

    @property
    def out_dir(self) -> pathlib.Path:
        return pathlib.Path(self.out or ("runs/pipeline-quick" if self.quick else "runs/pipeline"))


def _finished(stage_dir: pathlib.Path, quick: bool) -> bool:
    results = stage_dir / runs.RESULTS
    if not results.exists():
        return False
    try:
        stage_config = read_json(results).get("config")  # the chapter's own results, written last
    except (ValueError, AttributeError):
        return False  # a damaged file: redo the stage
    return isinstance(stage_config, dict) and bool(stage_config.get("quick")) == quick


def _run_folder_args(stage_dir: pathlib.Path, quick: bool, force: bool) -> list[str]:
    """For a stage that trains one run: continue an interrupted run of the same size (``--resume``); replace one
    of the other size, a finished one being redone (``--force``) or a damaged one (``--overwrite``: the pipeline's
    own folder, never a user's); start afresh in an empty folder."""
    if not any((stage_dir / name).exists() for name in runs.TRAINED_FILES):
        return []
    try:
        same_size = bool(read_json(stage_dir / runs.CONFIG).get("train_config", {}).get("quick")) == quick
    except (OSError, ValueError, AttributeError):
        same_size = False
    if same_size and not force and (stage_dir / runs.CHECKPOINT).is_file() and not (stage_dir / runs.RESULTS).exists():
        return ["--resume"]
    return ["--overwrite"]


def run_pipeline(config: PipelineConfig) -> pathlib.Path:
    """Run (or resume) every stage; return the path of the summary table."""
    out = config.out_dir
    selected = config.selected
    size = "quick" if config.quick else "full"
    print(f"minillm pipeline ({size}): {len(selected)} stage(s) into {out}/", flush=True)
    timings: dict[str, float] = {}
    for index, (name, what, extra) in enumerate(selected, start=1):
        stage_dir = out / name
        header = f"[{index}/{len(selected)}] {name}: {what}"
        if _finished(stage_dir, config.quick) and not config.force:
            print(f"{header} -- already done, skipped (--force redoes it)", flush=True)
            continue
        module = f"minillm.chapters.{name}"
        if importlib.util.find_spec(module) is None:
            raise MinillmError(f"the chapter module {module} is missing: reinstall minillm (pip install -e .)")
        print(f"\n{header}", flush=True)
        command = [sys.executable, "-m", module, "--out", str(stage_dir)] + (["--quick"] if config.quick else [])
        command += [arg.replace("{out}", str(out)) for arg in extra]
        if name in RUN_STAGES:
            command += _run_folder_args(stage_dir, config.quick, config.force)
        start = time.perf_counter()
        returncode = subprocess.run(command).returncode
        timings[name] = time.perf_counter() - start
        if returncode != 0:
            raise MinillmError(f"stage {name} failed (exit code {returncode}); its output is above. "
                               f"Finished stages are kept: rerun the same command to resume from {name}")
    summary_path = write_summary(out, selected, timings)
    print("\n" + summary_path.read_text(encoding="utf-8"))
    return summary_path


def write_summary(out: pathlib.Path, stages: list[tuple[str, str, list[str]]], timings: dict[str, float]) -> pathlib.Path:
    """A Markdown table of every stage's headline numbers (the ``summary`` of its results.json)."""
    lines = ["# minillm pipeline summary", "", f"Written {time.strftime('%Y-%m-%d %H:%M')} into `{out}/`.", "",
             "| stage | result | value |", "| --- | --- | --- |"]
    plots = []
    for name, *_ in stages:
        results = read_json(out / name / runs.RESULTS)
        for metric, value in results.get("summary", {}).items():
            lines.append(f"| {name} | {metric} | {value} |")
        if name in timings:
            lines.append(f"| {name} | wall time | {timings[name]:.0f} s |")
        plots += sorted(str(p) for p in (out / name).glob("*.png"))
    lines += ["", "Plots:", ""] + [f"- {p}" for p in plots]
    return atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
