"""minillm.bench: the FLOP count MFU divides by, and the command on a tiny shape (no timing is asserted)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from minillm.__main__ import main
from minillm.gpt import GPT, GPTConfig
from minillm.nanogpt import ReferenceGPT
from minillm.timing import PEAK_BF16, flops_per_token, peak_flops


def test_flops_per_token_is_six_n_plus_the_attention_term():
    """GPT-2 124M at context 1024 (N = 123.7M without position embeddings, as nanoGPT counts):
    6N + 12·L·H·Q·T = 742M + 113M FLOPs per token (PaLM, appendix B)."""
    config = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    n_params = GPT(config).num_parameters(exclude_embeddings=True)
    assert flops_per_token(config, n_params) == 6 * n_params + 12 * 12 * 12 * 64 * 1024
    assert n_params == 123_689_472 and flops_per_token(config, n_params) == 855_383_040


def test_peak_is_known_only_for_cuda_devices_and_h200_is_not_mistaken_for_h100():
    assert peak_flops(torch.device("cpu")) is None
    names = [name for name, _ in PEAK_BF16]
    assert names.index("H200") < names.index("H100") and names.index("H100 PCIe") < names.index("H100")


def test_the_reference_model_computes_the_same_function_as_gpt_given_the_same_weights():
    """The nanoGPT-style reference is the same model in another layout, so timing them compares implementations."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=False)
    ours, reference = GPT(config).double().eval(), ReferenceGPT(config).double().eval()
    with torch.no_grad():
        reference.wte.weight.copy_(ours.wte.weight)
        reference.wpe.weight.copy_(ours.wpe.weight)
        reference.ln_f.weight.copy_(ours.ln_f.weight)
        for block, theirs in zip(ours.blocks, reference.blocks):
            theirs["c_attn"].weight.copy_(block.attn.c_attn.weight)
            theirs["c_proj"].weight.copy_(block.attn.c_proj.weight)
            theirs["ln_1"].weight.copy_(block.ln_1.weight)
            theirs["ln_2"].weight.copy_(block.ln_2.weight)
            theirs["c_fc"].weight.copy_(block.mlp.c_fc.weight)
            theirs["mlp_proj"].weight.copy_(block.mlp.c_proj.weight)
    idx = torch.randint(0, 11, (3, 8))
    ours_logits, ours_loss = ours(idx, idx)
    theirs_logits, theirs_loss = reference(idx, idx)
    torch.testing.assert_close(theirs_logits, ours_logits, rtol=1e-10, atol=1e-12)


def test_bench_runs_and_compares_on_a_tiny_shape(capsys):
    assert main(["bench", "--quick", "--compare", "--rounds", "1", "--device", "cpu"]) == 0
    output = capsys.readouterr().out
    assert "tokens/s" in output and "nanoGPT-style reference" in output and "MFU" not in output


def test_the_reference_is_initialized_as_nanogpt_initializes_its_model():
    """N(0, 0.02) weights, the two residual projections of each block at 0.02/sqrt(2·n_layer), no biases."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=65, block_size=64, n_layer=8, n_head=4, n_embd=256, dropout=0.0, bias=False)
    reference = ReferenceGPT(config)
    assert reference.lm_head.weight is reference.wte.weight
    assert reference.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)
    block = reference.blocks[0]
    assert block["c_fc"].weight.std().item() == pytest.approx(0.02, rel=0.02)
    for projection in ("c_proj", "mlp_proj"):
        assert block[projection].weight.std().item() == pytest.approx(0.02 / 4, rel=0.03)


def test_whole_runs_race_the_pretrain_command_against_nanogpts_loop_in_fresh_processes(capsys):
    """A tiny race (6 steps, one round): both runs finish, learn something, and the report names both."""
    assert main(["bench", "--quick", "--whole-run", "--rounds", "1", "--device", "cpu", "--precision", "fp32"]) == 0
    output = capsys.readouterr().out
    assert "round 1: minillm" in output and "median wall time" in output
    round_line = next(line for line in output.splitlines() if line.startswith("round 1"))
    losses = [float(loss) for loss in re.findall(r"val loss (\d+\.\d+)", round_line)]
    assert len(losses) == 2
    assert all(0.0 < loss < math.log(65) + 0.05 for loss in losses), losses


def test_whole_runs_refuse_a_missing_corpus_before_running_anything(tmp_path, capsys):
    assert main(["bench", "--quick", "--whole-run", "--device", "cpu", "--data", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_bert_benchmark_batch_is_a_pretraining_batch():
    """[CLS] A [SEP] B [SEP], segment B after the middle [SEP], about 15% of the ordinary tokens to predict,
    labels only there (the original ids), [MASK] shown in their place."""
    from minillm.commands.bench import bert_pretraining_batch

    batch = bert_pretraining_batch(vocab_size=1000, batch_size=64, length=32, generator=torch.Generator().manual_seed(0),
                                   device="cpu")
    ids, labels = batch["input_ids"], batch["labels"]
    assert torch.all(ids[:, 0] == 2) and torch.all(ids[:, 16] == 3) and torch.all(ids[:, -1] == 3)
    assert torch.all(batch["token_type_ids"][:, :17] == 0) and torch.all(batch["token_type_ids"][:, 17:] == 1)
    selected = labels != -100
    assert torch.all(ids[selected] == 4) and torch.all(labels[selected] >= 5)
    assert 0.11 < selected.float().sum() / (64 * 29) < 0.19  # 15% of the 29 ordinary positions; sd 0.8 points


def test_bench_races_bert_pretraining_against_hugging_face_on_a_tiny_shape(capsys):
    assert main(["bench", "--model", "bert", "--quick", "--compare", "--rounds", "1", "--device", "cpu"]) == 0
    output = capsys.readouterr().out
    assert "BertForPreTraining" in output and "x the tokens/s of Hugging Face's" in output


@pytest.mark.parametrize("args, message", [
    (["--model", "bert", "--preset", "cpu-recipe"], "is a GPT shape: drop --model bert"),
    (["--preset", "bert-mini"], "is a BERT shape: add --model bert"),
    (["--model", "bert", "--whole-run"], "--whole-run races GPT training runs"),
])
def test_bench_refuses_a_model_and_shape_that_do_not_go_together(args, message, capsys):
    with pytest.raises(SystemExit):
        main(["bench", *args])
    assert message in capsys.readouterr().err
