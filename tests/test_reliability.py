"""Reliability through the real command line: zero tracebacks, zero silent failures, nothing lost.

Every case runs ``python -m minillm ...`` or a chapter script in a subprocess, as a user would, and checks
the contract of :mod:`minillm.__main__`:

- a user's mistake (a damaged or wrong file, an impossible option) exits with status 2, and stderr ends with
  exactly one line starting ``error: `` that names the file or the option; never a traceback;
- nothing is lost: every file that existed in the folders involved is byte-identical afterwards;
- Ctrl-C (a real SIGINT once training has started) exits with 130, says how to continue (``--resume``),
  keeps the checkpoint, and the same command with ``--resume`` then finishes and writes results.json.

The small runs the cases damage are made once per module (a tiny GPT on 20,000 characters of Tiny Shakespeare,
a tiny BERT on SST-2's phrases) and copied into each test's own folder before they are touched. The
subprocesses run on the CPU in fp32 on one thread: for models this small bf16 autocast is ~10x slower on a
CPU, and one thread keeps a shared 2-core machine usable.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO_ROOT

ENV = {**os.environ, "MINILLM_DEVICE": "cpu", "MINILLM_PRECISION": "fp32", "OMP_NUM_THREADS": "1",
       "PYTHONUNBUFFERED": "1"}
ENV.pop("MINILLM_QUICK", None)  # every command says --quick itself

# The tiny GPT every GPT case starts from (its shape spelled out: --resume must repeat it).
GPT_SHAPE = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4"]
GPT_STEPS = ["--max-iters", "4", "--warmup-iters", "1", "--eval-interval", "2", "--eval-iters", "1",
             "--sample-tokens", "5"]
BERT_ARGS = ["--quick", "--data", "sst2", "--max-iters", "4", "--warmup-iters", "1", "--eval-interval", "2",
             "--eval-iters", "1"]
FINETUNE_FEW_STEPS = ["--quick", "--epochs", "1", "--min-steps", "2"]

MEMORY_LIMIT = 4 << 30  # bytes of address space for a command reading a damaged run: a blow-up fails, not the machine


# ---------------------------------------------------------------------------------------------
# Running commands and checking the contract
# ---------------------------------------------------------------------------------------------


def _child_setup(memory_limit: int | None = None):
    def setup():
        os.umask(0o022)  # what the permission checks assume, whatever the test runner's umask
        if memory_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    return setup


def run(args, timeout: float = 180, memory_limit: int | None = None) -> subprocess.CompletedProcess:
    """``python <args>`` in the repository root (``-m minillm ...`` or ``chapters/chNN_*.py ...``)."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_child_setup(memory_limit))


def minillm(*args, **kwargs) -> subprocess.CompletedProcess:
    return run(["-m", "minillm", *args], **kwargs)


def chapter(script: str, *args, **kwargs) -> subprocess.CompletedProcess:
    return run([f"chapters/{script}", *args], **kwargs)


