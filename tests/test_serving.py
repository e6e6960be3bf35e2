"""minillm.serving: a live server on a loopback port, asked by real HTTP clients (httpx, the official openai client).

The server's completions equal what ``python -m minillm generate`` prints (greedy), streamed or not; bad input
gets a 4xx in OpenAI's error shape and the server keeps answering; a client that goes away frees its slot;
concurrent requests are decoded in one batch (counted by the worker, not timed); the classifier answers
labels and probabilities that are the model's own.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import torch
from tiny_runs import tiny_classifier_run, tiny_gpt_run

from minillm import MinillmError
from minillm.bert import BertConfig, BertForSequenceClassification
from minillm.finetune import encode_for_bert
from minillm.gpt import GPT, GPTConfig
from minillm.inference_runs import load_for_inference
from minillm.load_test import check_loopback, load_test, percentile
from minillm.pretrain import sample_text
from minillm.quantization import quantize_model
from minillm.serving import MAX_BODY_BYTES, CompletionText, ServingConfig, load_served_model, served_model, start_server
from minillm.tokenization import CharTokenizer, train_wordpiece

ALPHABET = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
CONTEXT = 64
TOKEN_LIMIT = 48  # the server's --max-tokens
MAX_PROMPTS = 4
ERROR_FIELDS = {"message", "type", "param", "code"}


def tiny_gpt() -> GPT:
    """A 2-layer GPT over the alphabet whose matrices are drawn with std 0.1, so greedy text varies."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(ALPHABET), block_size=CONTEXT, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                          tie_weights=False))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def gpt():
    return tiny_gpt(), CharTokenizer(ALPHABET)


@pytest.fixture(scope="module")
def server(gpt):
    model, tokenizer = gpt
    config = ServingConfig(max_batch=4, batch_window_ms=5, max_tokens=TOKEN_LIMIT, max_prompts=MAX_PROMPTS)
    with start_server(served_model(model, tokenizer, "tiny-gpt"), config) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as http:
        yield http


@pytest.fixture(scope="module")
def classifier():
    texts = ["a good film", "a bad film", "the acting was good", "the plot was bad", "good fun", "bad and boring"]
    tokenizer = train_wordpiece(texts * 3, vocab_size=80)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=tokenizer.get_vocab_size(), max_len=16, n_layer=1,
                                                     n_head=2, n_embd=16, dropout=0.0), num_labels=2, pooling="mean")
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def classifier_server(classifier):
    model, tokenizer = classifier
    with start_server(served_model(model, tokenizer, "tiny-clf"), ServingConfig(max_texts=3)) as running:
        yield running


@pytest.fixture(scope="module")
def classifier_client(classifier_server):
    with httpx.Client(base_url=classifier_server.url, timeout=30, trust_env=False) as http:
        yield http


def complete(client, **body) -> dict:
    response = client.post("/v1/completions", json={"model": "tiny-gpt", **body})
    assert response.status_code == 200, response.text
    return response.json()


