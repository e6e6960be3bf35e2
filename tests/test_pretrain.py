"""``python -m minillm pretrain gpt`` and ``generate`` as a user types them: the run folder, resume,
sampling, and one clear line (exit status 2) for every mistake, with nothing overwritten."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from minillm.__main__ import main
from minillm.pretrain import sample_text
from minillm.runs import load_run

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--max-iters", "6", "--eval-interval", "3", "--eval-iters", "2", "--warmup-iters", "1", "--no-progress",
        "--sample-tokens", "20", "--device", "cpu"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 60, encoding="utf-8")
    return path


def run_cli(args, cwd):
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    environment.pop("MINILLM_QUICK", None)
    return subprocess.run([sys.executable, "-m", "minillm", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=environment)


def test_pretrain_writes_a_complete_run_folder_and_generate_samples_from_it(tmp_path, corpus):
    out = tmp_path / "run"
    result = run_cli(["pretrain", "gpt", "--data", str(corpus), "--out", str(out), *TINY], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.json", "tokenizer.json", "checkpoint.safetensors", "model.safetensors", "log.jsonl",
                 "loss.png", "results.json", "samples.txt"):
        assert (out / name).exists(), name
    assert json.loads((out / "results.json").read_text())["steps"] == 6
    sample = run_cli(["generate", "--ckpt", str(out), "--prompt", "To be", "--max-new-tokens", "15", "--device", "cpu"],
                     tmp_path)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert sample.stdout.startswith("To be") and "tokens/s" in sample.stdout

    again = run_cli(["pretrain", "gpt", "--data", str(corpus), "--out", str(out), *TINY], tmp_path)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "Traceback" not in again.stderr
    longer = run_cli(["pretrain", "gpt", "--data", str(corpus), "--out", str(out), *TINY, "--max-iters", "9", "--resume"],
                     tmp_path)
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "resuming" in longer.stdout and [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [3, 6, 9]


def test_a_bpe_run_loads_back_with_its_own_tokenizer(tmp_path, corpus):
    out = tmp_path / "bpe"
    assert main(["pretrain", "gpt", "--data", str(corpus), "--out", str(out), "--tokenizer", "bpe", "--vocab-size",
                 "280", *TINY]) == 0
    model, tokenizer, _ = load_run(out)
    assert len(tokenizer) == 280 and model.config.vocab_size == 280
    assert sample_text(model, tokenizer, "To be", 5, temperature=0).startswith("To be")


@pytest.mark.parametrize("contents, message", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"\x00\x01\x02binary", "binary"),
    (b"tiny", "fewer than block_size + 1"),
])
def test_a_bad_corpus_is_one_clear_line_and_nothing_is_written(tmp_path, capsys, contents, message):
    path = tmp_path / "corpus.txt"
    if contents is not None:
        path.write_bytes(contents)
    out = tmp_path / "run"
    assert main(["pretrain", "gpt", "--data", str(path), "--out", str(out), *TINY]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and error.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--n-embd", "30", "--n-head", "4"], "must be divisible by --n-head"),
    (["--block-size", "0"], "--block-size must be at least 1"),
    (["--resume", "--overwrite"], "contradict"),
    (["--tokenizer", "bpe", "--vocab-size", "100"], "at least 257"),
])
def test_an_impossible_config_is_a_usage_error(tmp_path, capsys, corpus, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "gpt", "--data", str(corpus), "--out", str(tmp_path / "run"), *TINY, *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_generate_refuses_what_it_cannot_read_or_encode(tmp_path, capsys, corpus):
    assert main(["generate", "--ckpt", str(tmp_path / "missing")]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["pretrain", "gpt", "--data", str(corpus), "--out", str(out), *TINY, "--sample-tokens", "0"]) == 0
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(out), "--prompt", "ZZZ", "--device", "cpu"]) == 2
    assert "the prompt cannot be encoded" in capsys.readouterr().err


def test_help_lists_the_fixed_flag_names(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "gpt", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--data", "--tokenizer", "--n-layer", "--n-head", "--n-embd", "--block-size", "--batch-size",
                 "--max-iters", "--dropout", "--out", "--resume", "--overwrite"):
        assert flag in help_text, flag
