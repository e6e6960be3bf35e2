"""The generation race runs both sides on the same weights: greedy decoding must then agree token for token."""

from __future__ import annotations

from minillm.generation_speed import race_generation
from minillm.gpt import GPTConfig


def test_minillm_and_transformers_decode_the_same_tokens_from_the_same_weights():
    config = GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    races = race_generation(config, batch_sizes=(1, 3), prompt_tokens=5, new_tokens=12, repeats=1, log=lambda m: None)
    assert [race.batch_size for race in races] == [1, 3]
    # random weights give well-separated logits at this size: every greedy token must match
    assert all(race.same_tokens == 1.0 for race in races)
    assert all(race.minillm_seconds > 0 and race.hf_seconds > 0 for race in races)
    assert all(race.row()["minillm weights GB/s"] > 0 for race in races)


def test_decoding_reads_every_weight_once_but_the_position_table_and_the_tied_head_counts_once():
    import torch

    from minillm.generation_speed import decoding_weight_bytes
    from minillm.gpt import GPT

    vocab, width, layers = 97, 32, 2
    model = GPT(GPTConfig(vocab_size=vocab, block_size=64, n_layer=layers, n_head=2, n_embd=width, bias=True))
    per_block = 12 * width**2 + 13 * width  # attention 4C² + 4C, MLP 8C² + 5C, two LayerNorms 4C
    parameters = layers * per_block + vocab * width + 2 * width  # blocks, wte (= lm_head), ln_f
    assert decoding_weight_bytes(model) == 4 * parameters
    assert decoding_weight_bytes(model.to(torch.bfloat16)) == 2 * parameters
