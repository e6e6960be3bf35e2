"""``python -m minillm evaluate``: every kind of run scored on its held-out data, checked against references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score
from tiny_runs import TEXT, tiny_classifier_run, tiny_gpt_run

from minillm import datasets, runs
from minillm.__main__ import main
from minillm.evaluation import CONFUSION_PLOT, EVAL, evaluate_run, language_model_scores
from minillm.files import read_json, write_json
from minillm.finetune import encode_for_bert
from minillm.inference_runs import load_for_inference, save_transformer_run
from minillm.number_words import Vocabulary, evaluate, number_dataset
from minillm.tokenization import CharTokenizer
from minillm.transformer import Transformer, TransformerConfig


def test_held_out_loss_is_the_float64_mean_cross_entropy_of_every_block(tmp_path):
    folder, model = tiny_gpt_run(tmp_path / "gpt", seed=1)
    scores = evaluate_run(folder, batch_size=3, log=lambda m: None)
    val_text = datasets.text_splits(folder / "corpus.txt", 0.1)[1]
    ids = torch.tensor(CharTokenizer.train(TEXT).encode(val_text))
    block = model.config.block_size
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, (len(ids) - 1) // block * block, block):  # every whole block, none twice
            x, y = ids[start:start + block], ids[start + 1:start + block + 1]
            log_probs = F.log_softmax(model(x[None])[0][0].double(), dim=-1)  # (T, vocab) in float64
            total -= log_probs[torch.arange(block), y].sum().item()
            count += block
    # float32 logits summed in batches of 3 vs a float64 sum block by block: 1e-6 relative is many ulps of float32
    assert scores["loss"] == pytest.approx(total / count, rel=1e-6)
    assert scores["tokens"] == count and scores["characters"] == count  # a character-level model: a token is a char
    assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"]), rel=1e-12)
    assert scores["bits_per_char"] == pytest.approx(scores["loss"] / math.log(2), rel=1e-12)
    assert read_json(folder / EVAL)["loss"] == scores["loss"]


def test_bits_per_char_divides_by_the_characters_the_tokens_spell():
    class TwoCharTokens:  # every token spells two characters: bits/char is half of bits/token
        def encode(self, text):
            return [ord(c) % 7 for c in text]

        def decode(self, ids):
            return "ab" * len(ids)

    torch.manual_seed(0)
    from minillm.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=7, block_size=8, n_layer=1, n_head=1, n_embd=8, dropout=0.0)).eval()
    scores = language_model_scores(model, TwoCharTokens(), "hello world, " * 10)
    assert scores["bits_per_char"] == pytest.approx(scores["bits_per_token"] / 2, rel=1e-12)


def test_a_classifier_is_scored_on_sst2_dev_as_sklearn_scores_its_predictions(tmp_path):
    folder, model = tiny_classifier_run(tmp_path / "clf", "lora", seed=2)
    out = tmp_path / "scores"
    scores = evaluate_run(folder, limit=60, batch_size=16, log=lambda m: None, out=out)
    _, tokenizer, _ = load_for_inference(folder)
    dev = list(zip(*datasets.read_sst2("dev")))[:60]
    true = [label for _, label in dev]
    predicted = []
    with torch.no_grad():
        for ids, _ in encode_for_bert(tokenizer, dev, 32):  # one at a time: no padding at all
            predicted.append(model(torch.tensor([ids])).logits.argmax(-1).item())
    assert scores["examples"] == 60 and scores["split"] == "SST-2 dev"
    assert scores["accuracy"] == pytest.approx(accuracy_score(true, predicted))
    assert scores["precision"] == pytest.approx(precision_score(true, predicted, zero_division=0))
    assert scores["recall"] == pytest.approx(recall_score(true, predicted, zero_division=0))
    assert scores["f1"] == pytest.approx(f1_score(true, predicted, zero_division=0))
    assert np.array(scores["confusion_matrix"]).sum() == 60
    assert (out / CONFUSION_PLOT).stat().st_size > 1000 and (out / EVAL).is_file()
    assert not (folder / EVAL).exists()  # --out elsewhere leaves the run folder as it was


def test_the_transformer_run_is_scored_on_its_test_numbers_greedy_and_with_beams(tmp_path):
    number_data = dict(n_train=50, n_val=5, n_test=12, max_digits=3, seed=4, direction="words2digits")
    splits = number_dataset(**number_data)
    src_vocab = Vocabulary.from_sequences(s for s, _ in splits.train)
    tgt_vocab = Vocabulary.from_sequences(t for _, t in splits.train)
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(len(src_vocab), len(tgt_vocab), d_model=16, n_heads=2, n_encoder_layers=1,
                                          n_decoder_layers=1, d_ff=32, dropout=0.0, max_len=24)).eval()
    folder = save_transformer_run(tmp_path / "t", model, src_vocab, tgt_vocab, number_data)
    scores = evaluate_run(folder, log=lambda m: None)
    greedy = evaluate(model, splits.test, src_vocab, tgt_vocab)
    beam = evaluate(model, splits.test, src_vocab, tgt_vocab, beam_size=4)
    assert scores["examples"] == 12
    assert scores["greedy"] == {"exact_match": greedy.exact_match, "bleu": greedy.bleu}
    assert scores["beam"]["bleu"] == beam.bleu and scores["beam"]["exact_match"] == beam.exact_match


def test_evaluating_a_pretrained_bert_reproduces_the_held_out_scores_its_run_wrote(tmp_path):
    bert = tmp_path / "bert"
    assert main(["pretrain", "bert", "--quick", "--data", "sst2", "--sst2-limit", "600", "--out", str(bert),
                 "--device", "cpu"]) == 0
    written = read_json(bert / runs.RESULTS)
    assert main(["evaluate", "--run", str(bert), "--device", "cpu"]) == 0
    scores = read_json(bert / EVAL)
    # the same model, the same held-out pairs masked with the same seed: the same counts
    assert scores["mlm_accuracy"] == written["mlm_accuracy"] and scores["nsp_accuracy"] == written["nsp_accuracy"]
    assert scores["mlm_loss"] == pytest.approx(written["mlm_loss"], rel=1e-6)


def test_the_command_refuses_what_it_cannot_score_in_one_sentence(tmp_path, capsys):
    assert main(["evaluate", "--run", str(tmp_path / "nowhere")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    folder, _ = tiny_gpt_run(tmp_path / "gpt")
    config = runs.read_config(folder)
    write_json(folder / runs.CONFIG, {**config, "model": {**config["model"], "type": "bert-encoder"}})
    assert main(["evaluate", "--run", str(folder)]) == 2
    assert "chapter 10 probes" in capsys.readouterr().err
    write_json(folder / runs.CONFIG, {**config, "data": str(tmp_path / "moved.txt")})
    assert main(["evaluate", "--run", str(folder)]) == 2
    error = capsys.readouterr().err
    assert "is not there any more" in error and error.count("\n") == 1
    assert main(["evaluate", "--run", str(folder), "--out", str(folder / runs.CONFIG)]) == 2