def _show(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout (end) ---\n{result.stdout[-3000:]}\n--- stderr (end) ---\n{result.stderr[-3000:]}"


def assert_no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stdout + result.stderr, _show(result)


def assert_user_error(result: subprocess.CompletedProcess, *keywords: str) -> str:
    """Exit 2, no traceback, stderr's last line is the one ``error: `` line, naming each of ``keywords``
    (case-insensitive). Returns that line."""
    assert_no_traceback(result)
    assert result.returncode == 2, _show(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, _show(result)
    assert lines[-1].startswith("error: "), _show(result)
    assert sum(line.startswith("error: ") for line in lines) == 1, _show(result)
    for keyword in keywords:
        assert keyword.lower() in lines[-1].lower(), f"the error line does not name {keyword!r}\n{_show(result)}"
    return lines[-1]


def assert_success(result: subprocess.CompletedProcess) -> None:
    assert_no_traceback(result)
    assert result.returncode == 0, _show(result)


def checksums(*folders: pathlib.Path) -> dict[str, str]:
    """sha256 of every file under ``folders`` (path -> digest), to compare before and after a command."""
    sums = {}
    for folder in folders:
        folder = pathlib.Path(folder)
        if folder.is_file():
            sums[str(folder)] = hashlib.sha256(folder.read_bytes()).hexdigest()
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                sums[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return sums


def assert_unchanged(before: dict[str, str], *folders: pathlib.Path) -> None:
    after = checksums(*folders)
    lost = sorted(path for path in before if path not in after)
    changed = sorted(path for path in before if path in after and after[path] != before[path])
    assert not lost and not changed, f"files lost: {lost}; files changed: {changed}"


# ---------------------------------------------------------------------------------------------
# The runs every case starts from: made once, copied before they are damaged
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> pathlib.Path:
    """The first 20,000 characters of Tiny Shakespeare: enough text for a GPT with context 32."""
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text((REPO_ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return path


def gpt_args(small_text: pathlib.Path, out: pathlib.Path, *extra: str) -> list[str]:
    """``pretrain gpt`` of the tiny GPT into ``out``; ``extra`` options come last (they win)."""
    return ["pretrain", "gpt", "--quick", "--data", str(small_text), *GPT_SHAPE, *GPT_STEPS, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory, small_text) -> pathlib.Path:
    out = tmp_path_factory.mktemp("runs") / "gpt"
    assert_success(minillm(*gpt_args(small_text, out)))
    assert (out / "results.json").is_file() and (out / "checkpoint.safetensors").is_file()
    return out


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("runs") / "bert"
    assert_success(minillm("pretrain", "bert", *BERT_ARGS, "--out", out))
    assert (out / "results.json").is_file() and (out / "model.safetensors").is_file()
    return out


def copy_run(run_folder: pathlib.Path, tmp_path: pathlib.Path, name: str | None = None) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(run_folder, tmp_path / (name or run_folder.name)))


# ---------------------------------------------------------------------------------------------
# Damaged run folders
# ---------------------------------------------------------------------------------------------


def _edit_config(folder: pathlib.Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    edit(config)
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def _set_model_field(name, value):
    return lambda folder: _edit_config(folder, lambda config: config["model"].__setitem__(name, value))


def nan_weights(folder: pathlib.Path) -> None:
    """One tensor of the model (the token embeddings, which every forward reads) set to NaN, in
    model.safetensors and in checkpoint.safetensors, their metadata kept: weights a diverged run could save."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    for name in ("model.safetensors", "checkpoint.safetensors"):
        path = folder / name
        if not path.exists():
            continue
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        targets = [key for key in tensors if key.removeprefix("model/") in ("wte.weight", "transformer.wte.weight",
                                                                            "bert.embeddings.word_embeddings.weight")]
        if not targets:  # another layout: the model's largest floating-point tensor
            model_keys = [k for k in tensors if tensors[k].is_floating_point() and not k.startswith(("optim", "rng"))]
            targets = [max(model_keys, key=lambda k: tensors[k].numel())]
        for key in targets:
            tensors[key] = torch.full_like(tensors[key], float("nan"))
        save_file(tensors, str(path), metadata=metadata)


DAMAGES = {
    "config_json_that_is_not_json": lambda folder: (folder / "config.json").write_text('{"model": {"type": ', encoding="utf-8"),
    "config_json_that_is_a_json_list": lambda folder: (folder / "config.json").write_text("[1, 2, 3]\n", encoding="utf-8"),
    "config_json_with_a_word_for_n_layer": _set_model_field("n_layer", "two"),
    "config_json_asking_for_a_billion_wide_model": _set_model_field("n_embd", 1_000_000_000),
    "tokenizer_json_that_is_a_json_list": lambda folder: (folder / "tokenizer.json").write_text("[1, 2, 3]\n", encoding="utf-8"),
    "weights_with_nan": nan_weights,
}
# What the one error line must name, for each damage
DAMAGE_KEYWORDS = {
    "config_json_that_is_not_json": ["config.json"],
    "config_json_that_is_a_json_list": ["config.json"],
    "config_json_with_a_word_for_n_layer": ["config.json", "n_layer"],
    "config_json_asking_for_a_billion_wide_model": ["config.json"],
    "tokenizer_json_that_is_a_json_list": ["tokenizer.json"],
    "weights_with_nan": ["nan"],
}


def _damage_cases(names):
    return [pytest.param(name, id=name) for name in names]


@pytest.mark.parametrize("damage", _damage_cases([d for d in DAMAGES if d != "weights_with_nan"]))
def test_generate_from_a_damaged_gpt_run_is_one_clear_error_and_changes_nothing(damage, gpt_run, tmp_path):
    run_folder = copy_run(gpt_run, tmp_path)
    DAMAGES[damage](run_folder)
    before = checksums(run_folder)
    start = time.monotonic()
    result = minillm("generate", "--ckpt", run_folder, "--max-new-tokens", "5", timeout=120, memory_limit=MEMORY_LIMIT)
    seconds = time.monotonic() - start
    assert_user_error(result, *DAMAGE_KEYWORDS[damage])
    assert seconds < 30, f"took {seconds:.0f} s: a damaged config.json must be refused before the model is built"
    assert_unchanged(before, run_folder)


@pytest.mark.parametrize("decoding", [pytest.param(["--temperature", "0"], id="greedy"),
                                      pytest.param(["--temperature", "0.8"], id="sampling")])
def test_generate_from_nan_weights_is_one_clear_error_naming_nan(decoding, gpt_run, tmp_path):
    run_folder = copy_run(gpt_run, tmp_path)
    nan_weights(run_folder)
    before = checksums(run_folder)
    result = minillm("generate", "--ckpt", run_folder, "--max-new-tokens", "5", *decoding, timeout=120,
                     memory_limit=MEMORY_LIMIT)
    assert_user_error(result, "nan")
    assert_unchanged(before, run_folder)


@pytest.mark.parametrize("damage", _damage_cases(DAMAGES))
def test_finetune_from_a_damaged_bert_run_is_one_clear_error_and_changes_nothing(damage, bert_run, tmp_path):
    run_folder = copy_run(bert_run, tmp_path)
    DAMAGES[damage](run_folder)
    before = checksums(run_folder)
    start = time.monotonic()
    result = minillm("finetune", *FINETUNE_FEW_STEPS, "--init", run_folder, "--out", tmp_path / "finetuned",
                     timeout=180, memory_limit=MEMORY_LIMIT)
    seconds = time.monotonic() - start
    line = assert_user_error(result, *DAMAGE_KEYWORDS[damage])
    assert "lower --lr" not in line, line  # damaged weights are not a learning rate to tune
    if damage == "config_json_asking_for_a_billion_wide_model":
        assert seconds < 30, f"took {seconds:.0f} s: a damaged config.json must be refused before the model is built"
    assert_unchanged(before, run_folder)


def test_resume_from_a_checkpoint_with_nan_weights_says_the_weights_are_damaged(gpt_run, small_text, tmp_path):
    run_folder = copy_run(gpt_run, tmp_path)
    nan_weights(run_folder)
    before = checksums(run_folder)
    result = minillm(*gpt_args(small_text, run_folder, "--max-iters", "8", "--resume"), timeout=180)
    line = assert_user_error(result)
    assert re.search(r"\bnan\b|damaged", line, re.IGNORECASE), line
    assert "lower --lr" not in line, f"NaN weights read from a file are not a learning rate to tune: {line}"
    assert_unchanged(before, run_folder)


def test_generate_with_the_tokenizer_of_another_kind_of_run_is_one_clear_error(gpt_run, bert_run, tmp_path):
    """A GPT run whose tokenizer.json is a BERT run's (a WordPiece file): refused, not a TypeError."""
    run_folder = copy_run(gpt_run, tmp_path)
    shutil.copyfile(bert_run / "tokenizer.json", run_folder / "tokenizer.json")
    before = checksums(run_folder)
    result = minillm("generate", "--ckpt", run_folder, "--max-new-tokens", "3", "--prompt", "the movie was great",
                     timeout=120, memory_limit=MEMORY_LIMIT)
    assert_user_error(result, "tokenizer.json")
    assert_unchanged(before, run_folder)


def test_finetune_from_a_bert_run_holding_a_character_tokenizer_is_one_clear_error(gpt_run, bert_run, tmp_path):
    """A BERT run whose tokenizer.json is a GPT run's (minillm's character tokenizer): refused, not an AttributeError."""
    run_folder = copy_run(bert_run, tmp_path)
    shutil.copyfile(gpt_run / "tokenizer.json", run_folder / "tokenizer.json")
    before = checksums(run_folder)
    result = minillm("finetune", *FINETUNE_FEW_STEPS, "--init", run_folder, "--out", tmp_path / "finetuned",
                     timeout=180, memory_limit=MEMORY_LIMIT)
    assert_user_error(result, "tokenizer.json")
    assert_unchanged(before, run_folder)


def test_generate_with_a_tokenizer_larger_than_the_model_is_one_clear_error(gpt_run, tmp_path):
    """A character tokenizer with ids past the model's vocabulary: refused on loading, not an IndexError mid-forward."""
    run_folder = copy_run(gpt_run, tmp_path)
    path = run_folder / "tokenizer.json"
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    tokenizer["chars"] = tokenizer["chars"] + [chr(code) for code in range(0x100, 0x140)]
    path.write_text(json.dumps(tokenizer, indent=2), encoding="utf-8")
    before = checksums(run_folder)
    result = minillm("generate", "--ckpt", run_folder, "--max-new-tokens", "3", "--prompt", "\u0130", timeout=120,
                     memory_limit=MEMORY_LIMIT)
    assert_user_error(result, "tokenizer.json")
    assert_unchanged(before, run_folder)


# ---------------------------------------------------------------------------------------------
# Runs that must finish
# ---------------------------------------------------------------------------------------------


def test_bert_pretraining_with_batch_size_one_finishes(tmp_path):
    """A batch of one pair may have no masked token: the masked-LM loss must still be defined (not NaN).
    At --mlm-probability 0.02 about half of the 20 one-pair batches of --quick mask nothing (at BERT's 0.15
    about one in a hundred does), so the run meets such batches, in training and in evaluation."""
    out = tmp_path / "bert"
    result = minillm("pretrain", "bert", "--quick", "--batch-size", "1", "--mlm-probability", "0.02", "--out", out,
                     timeout=300)
    assert_success(result)
    assert "diverged" not in result.stdout + result.stderr
    assert (out / "results.json").is_file()


def test_the_same_bert_pretraining_command_twice_gives_the_same_tokenizer_file_and_losses(bert_run, tmp_path):
    """Reproducible from --seed, tokenizer included: the WordPiece trainer used to number tokens in the order of
    a hash map that every process seeds afresh. The second run is another process with another PYTHONHASHSEED."""
    again = tmp_path / "again"
    result = subprocess.run([sys.executable, "-m", "minillm", "pretrain", "bert", *BERT_ARGS, "--out", str(again)],
                            cwd=REPO_ROOT, env={**ENV, "PYTHONHASHSEED": "12345"}, capture_output=True, text=True,
                            timeout=300)
    assert_success(result)
    assert (again / "tokenizer.json").read_bytes() == (bert_run / "tokenizer.json").read_bytes()
    assert logged_losses(again) == logged_losses(bert_run) and len(logged_losses(again)) == 2


def logged_losses(run_folder: pathlib.Path) -> list[tuple]:
    entries = map(json.loads, (run_folder / "log.jsonl").read_text(encoding="utf-8").splitlines())
    return [(entry["step"], entry["train_loss"], entry["val_loss"]) for entry in entries]


# ---------------------------------------------------------------------------------------------
# Chapter scripts never replace a run by accident
# ---------------------------------------------------------------------------------------------


def _chapter_06_args(small_text, out, *extra):
    return ["--quick", "--data", small_text, *GPT_SHAPE, *GPT_STEPS, "--kv-tokens", "4", "--out", out, *extra]


@pytest.mark.parametrize("flags", [pytest.param([], id="no_flag"), pytest.param(["--no-overwrite"], id="no_overwrite"),
                                   pytest.param(["--overwrite"], id="overwrite")])
def test_chapter_06_never_replaces_a_run_of_another_kind(flags, bert_run, small_text, tmp_path):
    run_folder = copy_run(bert_run, tmp_path)
    before = checksums(run_folder)
    result = chapter("ch06_gpt.py", *_chapter_06_args(small_text, run_folder, *flags), timeout=180)
    assert_user_error(result, str(run_folder))
    assert_unchanged(before, run_folder)


@pytest.mark.parametrize("flags", [pytest.param([], id="no_flag"), pytest.param(["--no-overwrite"], id="no_overwrite")])
def test_chapter_06_keeps_a_gpt_run_unless_told_to_overwrite(flags, gpt_run, small_text, tmp_path):
    run_folder = copy_run(gpt_run, tmp_path)
    before = checksums(run_folder)
    result = chapter("ch06_gpt.py", *_chapter_06_args(small_text, run_folder, *flags), timeout=180)
    line = assert_user_error(result, str(run_folder))
    assert "--overwrite" in line or "--resume" in line, line  # it says how to go on
    assert_unchanged(before, run_folder)


@pytest.mark.parametrize("flags", [pytest.param([], id="no_flag"), pytest.param(["--overwrite"], id="overwrite")])
def test_chapter_07_never_replaces_a_run_of_another_kind(flags, gpt_run, tmp_path):
    run_folder = copy_run(gpt_run, tmp_path)
    before = checksums(run_folder)
    result = chapter("ch07_bert.py", *BERT_ARGS, "--out", run_folder, *flags, timeout=180)
    assert_user_error(result, str(run_folder))
    assert_unchanged(before, run_folder)


def test_chapter_10_never_replaces_a_run_of_another_kind_even_with_overwrite(gpt_run, tmp_path):
    run_folder = copy_run(gpt_run, tmp_path)
    before = checksums(run_folder)
    result = chapter("ch10_contrastive.py", "--quick", "--max-iters", "2", "--out", run_folder, "--overwrite", timeout=300)
    assert_user_error(result, str(run_folder))
    assert_unchanged(before, run_folder)


def test_chapter_08_never_writes_its_results_over_a_run_of_another_kind(gpt_run, bert_run, tmp_path):
    """Chapter 08's --out holds its fine-tuning runs and its own results.json: a GPT run folder is not one."""
    run_folder = copy_run(gpt_run, tmp_path)
    before = checksums(run_folder, bert_run)
    result = chapter("ch08_finetune.py", "--quick", "--out", run_folder, "--bert", bert_run, "--families", "bert",
                     "--tasks", "sst2", "--budgets", "100", "--seeds", "1", timeout=600)
    assert_user_error(result, str(run_folder))
    assert_unchanged(before, run_folder, bert_run)


# ---------------------------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------------------------


def interrupt_once_training(args, settle: float = 0.5, start_timeout: float = 180, stop_timeout: float = 30):
    """Run ``python -u <args>``, wait for its "training on" line, let it train ``settle`` seconds, press
    Ctrl-C (a real SIGINT); returns ``(CompletedProcess, seconds it took to stop)``."""
    process = subprocess.Popen([sys.executable, "-u", *map(str, args)], cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=_child_setup())
    stdout, stderr, training = [], [], threading.Event()

    def read_stdout():
        for line in process.stdout:
            stdout.append(line)
            if "training on" in line:
                training.set()
        training.set()  # the end of the output: training will not start now

    readers = [threading.Thread(target=read_stdout, daemon=True),
               threading.Thread(target=lambda: stderr.append(process.stderr.read()), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        assert training.wait(start_timeout), "no 'training on' line within the time limit"
        time.sleep(settle)
        still_training = process.poll() is None
        process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        try:
            returncode = process.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {stop_timeout:.0f} s after Ctrl-C")
        stopped_in = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for reader in readers:
            reader.join(10)
    result = subprocess.CompletedProcess(process.args, returncode, "".join(stdout), "".join(stderr))
    assert still_training, f"the command ended before Ctrl-C could be pressed (make it train longer)\n{_show(result)}"
    return result, stopped_in


def assert_interrupted_then_resumes(result: subprocess.CompletedProcess, out: pathlib.Path, resume_args) -> None:
    assert_no_traceback(result)
    assert result.returncode == 130, _show(result)
    assert "--resume" in result.stderr, _show(result)
    assert (out / "checkpoint.safetensors").is_file(), _show(result)
    assert not (out / "results.json").exists(), "an interrupted run must not look finished"
    resumed = run(resume_args, timeout=300)
    assert_success(resumed)
    assert (out / "results.json").is_file(), _show(resumed)


def test_ctrl_c_during_gpt_pretraining_exits_130_and_resumes(small_text, tmp_path):
    out = tmp_path / "gpt"
    args = ["-m", "minillm", *gpt_args(small_text, out, "--max-iters", "1500", "--eval-interval", "500")]
    result, _ = interrupt_once_training(args)
    assert_interrupted_then_resumes(result, out, [*args, "--resume"])


def test_ctrl_c_during_finetuning_exits_130_without_reading_missing_results_and_resumes(bert_run, tmp_path):
    out = tmp_path / "finetuned"
    before = checksums(bert_run)
    args = ["-m", "minillm", "finetune", "--quick", "--min-steps", "400", "--init", bert_run, "--out", out]
    result, _ = interrupt_once_training(args)
    assert_interrupted_then_resumes(result, out, [*args, "--resume"])
    assert "test" in json.loads((out / "results.json").read_text(encoding="utf-8"))  # the report split's scores
    assert_unchanged(before, bert_run)


def test_ctrl_c_during_chapter_06_exits_130_and_resumes(small_text, tmp_path):
    out = tmp_path / "ch06"
    args = ["chapters/ch06_gpt.py", *_chapter_06_args(small_text, out, "--max-iters", "1500", "--eval-interval", "500")]
    result, _ = interrupt_once_training(args)
    assert_interrupted_then_resumes(result, out, [*args, "--resume"])


# ---------------------------------------------------------------------------------------------
# Where runs are written
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["pretrain_gpt", "finetune"])
def test_out_under_a_regular_file_is_one_clear_error(command, small_text, bert_run, tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("not a folder\n", encoding="utf-8")
    out = a_file / "run"
    before = checksums(tmp_path)
    if command == "pretrain_gpt":
        result = minillm(*gpt_args(small_text, out))
    else:
        result = minillm("finetune", *FINETUNE_FEW_STEPS, "--init", bert_run, "--out", out)
    assert_user_error(result, str(out))
    assert_unchanged(before, tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions: a read-only folder is writable to it")
def test_out_in_a_folder_without_write_permission_is_one_clear_error(small_text, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = minillm(*gpt_args(small_text, locked / "run"))
        assert_user_error(result, str(locked))
    finally:
        locked.chmod(0o700)
    assert not (locked / "run").exists()


def test_a_folder_this_process_may_not_write_in_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """The same check in-process, where it can run as root too: os.access says no write permission."""
    from minillm import MinillmError, runs

    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: pathlib.Path(path) != locked)
    with pytest.raises(MinillmError, match=f"no permission to write in {re.escape(str(locked))}"):
        runs.check_run_folder(locked / "run", resume=False, overwrite=False)
    runs.check_run_folder(tmp_path / "elsewhere" / "run", resume=False, overwrite=False)  # writable: accepted


def test_files_written_atomically_are_readable_by_others(gpt_run, bert_run):
    """Under umask 022 a run's files are rw-r--r--, as an ordinary write makes them (mkstemp alone gives rw-------)."""
    for folder in (gpt_run, bert_run):
        for name in ("config.json", "model.safetensors", "checkpoint.safetensors", "tokenizer.json", "results.json"):
            mode = (folder / name).stat().st_mode & 0o777
            assert mode == 0o644, f"{folder / name} has mode {oct(mode)}, not 0o644"


def test_a_resume_that_fails_leaves_the_run_unchanged(gpt_run, small_text, tmp_path):
    """--resume with another shape than the run's is refused, and config.json (every file) stays as it was."""
    run_folder = copy_run(gpt_run, tmp_path)
    before = checksums(run_folder)
    result = minillm(*gpt_args(small_text, run_folder, "--n-layer", "3", "--max-iters", "8", "--resume"))
    assert_user_error(result, str(run_folder))
    assert_unchanged(before, run_folder)


def test_overwrite_removes_a_temp_file_left_by_a_killed_save(gpt_run, small_text, tmp_path):
    """A save killed mid-write leaves ``.checkpoint.safetensors.<random>.tmp`` (minillm.files); --overwrite clears it."""
    run_folder = copy_run(gpt_run, tmp_path)
    stray = run_folder / ".checkpoint.safetensors.k1ll3d_.tmp"
    stray.write_bytes((run_folder / "checkpoint.safetensors").read_bytes()[:1000])
    result = minillm(*gpt_args(small_text, run_folder, "--overwrite"))
    assert_success(result)
    assert not stray.exists(), f"--overwrite left {stray.name}"
    assert (run_folder / "results.json").is_file()


@pytest.mark.parametrize("mistake", ["empty_data_file", "block_size_longer_than_the_text"])
def test_a_fresh_run_that_fails_early_leaves_nothing_that_blocks_the_corrected_command(mistake, small_text, tmp_path):
    out = tmp_path / "new_run"
    if mistake == "empty_data_file":
        empty = tmp_path / "empty.txt"
        empty.write_text("", encoding="utf-8")
        first = minillm("pretrain", "gpt", "--quick", "--data", empty, *GPT_SHAPE, *GPT_STEPS, "--out", out)
        assert_user_error(first, str(empty))
    else:
        first = minillm(*gpt_args(small_text, out, "--block-size", "100000"))
        assert_user_error(first, "--block-size")
    corrected = minillm(*gpt_args(small_text, out))  # the same --out, no --overwrite
    assert_success(corrected)
    assert (out / "results.json").is_file()


def test_a_fresh_chapter_run_that_fails_early_leaves_nothing_that_blocks_the_corrected_command(small_text, tmp_path):
    out = tmp_path / "ch06"
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    assert_user_error(chapter("ch06_gpt.py", *_chapter_06_args(empty, out)), str(empty))
    assert_success(chapter("ch06_gpt.py", *_chapter_06_args(small_text, out)))
    assert (out / "results.json").is_file()


# ---------------------------------------------------------------------------------------------
# Fine-tuning data a classifier cannot learn from
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("selection", [pytest.param(["--sst2-limit", "3"], id="first_3_phrases_all_positive"),
                                       pytest.param(["--labelled", "1"], id="one_labelled_example")])
def test_a_training_set_of_one_class_is_refused_or_warned_about(selection, bert_run, tmp_path):
    """A training set whose labels are all one class: a clear error, or at least a warning on stderr,
    never a classifier silently trained to the majority class."""
    result = minillm("finetune", *FINETUNE_FEW_STEPS, "--init", bert_run, "--out", tmp_path / "finetuned", *selection)
    assert_no_traceback(result)
    if result.returncode == 2:
        assert_user_error(result, "class")
    else:
        assert result.returncode == 0, _show(result)
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
        assert any("class" in line or "label" in line for line in warnings), _show(result)


def test_an_aclimdb_folder_without_reviews_is_one_clear_error(bert_run, tmp_path):
    """The one way to fine-tune on data of one's own (--data imdb --imdb-folder): a folder laid out right
    but holding no reviews is refused, naming the folder."""
    root = tmp_path / "aclImdb"
    for split in ("train", "test"):
        for label in ("neg", "pos"):
            (root / split / label).mkdir(parents=True)
    result = minillm("finetune", *FINETUNE_FEW_STEPS, "--init", bert_run, "--out", tmp_path / "finetuned",
                     "--data", "imdb", "--imdb-folder", root)
    assert_user_error(result, str(root))


# ---------------------------------------------------------------------------------------------
# Other mistakes users make
# ---------------------------------------------------------------------------------------------


def test_a_missing_data_file_is_one_clear_error(tmp_path):
    missing = tmp_path / "no_such_file.txt"
    result = minillm("pretrain", "gpt", "--quick", "--data", missing, "--out", tmp_path / "run")
    assert_user_error(result, str(missing))
    assert not (tmp_path / "run").exists()


def test_generate_from_a_text_file_instead_of_a_run_is_one_clear_error(small_text):
    assert_user_error(minillm("generate", "--ckpt", small_text, "--max-new-tokens", "3"), str(small_text))


def test_generate_from_a_bert_run_is_one_clear_error(bert_run):
    assert_user_error(minillm("generate", "--ckpt", bert_run, "--max-new-tokens", "3"), str(bert_run))


def test_finetune_from_a_gpt_run_is_one_clear_error(gpt_run, tmp_path):
    result = minillm("finetune", *FINETUNE_FEW_STEPS, "--init", gpt_run, "--out", tmp_path / "finetuned")
    assert_user_error(result, str(gpt_run))


def test_resume_from_a_truncated_checkpoint_is_one_clear_error(gpt_run, small_text, tmp_path):
    run_folder = copy_run(gpt_run, tmp_path)
    checkpoint = run_folder / "checkpoint.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    before = checksums(run_folder)
    result = minillm(*gpt_args(small_text, run_folder, "--max-iters", "8", "--resume"))
    assert_user_error(result, "checkpoint.safetensors")
    assert_unchanged(before, run_folder)


def test_generate_with_a_prompt_longer_than_the_context_still_generates(gpt_run, small_text):
    """Not a mistake: a prompt past the context window (32 tokens here) is read through its last window."""
    prompt = small_text.read_text(encoding="utf-8")[:500]
    result = minillm("generate", "--ckpt", gpt_run, "--max-new-tokens", "5", "--prompt", prompt)
    assert_success(result)
