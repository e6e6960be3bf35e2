"""Hugging Face GPT-2 checkpoints, read and written by minillm.hf, checked against transformers itself.

Both directions are compared on logits of random token ids, with transformers' own
``GPT2LMHeadModel`` as the reference: a folder written by ``save_pretrained`` must load into a
minillm ``GPT`` that computes the same logits, and a folder written by ``GPT.save_hf`` must load
into ``GPT2LMHeadModel.from_pretrained`` (with no missing, unexpected or mis-shaped tensor) and
compute the same logits.

Weights are scrambled away from their initial values first (2-D matrices drawn with std 0.3, every
LayerNorm gain and shift and every bias moved by N(0, 0.2²)): at the usual init (std 0.02, unit
gains, zero biases) attention is almost uniform and a swapped query/key projection, a missing bias
or a LayerNorm read into the wrong place would change the logits by too little to see.

Tolerances: in float32 the two models run the same arithmetic through different kernels
(``Conv1D``'s addmm against ``nn.Linear``, in different summation orders), so logits of size up
to ~4 agree to a few float32 roundings; we allow rtol = atol = 1e-5 on the fixed small models
(observed: at most 1.2e-6) and compare the random shapes hypothesis draws in float64, where
larger scrambled models reach float32 differences of ~2e-5.
In float64 the same comparison holds to rtol = atol = 1e-12 (observed: ~4e-15). A mistake is
far above either: a forgotten ``c_proj`` transpose moves the logits by ~5, queries and keys
swapped in one layer by ~1. The round trip minillm -> folder -> minillm only moves numbers
between files and layouts, so it must be bit-identical (``torch.equal``).

transformers is a test-only dependency; without it this module is skipped.
"""

from __future__ import annotations

import json
import pathlib
import re
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from minillm import MinillmError, hf
from minillm.bert import BertConfig, BertForPreTraining, BertForSequenceClassification, load_bert, save_bert
from minillm.gpt import GPT, GPTConfig, load_gpt2, save_gpt2
from minillm.peft import add_adapters

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

F32_TOL = dict(rtol=1e-5, atol=1e-5)
F64_TOL = dict(rtol=1e-12, atol=1e-12)


def scramble_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every parameter away from its init, in place (tied matrices are visited once)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:  # LayerNorm gains (1 + noise) and shifts, biases (0 + noise)
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
            else:
                parameter.normal_(0.0, 0.3, generator=generator)
    return model


