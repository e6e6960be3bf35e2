"""Every chapter script runs end to end with --quick, and the main command works, so none of them rots."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from minillm.commands.pipeline import MAIN_STAGES

CHAPTERS = sorted((REPO_ROOT / "chapters").glob("ch[0-9][0-9]_*.py"))


def run(args, cwd, timeout=1200, env=None):  # the limit stops a hang; a busy 2-core machine may need 10 minutes
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    environment.pop("MINILLM_QUICK", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment)


def _ch02(r):
    regression = r["linear_regression"]
    assert regression["gradient_max_diff"] < 1e-10  # the derived gradient is autograd's
    assert abs(regression["gd_loss"] - regression["closed_form_loss"]) < 1e-6  # gradient descent reaches least squares
    assert max(o["dev_accuracy"] for o in r["optimizer_race"].values()) > 0.6  # some optimizer learns (chance: 0.5)


def _ch03(r):
    held_out = r["shakespeare"]
    assert held_out["characters"]["unknown"] == 0 and held_out["characters"]["chars_per_token"] == 1.0
    assert held_out["our BPE"]["chars_per_token"] > 1.2 and held_out["library WordPiece"]["chars_per_token"] > 1.2
    assert held_out["overlap"]["shared"] >= held_out["overlap"]["ours"] // 2  # our BPE learns the library's merges


def _ch04(r):
    assert r["by_hand"]["max_abs_diff_vs_torch"] < 1e-5 and r["multi_head"]["max_abs_diff_vs_torch_mha"] < 1e-5
    assert r["kv_cache"]["max_abs_diff"] < 1e-5
    accuracy = r["reversal"]["accuracy"]
    assert accuracy["2_layers"]["token"] > 0.8 > accuracy["1_layers"]["token"]  # reversal needs two layers


def _ch06(r):
    assert r["val_loss"] < 0.9 * math.log(65)  # below a uniform guess over Tiny Shakespeare's 65 characters
    assert r["samples"] and r["kv_cache_tokens_per_s"] > 0


def _ch07(r):
    assert r["mlm_loss"] < r["before"]["mlm_loss"] and r["mlm_accuracy"] > r["before"]["mlm_accuracy"]


def _ch08(r):
    sst2 = r["scores"]["sst2"]
    pretrained, random = (sst2[f"BERT, pretrained longer (shipped), {kind}"] for kind in ("pretrained", "random init"))
    most = max(pretrained, key=int)  # all labels (quick: 1,344): the shipped BERT beats its random-init twin
    assert pretrained[most][0]["accuracy"] > max(0.65, random[most][0]["accuracy"])
    assert all(0 <= x["accuracy"] <= 1 for task in r["scores"].values() for model in task.values()
               for runs in model.values() for x in runs)


def _ch09(r):
    methods = {row["method"]: row for row in r["methods"]}
    assert set(methods) == {"full", "head", "top", "adapters", "lora", "prompt"}
    assert methods["head"]["trainable"] < methods["prompt"]["trainable"] < methods["lora"]["trainable"] \
        < methods["full"]["trainable"] == methods["full"]["total"]  # what each method trains, in order
    assert max(row["dev_accuracy"] for row in methods.values()) > 0.6  # chance: 0.5
    assert methods["head"]["memory_mib"] < methods["lora"]["memory_mib"] < methods["full"]["memory_mib"]


def _ch10(r):
    random, before, after = (r["probes"][name] for name in ("random init", "MLM-pretrained", "+ SimCSE"))
    assert after["mean_cosine"] < before["mean_cosine"]  # SimCSE spreads the embeddings out
    assert before["logistic_regression"] > random["logistic_regression"] + 0.03  # pretrained features carry sentiment


def _ch11(r):
    memory, precision = r["activation_checkpointing"], r["precision"]
    assert all(memory[kind]["saved_bytes"] == memory[kind]["formula_bytes"] for kind in ("stored", "recomputed"))
    assert memory["recomputed"]["saved_bytes"] < memory["stored"]["saved_bytes"] / 2  # checkpointing keeps far less
    assert precision["scales_equal"] and precision["weights_equal"]  # the scaler by hand takes GradScaler's steps
    assert precision["underflow"]["bf16: 0"] == 0 < precision["underflow"]["fp16: 0"]  # fp16 loses gradients, bf16 not
    assert r["fsdp"]["difference"] < 1e-4  # FSDP takes the one-process steps
    tensor = r["tensor_parallel"]
    assert tensor["all_reduces_forward"] == tensor["all_reduces_backward"] == 2 and tensor["output_difference"] < 1e-5
    pipeline = r["pipeline_parallel"]
    assert pipeline["largest_difference"] < 1e-12 and pipeline["simulated"]["gpipe"]["bubble"][0] == 3 / 11


# What each chapter's quick run must show: a number that a broken chapter would not reach.
def _ch12(r):
    int8, fp32 = (next(row for row in r["quantization"]["classifier"] if row["precision"] == p) for p in ("int8 (by hand)", "fp32"))
    assert int8["size_vs_fp32"] > 3.5  # int8 linear layers and word table, fp32 LayerNorms and position table
    assert abs(int8["metric"] - fp32["metric"]) < 0.03  # the same classifier, rounded: a few dev sentences may flip
    assert all(check["max_abs_diff"] < 1e-3 for check in r["export"].values())  # ONNX Runtime gives PyTorch's logits
    assert all(race["same tokens"] == 1.0 for race in r["generation_race"])  # same weights, same greedy tokens
    served = r["serving"]["completions"]
    assert all(row["errors"] == 0 and row["ok"] == r["config"]["requests"] for row in served)
    assert r["serving"]["classify"]["errors"] == 0


CHECKS = {
    "ch01_hello_pytorch": lambda r: r["grad_check_max_rel_error"] < 1e-6 and r["final_train_mse"] < 0.1,
    "ch02_gradient_descent": _ch02,
    "ch03_tokenization": _ch03,
    "ch04_attention": _ch04,
    "ch05_transformer": lambda r: r["final_val_loss"] < 0.8 * math.log(14),  # below a uniform guess over 14 targets
    "ch06_gpt": _ch06,
    "ch07_bert": _ch07,
    "ch08_finetune": _ch08,
    "ch09_efficient": _ch09,
    "ch10_contrastive": _ch10,
    "ch11_scaling": _ch11,
    "ch12_deployment": _ch12,
}


def test_every_chapter_has_a_check():
    assert [script.stem for script in CHAPTERS] == list(CHECKS)


def check_chapter_results(script_stem: str, out) -> None:
    """The results a chapter's quick run wrote into ``out``: its summary, a plot, and the chapter's own check."""
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["quick"] is True and results["summary"]
    assert list(out.glob("*.png")), "a chapter saves at least one plot"
    assert CHECKS[script_stem](results) is not False, results["summary"]


@pytest.mark.slow
@pytest.mark.parametrize("script", [script for script in CHAPTERS if script.stem not in MAIN_STAGES], ids=lambda p: p.stem)
def test_chapter_script_runs_quick_and_shows_what_it_teaches(script, tmp_path):
    """The main job's chapters (03, 06, 07, 08) are checked in test_pipeline.py, on the quick pipeline's folders."""
    out = tmp_path / "out"
    result = run([str(script), "--quick", "--out", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_chapter_results(script.stem, out)


@pytest.mark.parametrize("script", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_script_help_lists_quick(script, tmp_path):
    result = run([str(script), "--help"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and "--quick" in result.stdout and "--out" in result.stdout


@pytest.mark.parametrize("script", CHAPTERS[:1], ids=lambda p: p.stem)
def test_chapter_script_rejects_a_bad_value_with_one_line(script, tmp_path):
    result = run([str(script), "--steps", "-3"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "must be at least 1" in result.stderr


def test_pipeline_rejects_an_unknown_stage_with_one_line(tmp_path):
    result = run(["-m", "minillm", "pipeline", "--stages", "ch99_nothing"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "unknown stage(s) ch99_nothing" in result.stderr and "Traceback" not in result.stderr


def test_chapter_08_rejects_an_unknown_model_family_with_one_line(tmp_path):
    result = run([str(REPO_ROOT / "chapters" / "ch08_finetune.py"), "--families", "bert,t5"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--families must be comma-separated names from bert, shipped, gpt" in result.stderr


def test_the_pipeline_resumes_an_interrupted_training_stage_and_replaces_only_its_own_other_runs(tmp_path):
    from minillm.commands.pipeline import _run_folder_args
    from minillm.files import write_json

    stage = tmp_path / "ch06_gpt"
    assert _run_folder_args(stage, quick=True, force=False) == []  # nothing there: a fresh run
    stage.mkdir()
    write_json(stage / "config.json", {"model": {"type": "gpt"}, "train_config": {"quick": True}})
    assert _run_folder_args(stage, quick=True, force=False) == []  # a stub: nothing trained
    (stage / "checkpoint.safetensors").write_bytes(b"")
    assert _run_folder_args(stage, quick=True, force=False) == ["--resume"]  # interrupted: continue it
    assert _run_folder_args(stage, quick=False, force=False) == ["--overwrite"]  # the other size: redo
    assert _run_folder_args(stage, quick=True, force=True) == ["--overwrite"]  # --force: redo
    (stage / "results.json").write_text("{}")
    assert _run_folder_args(stage, quick=True, force=False) == ["--overwrite"]  # trained, chapter unfinished
