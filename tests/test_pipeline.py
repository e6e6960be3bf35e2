"""``python -m minillm pipeline --quick``, run once for this file: the main job's chapter scripts (03, 06, 07, 08) run as
its stages, and each chapter's check reads its stage folder instead of running the same script a second time.

A file of its own so that pytest-xdist (``--dist loadfile``) runs all of it on one worker, where the module's
fixture runs the pipeline once; test_chapters.py runs the other chapters' scripts.
"""

from __future__ import annotations

import pytest
from conftest import REPO_ROOT
from test_chapters import check_chapter_results, run

from minillm.commands.pipeline import MAIN_STAGES


@pytest.fixture(scope="module")
def quick_pipeline(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("pipeline")
    out = cwd / "pipeline"
    result = run(["-m", "minillm", "pipeline", "--quick", "--out", str(out)], cwd=cwd, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cwd, out


def test_the_main_job_is_the_chapters_with_scripts():
    assert MAIN_STAGES and all((REPO_ROOT / "chapters" / f"{stage}.py").is_file() for stage in MAIN_STAGES)


@pytest.mark.slow
@pytest.mark.parametrize("stage", MAIN_STAGES)
def test_main_job_chapter_runs_quick_and_shows_what_it_teaches(stage, quick_pipeline):
    check_chapter_results(stage, quick_pipeline[1] / stage)


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_resumes_without_redoing_them(quick_pipeline):
    cwd, out = quick_pipeline
    summary = (out / "summary.md").read_text()
    assert "| ch08_finetune | SST-2 dev, 100 labels: BERT, pretrained / random init (gain) |" in summary
    assert "| ch07_bert | held-out masked-LM accuracy, before -> after |" in summary
    assert "ch01_hello_pytorch" not in summary  # the main job's stages only (--stages all runs every chapter)
    assert "| ch06_gpt | validation perplexity |" in summary
    results_before = (out / "ch03_tokenization" / "results.json").stat().st_mtime_ns
    second = run(["-m", "minillm", "pipeline", "--quick", "--out", str(out)], cwd=cwd)
    assert second.returncode == 0 and second.stdout.count("already done") == summary.count("| wall time |")
    assert (out / "ch03_tokenization" / "results.json").stat().st_mtime_ns == results_before