def hf_gpt2(seed=0, vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, tie=True,
            activation="gelu_new"):
    """A scrambled transformers GPT2LMHeadModel, in eval mode."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                                     n_head=n_head, activation_function=activation, tie_word_embeddings=tie,
                                     bos_token_id=None, eos_token_id=None)
    return scramble_(transformers.GPT2LMHeadModel(config), seed).eval()


def minillm_gpt(seed=0, bias=True, tie=True, **overrides):
    """A scrambled minillm GPT, in eval mode."""
    torch.manual_seed(seed)
    sizes = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1)
    config = GPTConfig(**{**sizes, **overrides}, bias=bias, tie_weights=tie)
    return scramble_(GPT(config), seed).eval()


def random_ids(vocab_size, length, seed=0, batch=3):
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def our_logits(model, ids):
    with torch.no_grad():
        return model(ids)[0]


def load_with_transformers(directory):
    """GPT2LMHeadModel.from_pretrained, insisting that every tensor was found and used."""
    model, info = transformers.GPT2LMHeadModel.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.fixture
def hf_folder(tmp_path) -> pathlib.Path:
    """A valid save_pretrained folder of `hf_gpt2()` (tied), for a test to edit."""
    folder = tmp_path / "gpt2"
    hf_gpt2().save_pretrained(folder)
    return folder


def edit_config(folder: pathlib.Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_tensors(folder: pathlib.Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, path, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# transformers -> minillm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_a_save_pretrained_folder_loads_with_the_same_logits(tmp_path, tie):
    reference = hf_gpt2(tie=tie)
    reference.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()  # safetensors is save_pretrained's default
    model = GPT.from_hf(tmp_path).eval()
    assert model.config.tie_weights == tie and (model.lm_head.weight is model.wte.weight) == tie
    ids = random_ids(50, 16)
    torch.testing.assert_close(our_logits(model, ids), hf_logits(reference, ids), **F32_TOL)
    # In float64 the only differences left are summation orders.
    torch.testing.assert_close(our_logits(model.double(), ids), hf_logits(reference.double(), ids), **F64_TOL)


@settings(max_examples=6)
@given(n_layer=st.integers(1, 3), n_head=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([2, 4, 8]),
       vocab_size=st.integers(5, 60), n_positions=st.integers(4, 12), tie=st.booleans(),
       activation=st.sampled_from(["gelu_new", "gelu_pytorch_tanh", "gelu"]), seed=st.integers(0, 2**16))
def test_any_gpt2_shape_loads_with_the_same_logits(n_layer, n_head, head_dim, vocab_size, n_positions, tie,
                                                   activation, seed):
    reference = hf_gpt2(seed, vocab_size, n_positions, n_head * head_dim, n_layer, n_head, tie, activation)
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        model = load_gpt2(directory).eval()
    ids = random_ids(vocab_size, n_positions, seed)
    # float64: random shapes with scrambled weights reach logits whose float32 roundings exceed 1e-5
    torch.testing.assert_close(our_logits(model.double(), ids), hf_logits(reference.double(), ids), **F64_TOL)


def test_a_gpt2model_folder_without_prefix_and_with_legacy_mask_buffers_loads(tmp_path):
    """OpenAI's upload on the Hub: names without "transformer.", and the old causal-mask buffers."""
    reference = hf_gpt2(seed=3)
    n_positions = reference.config.n_positions
    tensors = {key.removeprefix("transformer."): value.contiguous()
               for key, value in reference.state_dict().items() if key != "lm_head.weight"}
    for i in range(reference.config.n_layer):
        causal = torch.tril(torch.ones(n_positions, n_positions))  # (P, P), 1 where a query may attend
        tensors[f"h.{i}.attn.bias"] = causal.view(1, 1, n_positions, n_positions)
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = {key: value for key, value in reference.config.to_dict().items()
              if key not in ("tie_word_embeddings", "n_inner")}  # absent keys take GPT-2's defaults
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = random_ids(50, 16)
    torch.testing.assert_close(our_logits(load_gpt2(tmp_path).eval(), ids), hf_logits(reference, ids), **F32_TOL)


def test_an_equal_stored_copy_of_tied_embeddings_is_accepted(hf_folder):
    def add_a_copy_of_wte(tensors):
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    edit_tensors(hf_folder, add_a_copy_of_wte)
    model = load_gpt2(hf_folder)
    assert model.lm_head.weight is model.wte.weight


def test_a_differing_stored_copy_of_tied_embeddings_is_refused(hf_folder):
    """transformers 5 would load it as a separate lm_head (other logits); a tied GPT cannot hold it."""
    edit_tensors(hf_folder, lambda tensors: tensors.update({"lm_head.weight": torch.ones(50, 16)}))
    with pytest.raises(MinillmError, match=r"'lm_head\.weight', which differs from 'transformer\.wte\.weight'"):
        load_gpt2(hf_folder)


