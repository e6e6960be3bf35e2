"""ONNX export (minillm.onnx_export) and ``python -m minillm export``, checked against onnxruntime.

Each model is exported once (an export takes seconds): the GPT through the command, on a run folder made
here, and a BERT classifier through ``export_onnx``. The graphs are then run by onnxruntime at batch sizes
and lengths other than the export example's (2, 8), which only dynamic axes allow, and must give PyTorch's
logits within ``onnx_export.RELATIVE_TOLERANCE`` x max(1, max |logit|) = 1e-4 of the largest logit: float32
sums in another order differ by ~1e-6 of it (module docstring), a real mistake by a percent or more.
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from minillm import MinillmError, onnx_export, runs  # noqa: E402
from minillm.__main__ import main  # noqa: E402
from minillm.bert import BertConfig, BertForSequenceClassification  # noqa: E402
from minillm.checkpoint import save_weights  # noqa: E402
from minillm.gpt import GPT, GPTConfig, load_gpt2  # noqa: E402
from minillm.tokenization import CharTokenizer  # noqa: E402

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
GPT_SIZES = dict(block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0)


def scrambled(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn with std 0.3: at the 0.02 init attention is nearly uniform, and a lost mask or a
    shifted position would change the logits too little to see."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def make_gpt_run(folder: pathlib.Path) -> pathlib.Path:
    """A run folder as 'pretrain gpt' leaves it: config.json, model.safetensors, tokenizer.json."""
    tokenizer = CharTokenizer.train(TEXT)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, **GPT_SIZES)
    torch.manual_seed(0)
    model = scrambled(GPT(config), seed=0)
    folder.mkdir(parents=True)
    (folder / runs.CONFIG).write_text(json.dumps(runs.run_info("gpt", config)))
    save_weights(folder / runs.BEST_MODEL, model)
    tokenizer.save(folder / runs.TOKENIZER)
    return folder


@pytest.fixture(scope="module")
def gpt_export(tmp_path_factory):
    """The command run once on a GPT run: (run folder, its export folder, what it printed)."""
    run = make_gpt_run(tmp_path_factory.mktemp("export") / "gpt")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", "--run", str(run), "--format", "onnx"]) == 0
    return run, run / "onnx", printed.getvalue()


@pytest.fixture(scope="module")
def bert_classifier_export(tmp_path_factory):
    """A scrambled mean-pooling BERT classifier (3 labels) and its export, made once."""
    torch.manual_seed(1)
    config = BertConfig(vocab_size=40, max_len=12, n_layer=1, n_head=2, n_embd=16, d_ff=24, dropout=0.1)
    model = scrambled(BertForSequenceClassification(config, num_labels=3, pooling="mean"), seed=1)
    export = onnx_export.export_onnx(model, tmp_path_factory.mktemp("bert") / "classifier.onnx")
    return model, export


# ---------------------------------------------------------------------------------------------
# The graphs: dynamic axes, same logits as PyTorch
# ---------------------------------------------------------------------------------------------


def test_the_gpt_graph_gives_pytorchs_logits_at_batch_sizes_and_lengths_it_was_not_exported_with(gpt_export):
    run, out, _ = gpt_export
    model = runs.load_run(run).model
    session = onnx_export.onnx_session(out / "model.onnx")
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("input_ids", ["batch", "sequence"])]
    checks = onnx_export.verify_onnx(model, out / "model.onnx", [(1, 1), (5, 7), (2, 16), (7, 3)])
    assert [(c.batch, c.length) for c in checks] == [(1, 1), (5, 7), (2, 16), (7, 3)]
    assert all(check.ok for check in checks), checks


def test_the_classifier_graph_gives_pytorchs_logits_with_padding_at_other_shapes(bert_classifier_export):
    model, export = bert_classifier_export
    assert export.checks and all(check.ok for check in export.checks), export.checks
    checks = onnx_export.verify_onnx(model, export.path, [(1, 12), (6, 4), (3, 9)])
    assert all(check.ok for check in checks), checks
    assert model.training is False  # export_onnx gave the model back in the mode it was in


def test_the_classifier_graph_reads_the_attention_mask(bert_classifier_export):
    """Padding ids change nothing, the mask does: the mask is an input of the graph, not a constant."""
    model, export = bert_classifier_export
    session = onnx_export.onnx_session(export.path)
    inputs = onnx_export.example_inputs(model, 4, 10, seed=5)  # rows hold 10, 9, 8, 7 tokens
    logits = onnx_export.onnx_logits(session, inputs)  # (4, 3)
    other_padding = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, 7)
    same = onnx_export.onnx_logits(session, {**inputs, "input_ids": other_padding})
    torch.testing.assert_close(same, logits, rtol=0, atol=1e-5)  # 1e-5: float32 sums over other values
    unmasked = onnx_export.onnx_logits(session, {**inputs, "input_ids": other_padding,
                                                 "attention_mask": torch.ones_like(inputs["attention_mask"])})
    assert (unmasked[1:] - logits[1:]).abs().max() > 1e-2  # the padded rows now read the 7s
    torch.testing.assert_close(unmasked[0], logits[0], rtol=0, atol=1e-5)  # row 0 had no padding


def test_the_check_sees_a_model_that_is_not_the_exported_one(gpt_export):
    """The tolerance is not so loose that it passes a different model: one weight moved is caught."""
    run, out, _ = gpt_export
    model = runs.load_run(run).model
    with torch.no_grad():
        model.blocks[0].mlp.c_fc.weight[0, 0] += 0.5
    checks = onnx_export.verify_onnx(model, out / "model.onnx", [(3, 16)])
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


def test_the_command_writes_the_checked_model_and_the_runs_tokenizer(gpt_export):
    run, out, printed = gpt_export
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "tokenizer.json"]
    assert (out / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
    assert f"wrote {out / 'model.onnx'}" in printed
    assert printed.count(" ok\n") == len(onnx_export.CHECK_SHAPES)  # one line per checked shape
    assert "batch 4, length 16: max |onnx - torch|" in printed  # None in CHECK_SHAPES: the full context


def test_the_command_writes_a_hugging_face_gpt2_folder_with_the_same_weights(gpt_export, tmp_path, capsys):
    run, _, _ = gpt_export
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "load it with transformers.GPT2LMHeadModel.from_pretrained" in capsys.readouterr().out
    model, reloaded = runs.load_run(run).model, load_gpt2(tmp_path / "hf").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    assert torch.equal(reloaded(ids)[0], model(ids)[0])  # the same numbers moved between files: bit-identical


def test_existing_output_is_refused_and_kept_unless_overwrite(gpt_export, tmp_path, capsys):
    run, _, _ = gpt_export
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
    ("bert-to-onnx", "holds a 'bert' model; --format onnx exports gpt and bert-classifier runs"),
    ("into-the-run", "is the run folder itself"),
    ("out-is-a-file", "is a file, not a folder"),
])
def test_bad_runs_and_outputs_are_one_sentence_errors(gpt_export, tmp_path, capsys, case, message):
    run, _, _ = gpt_export
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
