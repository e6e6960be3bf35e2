"""The main job: every chapter's real work, one stage after another, with a summary at the end.

Each stage runs a chapter script in its own process and writes ``<out>/<stage>/results.json``
last, atomically; a stage whose results exist (from a run of the same size) is not redone, so
an interrupted pipeline resumes where it stopped. At the end a Markdown table of every stage's
headline numbers is printed and saved as ``<out>/summary.md``, next to the stages' PNG plots.

Today the stages are chapters 01-07; chapter 08 adds fine-tuning on SST-2.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time
from dataclasses import dataclass, field

from minillm import MinillmError
from minillm.checkpoint import atomic_write_text, read_json
from minillm.config import QuickConfig

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# (stage name, chapter script, what it does)
STAGES: list[tuple[str, str, str]] = [
    ("ch01_hello_pytorch", "chapters/ch01_hello_pytorch.py", "tensors, autograd, a training loop, torch.compile"),
    ("ch02_gradient_descent", "chapters/ch02_gradient_descent.py", "linear regression by hand; optimizers race on SST-2"),
    ("ch03_tokenization", "chapters/ch03_tokenization.py", "cleaning; char, BPE and WordPiece tokenizers trained and compared"),
    ("ch04_attention", "chapters/ch04_attention.py", "attention by hand; an attention-only model learns to reverse"),
    ("ch05_transformer", "chapters/ch05_transformer.py", "an encoder-decoder Transformer learns number words -> digits"),
    ("ch06_gpt", "chapters/ch06_gpt.py", "GPT pretrained on Tiny Shakespeare; samples; the KV cache"),
    ("ch07_bert", "chapters/ch07_bert.py", "BERT pretrained on SST-2 text: masked LM + next sentence; fill-in"),
]


@dataclass
class PipelineConfig(QuickConfig):
    """Run the main job: every chapter's stage in order, resuming where a previous run stopped."""

    out: str = field(default="", metadata={"help": "run folder (default: runs/pipeline, or runs/pipeline-quick with --quick)"})
    force: bool = field(default=False, metadata={"help": "redo stages that already finished"})
    stages: str = field(default="all", metadata={"help": "comma-separated stage names to run, or 'all'"})

    def validate(self):
        known = [name for name, _, _ in STAGES]
        if self.stages != "all":
            unknown = [s for s in self.stages.split(",") if s not in known]
            if unknown:
                raise ValueError(f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(known)}")

    @property
    def out_dir(self) -> pathlib.Path:
        return pathlib.Path(self.out or ("runs/pipeline-quick" if self.quick else "runs/pipeline"))


def _finished(stage_dir: pathlib.Path, quick: bool) -> bool:
    results = stage_dir / "results.json"
    if not results.exists():
        return False
    try:
        return bool(read_json(results).get("config", {}).get("quick")) == quick
    except ValueError:
        return False  # a damaged file: redo the stage


def run_pipeline(config: PipelineConfig) -> pathlib.Path:
    """Run (or resume) every stage; return the path of the summary table."""
    out = config.out_dir
    selected = [stage for stage in STAGES if config.stages == "all" or stage[0] in config.stages.split(",")]
    size = "quick" if config.quick else "full"
    print(f"minillm pipeline ({size}): {len(selected)} stage(s) into {out}/", flush=True)
    timings: dict[str, float] = {}
    for index, (name, script, what) in enumerate(selected, start=1):
        stage_dir = out / name
        header = f"[{index}/{len(selected)}] {name}: {what}"
        if _finished(stage_dir, config.quick) and not config.force:
            print(f"{header} -- already done, skipped (--force redoes it)", flush=True)
            continue
        script_path = REPO_ROOT / script
        if not script_path.exists():
            raise MinillmError(f"{script_path} is missing: run the pipeline from a full checkout of the repository")
        print(f"\n{header}", flush=True)
        command = [sys.executable, str(script_path), "--out", str(stage_dir)] + (["--quick"] if config.quick else [])
        start = time.perf_counter()
        returncode = subprocess.run(command).returncode
        timings[name] = time.perf_counter() - start
        if returncode != 0:
            raise MinillmError(f"stage {name} failed (exit code {returncode}); its output is above. "
                               f"Finished stages are kept: rerun the same command to resume from {name}")
    summary_path = write_summary(out, selected, timings)
    print("\n" + summary_path.read_text(encoding="utf-8"))
    return summary_path


def write_summary(out: pathlib.Path, stages: list[tuple[str, str, str]], timings: dict[str, float]) -> pathlib.Path:
    """A Markdown table of every stage's headline numbers (the ``summary`` of its results.json)."""
    lines = ["# minillm pipeline summary", "", f"Written {time.strftime('%Y-%m-%d %H:%M')} into `{out}/`.", "",
             "| stage | result | value |", "| --- | --- | --- |"]
    plots = []
    for name, _, _ in stages:
        results = read_json(out / name / "results.json")
        for metric, value in results.get("summary", {}).items():
            lines.append(f"| {name} | {metric} | {value} |")
        if name in timings:
            lines.append(f"| {name} | wall time | {timings[name]:.0f} s |")
        plots += sorted(str(p) for p in (out / name).glob("*.png"))
    lines += ["", "Plots:", ""] + [f"- {p}" for p in plots]
    return atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