def test_a_sharded_folder_loads(tmp_path):
    reference = hf_gpt2(seed=4)
    reference.save_pretrained(tmp_path, max_shard_size="10KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    ids = random_ids(50, 16)
    torch.testing.assert_close(our_logits(load_gpt2(tmp_path).eval(), ids), hf_logits(reference, ids), **F32_TOL)


def test_dropout_is_the_callers_choice_not_the_checkpoints(tmp_path):
    hf_gpt2().save_pretrained(tmp_path)  # resid/embd/attn_pdrop 0.1
    assert load_gpt2(tmp_path).config.dropout == 0.0
    assert load_gpt2(tmp_path, dropout=0.3).config.dropout == 0.3


# ---------------------------------------------------------------------------------------------
# minillm -> transformers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_save_hf_loads_into_transformers_with_the_same_logits(tmp_path, bias, tie, activation):
    model = minillm_gpt(seed=1, bias=bias, tie=tie, activation=activation)
    assert model.save_hf(tmp_path / "out") == tmp_path / "out"
    reference = load_with_transformers(tmp_path / "out")
    assert reference.config.tie_word_embeddings == tie
    assert reference.config.activation_function == {"gelu": "gelu", "gelu_tanh": "gelu_new"}[activation]
    assert reference.config.resid_pdrop == reference.config.attn_pdrop == reference.config.embd_pdrop == 0.1
    ids = random_ids(50, 16, seed=1)
    torch.testing.assert_close(hf_logits(reference, ids), our_logits(model, ids), **F32_TOL)


@settings(max_examples=4)
@given(n_layer=st.integers(1, 3), n_head=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([2, 4, 8]),
       vocab_size=st.integers(5, 60), block_size=st.integers(4, 12), seed=st.integers(0, 2**16))
def test_save_hf_of_any_shape_loads_into_transformers(n_layer, n_head, head_dim, vocab_size, block_size, seed):
    model = minillm_gpt(seed, vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                        n_embd=n_head * head_dim)
    with tempfile.TemporaryDirectory() as directory:
        save_gpt2(model, directory)
        reference = load_with_transformers(directory)
    ids = random_ids(vocab_size, block_size, seed)
    torch.testing.assert_close(hf_logits(reference.double(), ids), our_logits(model.double(), ids), **F64_TOL)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_save_hf_writes_what_save_pretrained_writes(tmp_path, tie):
    """Same tensor names, shapes and values as transformers' own save of the loaded model."""
    save_gpt2(minillm_gpt(seed=2, tie=tie), tmp_path / "ours")
    load_with_transformers(tmp_path / "ours").save_pretrained(tmp_path / "theirs")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    theirs = load_file(tmp_path / "theirs" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert ("lm_head.weight" in ours) == (not tie)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


# ---------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_minillm_to_hf_to_minillm_is_bit_identical(tmp_path, tie):
    model = minillm_gpt(seed=5, tie=tie, layer_norm_eps=1e-6)
    save_gpt2(model, tmp_path)
    loaded = load_gpt2(tmp_path, dropout=model.config.dropout)
    assert loaded.config == model.config
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded_state[name], tensor), name
    assert (loaded.lm_head.weight is loaded.wte.weight) == tie


def test_a_model_without_biases_comes_back_with_zero_biases_and_the_same_logits(tmp_path):
    model = minillm_gpt(seed=6, bias=False)
    save_gpt2(model, tmp_path)
    loaded = load_gpt2(tmp_path).eval()
    assert loaded.config.bias and all(torch.count_nonzero(loaded.state_dict()[name]) == 0
                                      for name in loaded.state_dict() if name.endswith(".bias"))
    ids = random_ids(50, 16)
    torch.testing.assert_close(our_logits(loaded, ids), our_logits(model, ids), **F32_TOL)


def test_save_hf_writes_a_config_transformers_reads_back(tmp_path):
    save_gpt2(minillm_gpt(vocab_size=50257, n_embd=8, block_size=8, n_layer=1), tmp_path / "gpt2-vocab")
    save_gpt2(minillm_gpt(activation="gelu_tanh"), tmp_path / "own-vocab")
    gpt2_vocab = transformers.GPT2Config.from_pretrained(tmp_path / "gpt2-vocab")
    own_vocab = transformers.GPT2Config.from_pretrained(tmp_path / "own-vocab")
    assert gpt2_vocab.eos_token_id == gpt2_vocab.bos_token_id == 50256  # <|endoftext|> of OpenAI's vocabulary
    assert own_vocab.eos_token_id is None and own_vocab.bos_token_id is None  # unknown for another vocabulary
    assert (own_vocab.model_type, own_vocab.n_positions, own_vocab.n_embd, own_vocab.n_layer, own_vocab.n_head) == (
        "gpt2", 16, 16, 2, 2)
    assert own_vocab.architectures == ["GPT2LMHeadModel"] and own_vocab.activation_function == "gelu_new"


# ---------------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------------


def test_a_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(MinillmError, match="is not a directory"):
        GPT.from_hf(tmp_path / "nowhere")


def test_a_folder_without_config_is_a_clear_error(hf_folder):
    (hf_folder / "config.json").unlink()
    with pytest.raises(MinillmError, match="has no config.json"):
        load_gpt2(hf_folder)


def test_a_pickle_only_folder_is_refused(hf_folder):
    (hf_folder / "model.safetensors").unlink()
    (hf_folder / "pytorch_model.bin").write_bytes(b"a pickle that must never be opened")
    with pytest.raises(MinillmError, match=r"only pytorch_model\.bin, a pickle.*reads only safetensors"):
        load_gpt2(hf_folder)


def test_a_folder_without_weights_is_a_clear_error(hf_folder):
    (hf_folder / "model.safetensors").unlink()
    with pytest.raises(MinillmError, match="has no model.safetensors"):
        load_gpt2(hf_folder)


def test_a_corrupt_safetensors_file_is_a_clear_error(hf_folder):
    (hf_folder / "model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(MinillmError, match="cannot read .* as safetensors"):
        load_gpt2(hf_folder)


@pytest.mark.parametrize("changes, message", [
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"n_inner": 48}, "n_inner=48"),
    ({"scale_attn_by_inverse_layer_idx": True}, "attention scaling"),
    ({"model_type": "bert"}, "'bert' model"),
    ({"n_head": 3}, "does not describe a valid GPT"),
], ids=["relu", "n_inner", "attention-scaling", "not-gpt2", "n_head-not-dividing-n_embd"])
def test_configs_minillm_cannot_build_are_refused(hf_folder, changes, message):
    edit_config(hf_folder, **changes)
    with pytest.raises(MinillmError, match=message):
        load_gpt2(hf_folder)


