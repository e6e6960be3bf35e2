"""minillm.data, minillm.tokenization and minillm.bow: encoding and batching text (the data sets' readers: test_datasets.py)."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from minillm import bow
from minillm.tokenization import WordTokenizer


def test_word_tokenizer_keeps_the_most_frequent_words_and_maps_the_rest_to_unk():
    tokenizer = WordTokenizer.train(["a good movie", "a bad movie", "A GOOD plot"], max_words=3)
    assert tokenizer.id_to_word == ["[UNK]", "a", "good", "movie"]
    assert tokenizer.encode("A good film") == [1, 2, 0]
    assert tokenizer.decode(tokenizer.encode("a good movie")) == "a good movie"


sentences_strategy = st.lists(st.lists(st.sampled_from(["good", "bad", "movie", "plot", "rare"]), min_size=0, max_size=6)
                              .map(" ".join), min_size=1, max_size=8)


@given(sentences=sentences_strategy, seed=st.integers(0, 1000))
def test_bag_of_words_logits_equal_the_mean_embedding_formula(sentences, seed):
    """fastText's formula written out in float64 against the EmbeddingBag model."""
    tokenizer = WordTokenizer.train(["good bad movie plot"])
    bags = bow.encode_bags(tokenizer, sentences, [0] * len(sentences))
    torch.manual_seed(seed)
    model = bow.BagOfWordsClassifier(len(tokenizer), embed_dim=4).double()
    logits = model(bags.ids, bags.offsets)
    for row, sentence in enumerate(sentences):
        ids = tokenizer.encode(sentence) or [0]
        mean_vector = model.embedding.weight[ids].mean(dim=0)
        expected = model.classifier.weight @ mean_vector + model.classifier.bias
        torch.testing.assert_close(logits[row], expected, rtol=1e-12, atol=1e-12)


@given(sentences=sentences_strategy, data_=st.data())
def test_batch_of_selects_exactly_the_chosen_sentences(sentences, data_):
    tokenizer = WordTokenizer.train(["good bad movie plot"])
    labels = list(range(len(sentences)))
    bags = bow.encode_bags(tokenizer, sentences, labels)
    indices = data_.draw(st.lists(st.integers(0, len(sentences) - 1), min_size=1, max_size=len(sentences)))
    batch = bow.batch_of(bags, torch.tensor(indices))
    expected = bow.encode_bags(tokenizer, [sentences[i] for i in indices], [labels[i] for i in indices])
    assert torch.equal(batch.ids, expected.ids) and torch.equal(batch.offsets, expected.offsets)
    assert torch.equal(batch.labels, expected.labels)


def test_bag_of_words_training_learns_a_separable_toy_problem():
    sentences = ["good great fine", "great good", "bad awful", "awful bad poor", "fine good", "poor bad"] * 20
    labels = [1, 1, 0, 0, 1, 0] * 20
    tokenizer = WordTokenizer.train(sentences)
    bags = bow.encode_bags(tokenizer, sentences, labels)
    torch.manual_seed(0)
    model = bow.BagOfWordsClassifier(len(tokenizer), embed_dim=8)
    history = bow.fit(model, torch.optim.Adam(model.parameters(), lr=0.05), bags, bags, steps=60, batch_size=16, eval_every=20)
    assert history.dev_accuracy[-1] == 1.0 and history.train_loss[-1] < history.train_loss[0]
