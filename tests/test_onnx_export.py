"""ONNX export (minillm.onnx_export) and ``python -m minillm export``, checked against onnxruntime.

Each model is exported once, by the command, in a module fixture (an export takes seconds): a GPT run and a
LoRA BERT classifier run (tests/tiny_runs.py), their weights scrambled first. The graphs are then run by
onnxruntime at batch sizes and lengths other than the export example's (2, 8), which only dynamic axes allow,
and must give PyTorch's logits within ``onnx_export.RELATIVE_TOLERANCE`` x max(1, max |logit|) = 1e-4 of the
largest logit: float32 sums in another order differ by ~1e-6 of it (the module docstring's measurements), a
real mistake by a percent or more.
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib

import pytest
import torch
from tiny_runs import tiny_classifier_run, tiny_gpt_run

from minillm import MinillmError, onnx_export, runs
from minillm.__main__ import main
from minillm.bert import BertConfig
from minillm.checkpoint import save_weights
from minillm.gpt import GPT, GPTConfig, load_gpt2
from minillm.inference_runs import load_for_inference

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

GPT_SIZES = dict(block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0)


def scramble_run(folder: pathlib.Path, model: torch.nn.Module, seed: int) -> pathlib.Path:
    """Draw every weight of the run with std 0.3 and save it: at the 0.02 init attention is nearly uniform and the
    logits nearly constant, so a lost mask or a shifted position would change them too little to see."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    save_weights(folder / runs.BEST_MODEL, model)
    return folder


def export(run: pathlib.Path, *args: str) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", "--run", str(run), *args]) == 0
    return printed.getvalue()


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    """A GPT run exported to ONNX by the command: (run folder, what the command printed)."""
    run = scramble_run(*tiny_gpt_run(tmp_path_factory.mktemp("export") / "gpt", **GPT_SIZES), seed=0)
    return run, export(run, "--format", "onnx")


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """A LoRA BERT classifier run (mean pooling, 32 positions) exported to ONNX by the command."""
    run = scramble_run(*tiny_classifier_run(tmp_path_factory.mktemp("export") / "classifier", "lora"), seed=1)
    return run, export(run, "--format", "onnx")


# ---------------------------------------------------------------------------------------------
# The graphs: dynamic axes, PyTorch's logits
# ---------------------------------------------------------------------------------------------


def test_the_gpt_graph_gives_pytorchs_logits_at_batch_sizes_and_lengths_it_was_not_exported_with(gpt_run):
    run, _ = gpt_run
    model = load_for_inference(run).model
    session = onnx_export.onnx_session(run / "onnx" / "model.onnx")
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("input_ids", ["batch", "sequence"])]
    checks = onnx_export.verify_onnx(model, run / "onnx" / "model.onnx", [(1, 1), (5, 7), (2, 16), (7, 3)])
    assert [(c.batch, c.length) for c in checks] == [(1, 1), (5, 7), (2, 16), (7, 3)]
    assert all(check.ok for check in checks), checks


def test_the_classifier_graph_gives_the_unmerged_lora_models_logits_with_padding_at_other_shapes(classifier_run):
    """The command merged LoRA into the weights before exporting: W0 x + (alpha/r) B A x and (W0 + (alpha/r) B A) x
    are the same function, up to float32 reassociation, so the graph matches the run's model as loaded."""
    run, _ = classifier_run
    model = load_for_inference(run).model
    session = onnx_export.onnx_session(run / "onnx" / "model.onnx")
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("input_ids", ["batch", "sequence"]),
                                                                 ("attention_mask", ["batch", "sequence"])]
    assert [o.shape for o in session.get_outputs()] == [["batch", 2]]
    checks = onnx_export.verify_onnx(model, run / "onnx" / "model.onnx", [(1, 32), (6, 4), (3, 9)])
    assert all(check.ok for check in checks), checks


def test_the_classifier_graph_reads_the_attention_mask(classifier_run):
    """Padding ids change nothing, the mask does: the mask is an input of the graph, not a constant."""
    run, _ = classifier_run
    model = load_for_inference(run).model
    session = onnx_export.onnx_session(run / "onnx" / "model.onnx")
    inputs = onnx_export.example_inputs(model, 4, 10, seed=5)  # rows hold 10, 9, 8, 7 tokens
    logits = onnx_export.onnx_logits(session, inputs)  # (4, 2)
    other_padding = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, 7)
    same = onnx_export.onnx_logits(session, {**inputs, "input_ids": other_padding})
    torch.testing.assert_close(same, logits, rtol=0, atol=1e-5)  # 1e-5: float32 sums over other values
    unmasked = onnx_export.onnx_logits(session, {**inputs, "input_ids": other_padding,
                                                 "attention_mask": torch.ones_like(inputs["attention_mask"])})
    assert (unmasked[1:] - logits[1:]).abs().max() > 1e-2  # the padded rows now read the 7s
    torch.testing.assert_close(unmasked[0], logits[0], rtol=0, atol=1e-5)  # row 0 had no padding


def test_the_check_sees_a_model_that_is_not_the_exported_one(gpt_run):
    """The tolerance is not so loose that it passes another model: one weight moved by 0.5 is caught."""
    run, _ = gpt_run
    model = load_for_inference(run).model
    with torch.no_grad():
        model.blocks[0].mlp.c_fc.weight[0, 0] += 0.5
    checks = onnx_export.verify_onnx(model, run / "onnx" / "model.onnx", [(3, 16)])
    assert not checks[0].ok, checks