def test_n_inner_of_four_times_n_embd_is_accepted(hf_folder):
    n_embd = json.loads((hf_folder / "config.json").read_text())["n_embd"]
    edit_config(hf_folder, n_inner=4 * n_embd)
    model = load_gpt2(hf_folder)
    assert model.blocks[0].mlp.c_fc.out_features == 4 * n_embd


def test_a_missing_tensor_is_named(hf_folder):
    edit_tensors(hf_folder, lambda tensors: tensors.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(MinillmError, match=r"has no tensor 'h\.1\.mlp\.c_fc\.bias'"):
        load_gpt2(hf_folder)


def test_a_missing_untied_output_layer_is_named(hf_folder):
    edit_config(hf_folder, tie_word_embeddings=False)
    with pytest.raises(MinillmError, match="has no tensor 'lm_head.weight'"):
        load_gpt2(hf_folder)


def test_an_extra_tensor_is_named(hf_folder):
    edit_tensors(hf_folder, lambda tensors: tensors.update({"transformer.h.2.ln_1.weight": torch.ones(16)}))
    with pytest.raises(MinillmError, match=r"holds a tensor 'transformer\.h\.2\.ln_1\.weight'"):
        load_gpt2(hf_folder)


def test_a_mis_shaped_tensor_is_named(hf_folder):
    """An nn.Linear-layout (untransposed) weight where GPT-2's Conv1D layout belongs."""
    def transpose_c_attn(tensors):
        tensors["transformer.h.0.attn.c_attn.weight"] = tensors["transformer.h.0.attn.c_attn.weight"].t()
    edit_tensors(hf_folder, transpose_c_attn)
    message = r"'transformer\.h\.0\.attn\.c_attn\.weight'.*\(48, 16\), expected \(16, 48\)"
    with pytest.raises(MinillmError, match=message):
        load_gpt2(hf_folder)


def test_save_hf_into_a_file_path_is_a_clear_error(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(MinillmError, match="cannot create the folder"):
        minillm_gpt().save_hf(tmp_path / "taken")


def test_a_rotary_model_is_refused_before_anything_is_written(tmp_path):
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, positions="rotary"))
    with pytest.raises(MinillmError, match="positions='rotary'"):
        model.save_hf(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# =============================================================================================
# BERT: transformers.BertForPreTraining <-> minillm.bert.BertForPreTraining
# =============================================================================================


def hf_bert(seed=0, vocab_size=40, max_positions=16, hidden=16, n_layer=2, n_head=2, intermediate=24,
            type_vocab_size=2, activation="gelu"):
    """A scrambled transformers BertForPreTraining, in eval mode (dropout 0.1 in its config)."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=vocab_size, max_position_embeddings=max_positions, hidden_size=hidden,
                                     num_hidden_layers=n_layer, num_attention_heads=n_head,
                                     intermediate_size=intermediate, type_vocab_size=type_vocab_size,
                                     hidden_act=activation)
    return scramble_(transformers.BertForPreTraining(config), seed).eval()


def minillm_bert(seed=0, **overrides):
    """A scrambled minillm BertForPreTraining, in eval mode."""
    torch.manual_seed(seed)
    sizes = dict(vocab_size=40, max_len=16, n_layer=2, n_head=2, n_embd=16, d_ff=24, dropout=0.1)
    return scramble_(BertForPreTraining(BertConfig(**{**sizes, **overrides})), seed).eval()


def bert_inputs(vocab_size, length, type_vocab_size=2, seed=0, batch=3):
    """(input_ids, token_type_ids, attention_mask), each (batch, length): rows of random lengths
    (the first full, every one at least 1 token) padded on the right with id 0, token type 0 and mask 0."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length
    attention_mask = (torch.arange(length) < lengths[:, None]).long()  # (batch, length), 1 at real tokens
    ids = torch.randint(1, vocab_size, (batch, length), generator=generator) * attention_mask
    token_types = torch.randint(0, type_vocab_size, (batch, length), generator=generator) * attention_mask
    return ids, token_types, attention_mask


def hf_bert_logits(model, inputs):
    ids, token_types, attention_mask = inputs
    with torch.no_grad():
        output = model(input_ids=ids, token_type_ids=token_types, attention_mask=attention_mask)
    return output.prediction_logits, output.seq_relationship_logits


def our_bert_logits(model, inputs):
    ids, token_types, attention_mask = inputs
    with torch.no_grad():
        output = model(ids, token_type_ids=token_types, attention_mask=attention_mask)
    return output.mlm_logits, output.nsp_logits


def assert_same_bert_logits(ours, theirs, inputs, tolerance):
    """MLM logits at real (non-padding) tokens and NSP logits agree.

    Padding positions are left out on purpose: no real token attends to them, so nothing a
    model predicts depends on their hidden states, and implementations are free to compute them
    differently (an unpadding attention kernel leaves them as garbage or zeros, an additive mask
    lets them attend to the real tokens). NSP reads position 0, the [CLS] token, always real.
    """
    real = inputs[2].bool()  # (B, T)
    (our_mlm, our_nsp), (their_mlm, their_nsp) = ours, theirs
    torch.testing.assert_close(our_mlm[real], their_mlm[real], **tolerance)  # (n_real, V)
    torch.testing.assert_close(our_nsp, their_nsp, **tolerance)  # (B, 2)


def load_bert_with_transformers(directory):
    """BertForPreTraining.from_pretrained, insisting that every tensor was found and used."""
    model, info = transformers.BertForPreTraining.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.fixture
def bert_folder(tmp_path) -> pathlib.Path:
    """A valid save_pretrained folder of `hf_bert()`, for a test to edit."""
    folder = tmp_path / "bert"
    hf_bert().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# BERT: transformers -> minillm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "relu"])
def test_a_bert_save_pretrained_folder_loads_with_the_same_logits(tmp_path, activation):
    reference = hf_bert(activation=activation)
    reference.save_pretrained(tmp_path)
    model = BertForPreTraining.from_hf(tmp_path).eval()
    expected = BertConfig(vocab_size=40, max_len=16, n_layer=2, n_head=2, n_embd=16, d_ff=24, dropout=0.0,
                          activation={"gelu": "gelu", "gelu_new": "gelu_tanh", "relu": "relu"}[activation])
    assert model.config == expected
    inputs = bert_inputs(40, 16)
    assert_same_bert_logits(our_bert_logits(model, inputs), hf_bert_logits(reference, inputs), inputs, F32_TOL)
    # In float64 the only differences left are summation orders.
    assert_same_bert_logits(our_bert_logits(model.double(), inputs), hf_bert_logits(reference.double(), inputs),
                            inputs, F64_TOL)


@settings(max_examples=6, deadline=None)
@given(n_layer=st.integers(1, 3), n_head=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([2, 4, 8]),
       intermediate=st.one_of(st.just(0), st.integers(1, 40)), vocab_size=st.integers(5, 60),
       max_positions=st.integers(4, 12), type_vocab_size=st.integers(1, 3),
       activation=st.sampled_from(["gelu", "gelu_new", "gelu_pytorch_tanh", "relu"]), seed=st.integers(0, 2**16))
def test_any_bert_shape_loads_with_the_same_logits(n_layer, n_head, head_dim, intermediate, vocab_size, max_positions,
                                                   type_vocab_size, activation, seed):
    hidden = n_head * head_dim
    reference = hf_bert(seed, vocab_size, max_positions, hidden, n_layer, n_head, intermediate or 4 * hidden,
                        type_vocab_size, activation)
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        model = load_bert(directory).eval()
    assert model.config.ff_width == (intermediate or 4 * hidden)
    inputs = bert_inputs(vocab_size, max_positions, type_vocab_size, seed)
    assert_same_bert_logits(our_bert_logits(model.double(), inputs), hf_bert_logits(reference.double(), inputs),
                            inputs, F64_TOL)


def test_a_bert_folder_with_legacy_names_buffers_and_tied_copies_loads(tmp_path):
    """TensorFlow-era LayerNorm gamma/beta, the old position_ids buffer, and the two tied copies stored."""
    reference = hf_bert(seed=3)
    tensors = {}
    for key, value in reference.state_dict().items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        tensors[key] = value.clone(memory_format=torch.contiguous_format)  # the state dict has the tied copies
    assert "cls.predictions.decoder.weight" in tensors and "cls.predictions.decoder.bias" in tensors
    tensors["bert.embeddings.position_ids"] = torch.arange(16).unsqueeze(0)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(reference.config.to_json_string())
    inputs = bert_inputs(40, 16, seed=3)
    model = load_bert(tmp_path).eval()
    assert_same_bert_logits(our_bert_logits(model, inputs), hf_bert_logits(reference, inputs), inputs, F32_TOL)


def test_a_folder_with_only_the_tied_decoder_bias_reads_it_as_the_mlm_bias(bert_folder):
    def rename_the_bias(tensors):
        tensors["cls.predictions.decoder.bias"] = tensors.pop("cls.predictions.bias")
    edit_tensors(bert_folder, rename_the_bias)
    stored = load_file(bert_folder / "model.safetensors")["cls.predictions.decoder.bias"]
    assert torch.equal(load_bert(bert_folder).mlm_bias.detach(), stored)


@pytest.mark.parametrize("copy, original", [
    ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
    ("cls.predictions.decoder.bias", "cls.predictions.bias"),
], ids=["decoder-weight", "decoder-bias"])
def test_a_differing_stored_tied_copy_is_refused(bert_folder, copy, original):
    """transformers 5 would use the copy for the MLM logits; minillm's tied model cannot hold it."""
    edit_tensors(bert_folder, lambda tensors: tensors.update({copy: tensors[original] + 1.0}))
    with pytest.raises(MinillmError, match=f"'{re.escape(copy)}', which differs from '{re.escape(original)}'"):
        load_bert(bert_folder)


def test_bert_dropout_is_the_callers_choice_not_the_checkpoints(bert_folder):
    assert load_bert(bert_folder).config.dropout == 0.0  # the folder says 0.1 for both rates
    assert load_bert(bert_folder, dropout=0.2).config.dropout == 0.2


# ---------------------------------------------------------------------------------------------
# BERT: minillm -> transformers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("d_ff", [0, 24], ids=["ff-4x", "ff-24"])
def test_bert_save_hf_loads_into_transformers_with_the_same_logits(tmp_path, d_ff, activation):
    model = minillm_bert(seed=1, d_ff=d_ff, activation=activation, type_vocab_size=3)
    assert model.save_hf(tmp_path / "out") == tmp_path / "out"
    reference = load_bert_with_transformers(tmp_path / "out")
    config = reference.config
    assert config.hidden_act == {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}[activation]
    assert config.intermediate_size == (d_ff or 64) and config.type_vocab_size == 3
    assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0.1
    inputs = bert_inputs(40, 16, type_vocab_size=3, seed=1)
    assert_same_bert_logits(our_bert_logits(model, inputs), hf_bert_logits(reference, inputs), inputs, F32_TOL)


@settings(max_examples=4, deadline=None)
@given(n_layer=st.integers(1, 3), n_head=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([2, 4, 8]),
       d_ff=st.integers(0, 40), vocab_size=st.integers(5, 60), max_len=st.integers(4, 12),
       type_vocab_size=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_bert_save_hf_of_any_shape_loads_into_transformers(n_layer, n_head, head_dim, d_ff, vocab_size, max_len,
                                                           type_vocab_size, seed):
    model = minillm_bert(seed, vocab_size=vocab_size, max_len=max_len, n_layer=n_layer, n_head=n_head,
                         n_embd=n_head * head_dim, d_ff=d_ff, type_vocab_size=type_vocab_size)
    with tempfile.TemporaryDirectory() as directory:
        save_bert(model, directory)
        reference = load_bert_with_transformers(directory)
    inputs = bert_inputs(vocab_size, max_len, type_vocab_size, seed)
    assert_same_bert_logits(our_bert_logits(model.double(), inputs), hf_bert_logits(reference.double(), inputs),
                            inputs, F64_TOL)


def test_bert_save_hf_writes_what_save_pretrained_writes(tmp_path):
    """Same tensor names, shapes and values as transformers' own save of the loaded model: the tied
    decoder weight and bias left out, no position_ids buffer."""
    save_bert(minillm_bert(seed=2), tmp_path / "ours")
    load_bert_with_transformers(tmp_path / "ours").save_pretrained(tmp_path / "theirs")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    theirs = load_file(tmp_path / "theirs" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert not {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "bert.embeddings.position_ids"} & set(ours)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_bert_save_hf_writes_a_config_transformers_reads_back(tmp_path):
    save_bert(minillm_bert(pad_id=3, layer_norm_eps=1e-6, max_len=12, type_vocab_size=1), tmp_path)
    config = transformers.BertConfig.from_pretrained(tmp_path)
    assert (config.model_type, config.architectures, config.vocab_size, config.hidden_size, config.num_hidden_layers,
            config.num_attention_heads, config.intermediate_size, config.max_position_embeddings,
            config.type_vocab_size, config.layer_norm_eps, config.pad_token_id, config.tie_word_embeddings) == (
        "bert", ["BertForPreTraining"], 40, 16, 2, 2, 24, 12, 1, 1e-6, 3, True)


# ---------------------------------------------------------------------------------------------
# BERT: round trip
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(d_ff=0, activation="gelu_tanh", type_vocab_size=3, pad_id=1, layer_norm_eps=1e-6),
    dict(activation="relu", n_layer=1, n_head=4),
], ids=["default", "ff-4x-tanh-3-types", "relu-1-layer"])
def test_bert_minillm_to_hf_to_minillm_is_bit_identical(tmp_path, overrides):
    model = minillm_bert(seed=5, **overrides)
    save_bert(model, tmp_path)
    loaded = load_bert(tmp_path, dropout=model.config.dropout)
    assert loaded.config == model.config
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded_state[name], tensor), name


