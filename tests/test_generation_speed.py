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