def test_export_refuses_example_shapes_fixed_in_the_graph_other_precisions_and_other_models(tmp_path):
    model = GPT(GPTConfig(vocab_size=10, **GPT_SIZES))
    for batch, length in [(1, 8), (2, 1), (2, 17)]:
        with pytest.raises(MinillmError, match=r"export needs batch ≥ 2 and 2 ≤ length ≤ 16"):
            onnx_export.onnx_bytes(model, {"input_ids": torch.zeros(batch, length, dtype=torch.long)})
    with pytest.raises(MinillmError, match=r"torch.bfloat16 weights; export a float32 model \(model.float\(\)\)"):
        onnx_export.onnx_bytes(model.to(torch.bfloat16))
    with pytest.raises(MinillmError, match="ONNX export takes a GPT language model or a BERT / GPT sequence classifier"):
        onnx_export.export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")


def test_a_graph_that_fails_the_check_is_not_written_and_the_old_file_stays(tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"the earlier export")
    monkeypatch.setattr(onnx_export, "onnx_bytes", lambda *args: b"a wrong graph")
    monkeypatch.setattr(onnx_export, "verify_onnx", lambda *args: [onnx_export.OnnxCheck(2, 3, 0.5, 1e-4)])
    with pytest.raises(MinillmError, match=r"not PyTorch's \(batch 2, length 3: .* over the tolerance\); .* was not written"):
        onnx_export.export_onnx(GPT(GPTConfig(vocab_size=10, **GPT_SIZES)), path)
    assert path.read_bytes() == b"the earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temp file left


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def test_the_command_writes_the_checked_model_and_the_runs_tokenizer(gpt_run, classifier_run):
    for run, printed in (gpt_run, classifier_run):
        out = run / "onnx"
        assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "tokenizer.json"]
        assert (out / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
        assert f"wrote {out / 'model.onnx'}" in printed
        assert printed.count(" ok\n") == len(onnx_export.CHECK_SHAPES)  # one line per checked shape
    assert "batch 4, length 16: max |onnx - torch|" in gpt_run[1]  # length None in CHECK_SHAPES: the context
    assert "LoRA: the low-rank updates are merged" in classifier_run[1]


def test_the_command_writes_a_hugging_face_gpt2_folder_with_the_same_weights(gpt_run, tmp_path):
    run, _ = gpt_run
    printed = export(run, "--format", "hf", "--out", str(tmp_path / "hf"))
    assert "load it with transformers.GPT2LMHeadModel.from_pretrained" in printed
    model, reloaded = load_for_inference(run).model, load_gpt2(tmp_path / "hf").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    assert torch.equal(reloaded(ids)[0], model(ids)[0])  # the same numbers moved between files: bit-identical


def test_a_mean_pooling_classifier_goes_to_hugging_face_as_its_encoder_and_says_so(classifier_run, tmp_path):
    run, _ = classifier_run
    printed = export(run, "--format", "hf", "--out", str(tmp_path / "hf"))
    assert "encoder was written as a BertModel" in printed
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["BertModel"]


@pytest.mark.parametrize("method, part", [("adapters", "adapters"), ("prompt", "a soft prompt")])
def test_a_classifier_with_adapters_or_a_soft_prompt_goes_to_onnx_only(tmp_path, capsys, method, part):
    run, _ = tiny_classifier_run(tmp_path / method, method)
    assert main(["export", "--run", str(run), "--format", "hf"]) == 2
    assert f"the classifier has {part}, which transformers' BertForSequenceClassification has no place for: " \
           "export it with --format onnx" in capsys.readouterr().err


def test_existing_output_is_refused_and_kept_unless_overwrite(gpt_run, tmp_path, capsys):
    run, _ = gpt_run
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier export")
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(out)]) == 2
    assert "already holds model.safetensors: pass --overwrite to replace it" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == b"an earlier export"
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(out), "--overwrite"]) == 0
    assert load_gpt2(out).config.n_layer == 1


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a run folder"),
    ("not-a-run", "has no config.json: is it a minillm run folder?"),
    ("bert-to-onnx", "holds a 'bert' model; --format onnx exports gpt and bert-classifier runs (fine-tune"),
    ("into-the-run", "is the run folder itself"),
    ("out-is-a-file", "is a file, not a folder"),
])
def test_bad_runs_and_outputs_are_one_sentence_errors(gpt_run, tmp_path, capsys, case, message):
    run, _ = gpt_run
    args = {"missing": ["--run", str(tmp_path / "nowhere")],
            "not-a-run": ["--run", str(tmp_path)],
            "into-the-run": ["--run", str(run), "--out", str(run), "--format", "hf"],
            "out-is-a-file": ["--run", str(run), "--out", str(run / "tokenizer.json")]}.get(case)
    if case == "bert-to-onnx":
        (tmp_path / "bert").mkdir()
        (tmp_path / "bert" / runs.CONFIG).write_text(json.dumps(runs.run_info("bert", BertConfig())))
        args = ["--run", str(tmp_path / "bert")]
    before = sorted(p.name for p in run.iterdir())
    assert main(["export", *args]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and error.count("\n") == 1, error
    assert sorted(p.name for p in run.iterdir()) == before
