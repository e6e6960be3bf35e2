"""minillm.batched_generation: prompts of different lengths decoded together give each prompt its own tokens.

A row decoded alone runs exactly GPT.generate's operations, so its tokens are GPT.generate's, bit for bit
(greedy and seeded sampling). In a batch, left padding, per-row positions and the key-padding mask must
leave every row's logits as they are alone up to float reassociation; continuous batching (rows joining
and leaving mid-decode) must not disturb the others.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.batched_generation import BatchedDecoder, Row, SamplingParams, generate_batch
from minillm.gpt import GPT, GPTConfig

VOCAB = 40

# Float32 logits of a row batched with others differ from the same row alone by ~1e-6 here (measured: at most
# 1e-6 with learned positions, 3e-6 with rotary), because a taller matrix product and a masked attention add the
# same terms in another order. 1e-4 leaves a wide margin and still catches any real leak across rows or a wrong
# position, which moves logits by 1e-2 or more.
LOGIT_TOLERANCE = 1e-4


def tiny_gpt(positions: str = "learned", seed: int = 0) -> GPT:
    """A 2-layer GPT whose matrices are drawn with std 0.1 (not GPT-2's 0.02), so that greedy decoding wanders
    over many tokens instead of repeating one, and the two best logits of every step stay apart."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=48, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                          tie_weights=False, positions=positions))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.1)
    return model.eval()


def prompts_of(lengths, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def decode_alone(model, prompt, params) -> Row:
    row = Row(prompt, params, keep_logits=True)
    decoder = BatchedDecoder(model)
    decoder.add([row])
    while decoder.rows:
        decoder.step()
    return row


def top_two_margin(logits: torch.Tensor) -> float:
    best, second = logits.topk(2).values.tolist()
    return best - second


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_a_row_alone_gives_exactly_the_tokens_of_gpt_generate(positions):
    model = tiny_gpt(positions)
    for prompt in prompts_of([1, 5, 17]):
        idx = torch.tensor([prompt])
        greedy = model.generate(idx, 20, temperature=0)[0, len(prompt):].tolist()
        assert generate_batch(model, [prompt], SamplingParams(max_tokens=20, temperature=0)) == [greedy]
        sampled = model.generate(idx, 20, temperature=0.9, top_p=0.9, generator=torch.Generator().manual_seed(5))
        params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=5)
        assert generate_batch(model, [prompt], params) == [sampled[0, len(prompt):].tolist()]


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_batched_rows_keep_their_unbatched_logits_and_greedy_tokens(positions):
    model = tiny_gpt(positions)
    prompts = prompts_of([6, 1, 19, 11])
    params = SamplingParams(max_tokens=24, temperature=0)
    alone = [decode_alone(model, prompt, params) for prompt in prompts]
    rows = [Row(prompt, params, keep_logits=True) for prompt in prompts]
    decoder = BatchedDecoder(model)
    decoder.add(rows)
    while decoder.rows:
        decoder.step()
    for single, batched in zip(alone, rows):
        torch.testing.assert_close(torch.stack(batched.logits), torch.stack(single.logits), rtol=0, atol=LOGIT_TOLERANCE)
        # Greedy tokens can only flip where the two best logits are within the float error of each other; on this
        # fixture they never are, so the tokens must be equal.
        assert min(top_two_margin(logits) for logits in single.logits) > 10 * LOGIT_TOLERANCE
        assert batched.tokens == single.tokens


@settings(max_examples=10)
@given(lengths=st.lists(st.integers(1, 20), min_size=2, max_size=5), budgets=st.lists(st.integers(1, 20), min_size=5,
                                                                                        max_size=5),
       max_batch=st.integers(1, 3))
def test_rows_joining_and_leaving_a_running_batch_do_not_change_the_others(lengths, budgets, max_batch):
    """Continuous batching: with at most ``max_batch`` rows at once, a waiting prompt joins as a row finishes
    (rows of different budgets finish at different steps): every row's logits are still its own."""
    model = tiny_gpt()
    prompts = prompts_of(lengths, seed=len(lengths))
    params = [SamplingParams(max_tokens=budget, temperature=0) for budget in budgets[:len(prompts)]]
    alone = [decode_alone(model, prompt, p) for prompt, p in zip(prompts, params)]
    rows = [Row(prompt, p, keep_logits=True) for prompt, p in zip(prompts, params)]
    decoder, waiting = BatchedDecoder(model), list(rows)
    while waiting or decoder.rows:
        if len(decoder) < max_batch and waiting:
            decoder.add([waiting.pop(0)])
        decoder.step()
        assert decoder.width == max((len(r.prompt) + len(r.tokens) - 1 for r in decoder.rows), default=0), \
            "the cache must be exactly as wide as its longest row: all-padding columns are dropped"
    for single, batched in zip(alone, rows):
        assert len(batched.tokens) == batched.params.max_tokens and batched.finish_reason == "length"
        torch.testing.assert_close(torch.stack(batched.logits), torch.stack(single.logits), rtol=0, atol=LOGIT_TOLERANCE)


def test_removing_a_row_frees_its_slot_and_drops_the_padding_only_it_needed():
    model = tiny_gpt()
    short, long = Row(prompts_of([3])[0], SamplingParams(max_tokens=20, temperature=0)), \
        Row(prompts_of([20])[0], SamplingParams(max_tokens=20, temperature=0))
    decoder = BatchedDecoder(model)
    decoder.add([short, long])
    assert decoder.width == 20 and decoder.pad.tolist() == [17, 0]
    decoder.step()
    decoder.remove([long])
    assert decoder.rows == [short] and long.finish_reason == "stop"
    assert decoder.width == 4 and decoder.pad.tolist() == [0]  # 3 prompt tokens + 1 generated, now cached
    assert decoder.keys[0].shape[0] == 1


def test_a_stop_token_ends_its_row_and_only_its_row():
    model = tiny_gpt()
    prompt = prompts_of([5])[0]
    first = generate_batch(model, [prompt], SamplingParams(max_tokens=1, temperature=0))[0][0]
    stopping = Row(prompt, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(first,)))
    other = Row(prompts_of([8], seed=3)[0], SamplingParams(max_tokens=10, temperature=0))
    decoder = BatchedDecoder(model)
    decoder.add([stopping, other])
    assert stopping.tokens == [first] and stopping.finish_reason == "stop" and decoder.rows == [other]
    while decoder.rows:
        decoder.step()
    assert len(other.tokens) == 10 and other.finish_reason == "length"


def test_a_prompt_and_budget_beyond_the_context_are_refused():
    model = tiny_gpt()
    decoder = BatchedDecoder(model)
    with pytest.raises(ValueError, match="context of 48"):
        decoder.add([Row([1] * 40, SamplingParams(max_tokens=9))])
    with pytest.raises(ValueError, match="at least one token"):
        decoder.add([Row([], SamplingParams())])
    decoder.add([Row([1] * 40, SamplingParams(max_tokens=8, temperature=0))])  # 48 fits exactly
    while decoder.rows:
        decoder.step()
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