# ---------------------------------------------------------------------------------------------
# BERT: clear errors
# ---------------------------------------------------------------------------------------------


def test_a_missing_bert_directory_is_a_clear_error(tmp_path):
    with pytest.raises(MinillmError, match="is not a directory: a Hugging Face BERT checkpoint"):
        BertForPreTraining.from_hf(tmp_path / "nowhere")


def test_a_pickle_only_bert_folder_is_refused(bert_folder):
    (bert_folder / "model.safetensors").unlink()
    (bert_folder / "pytorch_model.bin").write_bytes(b"a pickle that must never be opened")
    with pytest.raises(MinillmError, match=r"only pytorch_model\.bin, a pickle.*BertForPreTraining\.from_pretrained"):
        load_bert(bert_folder)


@pytest.mark.parametrize("changes, message", [
    ({"hidden_act": "silu"}, "hidden_act 'silu'"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type 'relative_key'"),
    ({"is_decoder": True}, "is_decoder"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings to false"),
    ({"pad_token_id": None}, "pad_token_id null"),
    ({"num_attention_heads": 3}, "does not describe a valid BERT"),
    ({"model_type": "roberta"}, "'roberta' model, but load_bert"),
], ids=["silu", "relative-positions", "decoder", "untied", "no-pad-id", "n_head-not-dividing", "roberta"])
def test_bert_configs_minillm_cannot_build_are_refused(bert_folder, changes, message):
    edit_config(bert_folder, **changes)
    with pytest.raises(MinillmError, match=message):
        load_bert(bert_folder)


def test_a_missing_bert_tensor_is_named(bert_folder):
    edit_tensors(bert_folder, lambda tensors: tensors.pop("bert.encoder.layer.1.attention.self.key.bias"))
    with pytest.raises(MinillmError, match=r"has no tensor 'bert\.encoder\.layer\.1\.attention\.self\.key\.bias'"):
        load_bert(bert_folder)


def test_an_extra_bert_tensor_is_named(bert_folder):
    edit_tensors(bert_folder, lambda tensors: tensors.update({"bert.encoder.layer.2.output.dense.bias": torch.ones(16)}))
    with pytest.raises(MinillmError, match=r"holds a tensor 'bert\.encoder\.layer\.2\.output\.dense\.bias'"):
        load_bert(bert_folder)


def test_a_mis_shaped_bert_tensor_is_named(bert_folder):
    def transpose_intermediate(tensors):
        name = "bert.encoder.layer.0.intermediate.dense.weight"
        tensors[name] = tensors[name].t()
    edit_tensors(bert_folder, transpose_intermediate)
    message = r"'bert\.encoder\.layer\.0\.intermediate\.dense\.weight'.*\(16, 24\), expected \(24, 16\)"
    with pytest.raises(MinillmError, match=message):
        load_bert(bert_folder)


def test_an_encoder_only_bert_folder_is_refused(tmp_path):
    hf_bert().bert.save_pretrained(tmp_path)  # a BertModel: names without "bert.", no "cls." heads
    with pytest.raises(MinillmError, match=r"no pretraining heads \(no 'cls\.' tensors\)"):
        load_bert(tmp_path)


def test_a_gpt2_folder_given_to_load_bert_is_refused(hf_folder):
    with pytest.raises(MinillmError, match=r"'gpt2' model, but load_bert .* reads only BERT .*use load_gpt2"):
        load_bert(hf_folder)


def test_a_bert_folder_given_to_load_gpt2_is_refused(bert_folder):
    with pytest.raises(MinillmError, match=r"'bert' model, but load_gpt2 .* reads only GPT-2 .*use load_bert"):
        load_gpt2(bert_folder)


def test_save_bert_refuses_a_model_without_pretraining_heads(tmp_path):
    classifier = BertForSequenceClassification(BertConfig(vocab_size=40, max_len=16, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(MinillmError, match="save_bert writes a minillm BertForPreTraining, got BertForSequenceClassification"):
        save_bert(classifier, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# BERT classifier and encoder: minillm -> transformers
# ---------------------------------------------------------------------------------------------


def minillm_bert_classifier(seed=0, pooling="cls", num_labels=3):
    """A scrambled minillm BertForSequenceClassification, in eval mode."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=40, max_len=16, n_layer=2, n_head=2, n_embd=16, d_ff=24, dropout=0.1)
    return scramble_(BertForSequenceClassification(config, num_labels=num_labels, pooling=pooling), seed).eval()


def test_a_cls_pooling_classifier_loads_into_transformers_with_the_same_logits(tmp_path):
    model = minillm_bert_classifier(seed=2)
    hf.write_bert_classifier_folder(tmp_path, model.state_dict(), model.config, ["negative", "neutral", "positive"])
    reference, info = transformers.BertForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert reference.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    ids, token_types, attention_mask = bert_inputs(40, 16, seed=2)
    with torch.no_grad():
        theirs = reference.eval()(input_ids=ids, token_type_ids=token_types, attention_mask=attention_mask).logits
        ours = model(ids, token_types, attention_mask).logits  # (B, 3)
    torch.testing.assert_close(ours, theirs, **F32_TOL)


def test_an_encoder_loads_into_transformers_bertmodel_with_the_same_states(tmp_path):
    encoder = minillm_bert_classifier(seed=3, pooling="mean").bert
    hf.write_bert_encoder_folder(tmp_path, encoder.state_dict(), encoder.config)
    reference, info = transformers.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, token_types, attention_mask = bert_inputs(40, 16, seed=3)
    with torch.no_grad():
        theirs = reference.eval()(input_ids=ids, token_type_ids=token_types, attention_mask=attention_mask)
        hidden, pooled = encoder(ids, token_types, attention_mask)
    real = attention_mask.bool()  # padding positions' states are free (see assert_same_bert_logits)
    torch.testing.assert_close(hidden[real], theirs.last_hidden_state[real], **F32_TOL)
    torch.testing.assert_close(pooled, theirs.pooler_output, **F32_TOL)


def test_a_classifier_with_adapters_is_refused_before_anything_is_written(tmp_path):
    model = add_adapters(minillm_bert_classifier(), bottleneck=4)
    with pytest.raises(MinillmError, match=r"tensor '.*adapter.*' .* does not match the Hugging Face "
                                           r"BertForSequenceClassification layout"):
        hf.write_bert_classifier_folder(tmp_path / "out", model.state_dict(), model.config, ["a", "b", "c"])
    assert not (tmp_path / "out").exists()
