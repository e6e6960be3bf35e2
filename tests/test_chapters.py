"""Every chapter script runs end to end with --quick, and the main command works, so none of them rots."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

CHAPTERS = sorted((REPO_ROOT / "chapters").glob("ch[0-9][0-9]_*.py"))


def run(args, cwd, timeout=600, env=None):
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    environment.pop("MINILLM_QUICK", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment)


def test_there_are_chapters():
    assert len(CHAPTERS) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("script", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_script_runs_quick_and_saves_plots_and_results(script, tmp_path):
    out = tmp_path / "out"
    result = run([str(script), "--quick", "--out", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["quick"] is True and results["summary"]
    assert list(out.glob("*.png")), "a chapter saves at least one plot"


@pytest.mark.parametrize("script", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_script_help_lists_quick(script, tmp_path):
    result = run([str(script), "--help"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and "--quick" in result.stdout and "--out" in result.stdout


@pytest.mark.parametrize("script", CHAPTERS[:1], ids=lambda p: p.stem)
def test_chapter_script_rejects_a_bad_value_with_one_line(script, tmp_path):
    result = run([str(script), "--steps", "-3"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "must be at least 1" in result.stderr


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_resumes_without_redoing_them(tmp_path):
    out = tmp_path / "pipeline"
    first = run(["-m", "minillm", "pipeline", "--quick", "--out", str(out)], cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert "| ch08_finetune | SST-2 dev, 100 labels: BERT, pretrained / random init (gain) |" in summary
    assert "| ch07_bert | held-out masked-LM accuracy, before -> after |" in summary
    assert "ch01_hello_pytorch" not in summary  # the main job's stages only (--stages all runs every chapter)
    assert "| ch06_gpt | validation perplexity |" in summary
    results_before = (out / "ch03_tokenization" / "results.json").stat().st_mtime_ns
    second = run(["-m", "minillm", "pipeline", "--quick", "--out", str(out)], cwd=tmp_path)
    assert second.returncode == 0 and second.stdout.count("already done") == summary.count("| wall time |")
    assert (out / "ch03_tokenization" / "results.json").stat().st_mtime_ns == results_before


def test_pipeline_rejects_an_unknown_stage_with_one_line(tmp_path):
    result = run(["-m", "minillm", "pipeline", "--stages", "ch99_nothing"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "unknown stage(s) ch99_nothing" in result.stderr and "Traceback" not in result.stderr


def test_chapter_08_rejects_an_unknown_model_family_with_one_line(tmp_path):
    result = run([str(REPO_ROOT / "chapters" / "ch08_finetune.py"), "--families", "bert,t5"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--families must be comma-separated names from bert, shipped, gpt" in result.stderr