def stream_events(client, **body) -> list:
    """The data of each server-sent event, JSON-decoded ([DONE] kept as the string)."""
    with client.stream("POST", "/v1/completions", json={"model": "tiny-gpt", "stream": True, **body}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def greedy_text(gpt, prompt: str, max_tokens: int) -> str:
    """What ``python -m minillm generate --temperature 0`` prints after the prompt (the command calls sample_text)."""
    model, tokenizer = gpt
    return sample_text(model, tokenizer, prompt, max_tokens, temperature=0.0)[len(prompt):]


# ---------------------------------------------------------------------------------------------
# Completions
# ---------------------------------------------------------------------------------------------


def test_health_and_models_describe_the_served_model(client):
    assert client.get("/health").json() == {"status": "ok", "model": "tiny-gpt", "kind": "completions", "active": 0,
                                            "waiting": 0}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny-gpt"]
    assert client.get("/v1/models/tiny-gpt").json()["object"] == "model"


def test_a_greedy_completion_is_what_generate_prints(client, gpt):
    reply = complete(client, prompt="ROMEO:", max_tokens=30, temperature=0)
    expected = greedy_text(gpt, "ROMEO:", 30)
    assert len(set(expected)) > 5  # the fixture's text varies, so equality says something
    assert reply["object"] == "text_completion" and reply["id"].startswith("cmpl-") and reply["model"] == "tiny-gpt"
    assert isinstance(reply["created"], int)
    assert reply["choices"] == [{"text": expected, "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert reply["usage"] == {"prompt_tokens": 6, "completion_tokens": 30, "total_tokens": 36}


def test_a_list_of_prompts_gets_one_choice_each_in_order(client, gpt):
    prompts = ["ROMEO:", "a", "To be, or not to be"]
    reply = complete(client, prompt=prompts, max_tokens=12, temperature=0)
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert [c["text"] for c in reply["choices"]] == [greedy_text(gpt, p, 12) for p in prompts]
    assert reply["usage"]["prompt_tokens"] == sum(map(len, prompts)) and reply["usage"]["completion_tokens"] == 36


def test_token_id_prompts_are_the_same_as_their_text(client, gpt):
    ids = gpt[1].encode("ROMEO:")
    assert complete(client, prompt=ids, max_tokens=10, temperature=0)["choices"][0]["text"] == \
        greedy_text(gpt, "ROMEO:", 10)
    assert [c["text"] for c in complete(client, prompt=[ids, ids[:2]], max_tokens=5, temperature=0)["choices"]] == \
        [greedy_text(gpt, "ROMEO:", 5), greedy_text(gpt, "RO", 5)]


def test_a_stop_string_ends_the_text_before_it(client, gpt):
    full = greedy_text(gpt, "ROMEO:", 30)
    stop = full[10:12]
    reply = complete(client, prompt="ROMEO:", max_tokens=30, temperature=0, stop=[stop, "never-seen"])
    choice = reply["choices"][0]
    assert choice["text"] == full[:full.find(stop)] and choice["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] < 30


def test_a_seed_makes_sampling_repeatable(client, gpt):
    body = dict(prompt="ROMEO:", max_tokens=20, temperature=1.2, top_p=0.95, seed=1234)
    first, second = (complete(client, **body)["choices"][0]["text"] for _ in range(2))
    assert first == second
    model, tokenizer = gpt
    generator = torch.Generator().manual_seed(1234)
    ids = model.generate(torch.tensor([tokenizer.encode("ROMEO:")]), 20, temperature=1.2, top_p=0.95, generator=generator)
    assert first == tokenizer.decode(ids[0, 6:].tolist())  # a lone request samples as GPT.generate does


def test_a_stream_sends_chunks_that_add_up_to_the_completion_then_done(client, gpt):
    stop = greedy_text(gpt, "ROMEO:", 20)[8:10]  # the first choice ends at a stop string, the second maybe not
    body = dict(prompt=["ROMEO:", "JULIET:"], max_tokens=20, temperature=0, stop=stop)
    expected = complete(client, **body)
    assert expected["choices"][0]["finish_reason"] == "stop"
    events = stream_events(client, stream_options={"include_usage": True}, **body)
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk, _ = events
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == expected["usage"]
    for index, choice in enumerate(expected["choices"]):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [c["finish_reason"] for c in mine][-1] == choice["finish_reason"]
        assert all(c["finish_reason"] is None for c in mine[:-1])
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] and c["usage"] is None for c in chunks)


def test_text_that_may_begin_a_stop_string_is_held_back_until_decided():
    text = CompletionText(CharTokenizer(ALPHABET), stop=["abc", "x"])
    pieces = [text.add(token) for token in CharTokenizer(ALPHABET).encode("zab")]
    assert pieces == ["z", "", ""] and not text.stopped  # "a", then "ab", may be the start of "abc"
    assert text.add(CharTokenizer(ALPHABET).encode("d")[0]) == "abd"  # not "abc" after all: released
    assert text.add(CharTokenizer(ALPHABET).encode("a")[0]) == ""
    assert text.add(CharTokenizer(ALPHABET).encode("x")[0]) == "a" and text.stopped  # cut before "x"
    assert text.sent == "zabda" and text.finish() == ""


def test_the_official_openai_client_works_streamed_and_not(server, gpt):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, http_client=httpx.Client(
        trust_env=False))
    assert [m.id for m in client.models.list()] == ["tiny-gpt"]
    completion = client.completions.create(model="tiny-gpt", prompt="ROMEO:", max_tokens=25, temperature=0)
    expected = greedy_text(gpt, "ROMEO:", 25)
    assert completion.choices[0].text == expected and completion.usage.completion_tokens == 25
    stream = client.completions.create(model="tiny-gpt", prompt="ROMEO:", max_tokens=25, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == expected
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-gpt", prompt="ROMEO:", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="ROMEO:")


# ---------------------------------------------------------------------------------------------
# Bad input: a 4xx in OpenAI's shape, and the server goes on
# ---------------------------------------------------------------------------------------------

TOO_LONG = "a" * (CONTEXT - 4)

BAD_REQUESTS = {
    "malformed JSON": ('{"model": "tiny-gpt", "prompt": ', 400, None),
    "not an object": ('[1, 2]', 400, None),
    "prompt missing": ({"model": "tiny-gpt"}, 400, "prompt"),
    "prompt of the wrong type": ({"model": "tiny-gpt", "prompt": 5}, 400, "prompt"),
    "mixed prompt list": ({"model": "tiny-gpt", "prompt": ["a", 1]}, 400, "prompt"),
    "max_tokens a string": ({"model": "tiny-gpt", "prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    "max_tokens a boolean": ({"model": "tiny-gpt", "prompt": "a", "max_tokens": True}, 400, "max_tokens"),
    "temperature a string": ({"model": "tiny-gpt", "prompt": "a", "temperature": "hot"}, 400, "temperature"),
    "stream a number": ({"model": "tiny-gpt", "prompt": "a", "stream": 1}, 400, "stream"),
    "max_tokens zero": ({"model": "tiny-gpt", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens negative": ({"model": "tiny-gpt", "prompt": "a", "max_tokens": -3}, 400, "max_tokens"),
    "max_tokens above the limit": ({"model": "tiny-gpt", "prompt": "a", "max_tokens": TOKEN_LIMIT + 1}, 400, "max_tokens"),
    "prompt longer than the context": ({"model": "tiny-gpt", "prompt": TOO_LONG, "max_tokens": 5}, 400, "prompt"),
    "character the tokenizer lacks": ({"model": "tiny-gpt", "prompt": "caf\u00e9 \u2603"}, 400, "prompt"),
    "token id outside the vocabulary": ({"model": "tiny-gpt", "prompt": [1, 2, 999]}, 400, "prompt"),
    "empty prompt": ({"model": "tiny-gpt", "prompt": ""}, 400, "prompt"),
    "empty prompt list": ({"model": "tiny-gpt", "prompt": []}, 400, "prompt"),
    "too many prompts": ({"model": "tiny-gpt", "prompt": ["a"] * (MAX_PROMPTS + 1)}, 400, "prompt"),
    "temperature out of range": ({"model": "tiny-gpt", "prompt": "a", "temperature": 3}, 400, "temperature"),
    "top_p out of range": ({"model": "tiny-gpt", "prompt": "a", "top_p": 1.5}, 400, "top_p"),
    "too many stop strings": ({"model": "tiny-gpt", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    "unsupported n": ({"model": "tiny-gpt", "prompt": "a", "n": 2}, 400, "n"),
    "unknown parameter": ({"model": "tiny-gpt", "prompt": "a", "max_tokns": 5}, 400, "max_tokns"),
    "stream_options without stream": ({"model": "tiny-gpt", "prompt": "a", "stream_options": {"include_usage": True}},
                                      400, "stream_options"),
    "unknown model": ({"model": "gpt-4", "prompt": "a"}, 404, "model"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_input_gets_a_4xx_in_openai_error_shape_and_the_server_stays_up(client, case):
    body, status, param = BAD_REQUESTS[case]
    content = body if isinstance(body, str) else json.dumps(body)
    response = client.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS and error["param"] == param and error["message"]
    assert error["type"] == "invalid_request_error"
    assert client.get("/health").json()["status"] == "ok"


def test_a_body_over_the_size_limit_is_refused_unread(client):
    response = client.post("/v1/completions", content=b"x" * (MAX_BODY_BYTES + 1))
    assert response.status_code == 413 and set(response.json()["error"]) == ERROR_FIELDS
    assert client.get("/health").status_code == 200


def test_an_unknown_path_and_the_wrong_endpoint_get_404_in_the_same_shape(client):
    for response in (client.get("/v2/nothing"), client.post("/v1/classify", json={"texts": ["a"]})):
        assert response.status_code == 404 and set(response.json()["error"]) == ERROR_FIELDS


# ---------------------------------------------------------------------------------------------
# Disconnects and batching
# ---------------------------------------------------------------------------------------------


def wait_until_idle(server, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while server.worker.active and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture
def held_model(server):
    """The served model's first forward pass (the prefill, which gives the first token) runs; the next ones wait
    until a request in the batch has been cancelled (at most 30 s), then every pass runs freely again. A completion
    then cannot end before the server has seen its client leave, however long that takes on a loaded machine: no
    race between the two."""
    calls, released = [], threading.Event()

    def hold(*_):
        calls.append(1)
        if len(calls) == 1 or released.is_set():  # the prefill, or a cancellation was seen
            return
        deadline = time.monotonic() + 30  # no cancellation by then: the completion ends, the test fails, not hangs
        while time.monotonic() < deadline and not any(row.owner.cancelled for row in server.worker.decoder.rows):
            time.sleep(0.005)
        released.set()

    handle = server.app.state.served.model.ln_f.register_forward_hook(hold)
    yield
    handle.remove()


def test_a_client_leaving_mid_stream_frees_its_slot(server, client, held_model):
    before = server.worker.cancelled_rows
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as leaving:
        with leaving.stream("POST", "/v1/completions", json={"model": "tiny-gpt", "prompt": "ROMEO:", "max_tokens": 40,
                                                             "temperature": 0, "stream": True}) as response:
            next(response.iter_lines())  # the first chunk arrived: the row is decoding
            assert server.worker.active == 1
    wait_until_idle(server)
    assert server.worker.active == 0 and server.worker.cancelled_rows == before + 1
    assert complete(client, prompt="ROMEO:", max_tokens=3, temperature=0)["choices"][0]["finish_reason"] == "length"


def test_a_client_leaving_a_plain_request_frees_its_slot(server, client, held_model):
    before = server.worker.cancelled_rows
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"model": "tiny-gpt", "prompt": "ROMEO:", "max_tokens": 40},
                   timeout=httpx.Timeout(30, read=0.3), trust_env=False)
    wait_until_idle(server)
    assert server.worker.active == 0 and server.worker.cancelled_rows == before + 1
    assert complete(client, prompt="a", max_tokens=3)["usage"]["completion_tokens"] == 3


def test_a_model_failing_mid_request_answers_500_and_the_server_goes_on(server, client):
    def fail(*_):
        raise RuntimeError("simulated failure")

    handle = server.app.state.served.model.ln_f.register_forward_hook(fail)
    try:
        response = client.post("/v1/completions", json={"model": "tiny-gpt", "prompt": "ROMEO:", "max_tokens": 5})
        assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
        events = stream_events(client, prompt="ROMEO:", max_tokens=5)
        assert set(events[-1]["error"]) == ERROR_FIELDS and "[DONE]" not in events  # an error event ends the stream
    finally:
        handle.remove()
    wait_until_idle(server)
    assert complete(client, prompt="ROMEO:", max_tokens=5)["usage"]["completion_tokens"] == 5


def test_concurrent_requests_are_decoded_in_one_batch(gpt):
    """max_batch 4 and a batching window far longer than the test: the worker waits for 4 requests, prefills
    them together and decodes them together."""
    model, tokenizer = gpt
    config = ServingConfig(max_batch=4, batch_window_ms=10_000)
    prompts = ["ROMEO:", "a", "To be, or", "JULIET: O"]

    async def send_all(url):
        async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json={
                "model": "tiny", "prompt": p, "max_tokens": 8, "temperature": 0}) for p in prompts))

    with start_server(served_model(model, tokenizer, "tiny"), config) as running:
        replies = asyncio.run(send_all(running.url))
        worker = running.worker
        assert worker.prefill_sizes == {4: 1}  # one prefill of all four prompts
        assert worker.batch_sizes == {4: 7}  # then 7 steps of 4 rows (8 tokens: 1 from the prefill, 7 steps)
    assert [r.json()["choices"][0]["text"] for r in replies] == [greedy_text(gpt, p, 8) for p in prompts]


def test_without_batching_requests_run_one_at_a_time(gpt):
    model, tokenizer = gpt
    with start_server(served_model(model, tokenizer, "tiny"), ServingConfig(max_batch=1)) as running:
        result = load_test(running.url, {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 5, "temperature": 0},
                           concurrency=4, requests=8, time_limit_s=60)
        assert result.ok == 8 and result.errors == 0 and result.completion_tokens == 40
        assert set(running.worker.batch_sizes) == {1} and set(running.worker.prefill_sizes) == {1}


# ---------------------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------------------


def test_classify_returns_the_models_own_labels_and_probabilities(classifier_client, classifier):
    model, tokenizer = classifier
    texts = ["a good film", "bad and boring plot", "the acting"]
    reply = classifier_client.post("/v1/classify", json={"texts": texts}).json()
    assert reply["object"] == "classification" and reply["model"] == "tiny-clf"
    for index, (text, item) in enumerate(zip(texts, reply["data"])):
        (ids, _), = encode_for_bert(tokenizer, [(text, 0)], 16)
        with torch.no_grad():
            expected = torch.softmax(model(torch.tensor([ids])).logits, dim=-1)[0]  # the text alone, unpadded
        probabilities = torch.tensor([item["probabilities"]["negative"], item["probabilities"]["positive"]])
        # Padded in a batch of three vs alone: float32 sums in another order, ~1e-7; 1e-5 is ample.
        torch.testing.assert_close(probabilities, expected, rtol=0, atol=1e-5)
        assert item["index"] == index and item["label"] == ["negative", "positive"][int(expected.argmax())]
        assert item["label_id"] == int(expected.argmax())
    assert reply["usage"]["prompt_tokens"] == sum(len(encode_for_bert(tokenizer, [(t, 0)], 16)[0][0]) for t in texts)


@pytest.mark.parametrize("body, status, param", [
    ({"texts": ["a", "b", "c", "d"]}, 400, "texts"),  # more than --max-texts 3
    ({"texts": []}, 400, "texts"),
    ({"texts": "a good film"}, 400, "texts"),
    ({"texts": ["a", 3]}, 400, "texts"),
    ({"texts": ["a"], "model": "other"}, 404, "model"),
    ({"text": ["a"]}, 400, "texts"),  # a misspelt field: "texts" is missing
])
def test_bad_classify_input_gets_a_4xx_and_the_server_stays_up(classifier_client, body, status, param):
    response = classifier_client.post("/v1/classify", json=body)
    assert response.status_code == status and response.json()["error"]["param"] == param
    assert set(response.json()["error"]) == ERROR_FIELDS
    assert classifier_client.get("/health").json()["kind"] == "classifier"


# ---------------------------------------------------------------------------------------------
# Run folders, as the commands write them, served in float32 and in int8
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_a_gpt_run_folder_is_served_greedy_as_its_model_generates(tmp_path, quantize):
    folder, _ = tiny_gpt_run(tmp_path / "gpt-run")
    model, tokenizer, _ = load_for_inference(folder)
    model = quantize_model(model) if quantize == "int8" else model
    expected = sample_text(model, tokenizer, "First", 20, temperature=0.0)[len("First"):]
    with start_server(load_served_model(folder, quantize=quantize)) as running:
        reply = httpx.post(running.url + "/v1/completions", json={"model": "gpt-run", "prompt": "First", "max_tokens": 20,
                                                                  "temperature": 0}, trust_env=False).json()
    assert reply["choices"][0]["text"] == expected


@pytest.mark.parametrize("method, quantize", [("lora", "none"), ("prompt", "int8")])
def test_a_classifier_run_folder_is_served_with_its_peft_structure(tmp_path, method, quantize):
    folder, _ = tiny_classifier_run(tmp_path / "clf-run", method=method)
    model, tokenizer, _ = load_for_inference(folder)
    model = quantize_model(model) if quantize == "int8" else model
    text = "a charming and witty film"
    (ids, _), = encode_for_bert(tokenizer, [(text, 0)], 32)
    with torch.no_grad():
        expected = torch.softmax(model(torch.tensor([ids])).logits, dim=-1)[0]
    with start_server(load_served_model(folder, quantize=quantize)) as running:
        reply = httpx.post(running.url + "/v1/classify", json={"texts": [text]}, trust_env=False).json()
    probabilities = reply["data"][0]["probabilities"]
    # One text alone, in the same model: the same numbers up to float32 rounding.
    torch.testing.assert_close(torch.tensor([probabilities["negative"], probabilities["positive"]]), expected,
                               rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The load test's own arithmetic and bounds
# ---------------------------------------------------------------------------------------------


def test_an_in_process_server_listens_on_loopback_only(gpt):
    model, tokenizer = gpt
    with pytest.raises(MinillmError, match="this machine only"):
        start_server(served_model(model, tokenizer, "tiny"), ServingConfig(host="0.0.0.0"))


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(1, 101)]  # 1 .. 100
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile([3.0], 99) == 3.0


def test_the_load_test_refuses_any_host_but_this_machine():
    for url in ("http://example.com:8000", "http://10.0.0.1:8000", "https://127.0.0.1:8000"):
        with pytest.raises(MinillmError, match="this machine only"):
            check_loopback(url)
    assert check_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"


def test_the_load_test_counts_errors_and_stops_at_its_request_count(server):
    result = load_test(server.url, {"model": "nope", "prompt": "a"}, concurrency=3, requests=5, time_limit_s=30)
    assert result.sent == 5 and result.errors == 5 and result.ok == 0
