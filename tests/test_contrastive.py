"""InfoNCE, SimCSE, the probes and PCA against direct formulas and references (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from minillm.bert import BertConfig, BertForPreTraining
from minillm.contrastive import (
    SimCSETask,
    alignment,
    embed_sentences,
    fit_logistic_regression,
    info_nce,
    logistic_regression_probe,
    nearest_centroid_probe,
    pca_2d,
    plot_embeddings_2d,
    sentence_embeddings,
    set_dropout,
    uniformity,
)

sizes = st.integers(1, 9)
dims = st.integers(1, 7)
temperatures = st.floats(0.02, 2.0)
seeds = st.integers(0, 2**31 - 1)


def pair(seed, n, d, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scale,
            torch.randn(n, d, generator=g, dtype=torch.float64) * scale)


def direct_info_nce(z1, z2, tau):
    """The definition, one term at a time: -1/N Σ_i log exp(sim_ii/τ) / Σ_j exp(sim_ij/τ)."""
    n = len(z1)
    total = 0.0
    for i in range(n):
        sims = [float(z1[i] @ z2[j] / (z1[i].norm() * z2[j].norm())) / tau for j in range(n)]
        top = max(sims)  # log-sum-exp, stable at small τ
        total += -(sims[i] - (top + math.log(sum(math.exp(s - top) for s in sims))))
    return total / n


# -- InfoNCE ---------------------------------------------------------------------------------------


@given(seeds, sizes, dims, temperatures)
def test_info_nce_equals_the_direct_formula(seed, n, d, tau):
    z1, z2 = pair(seed, n, d)
    assert info_nce(z1, z2, tau).item() == pytest.approx(direct_info_nce(z1, z2, tau), rel=1e-10, abs=1e-10)


@given(seeds, sizes, dims, temperatures)
def test_info_nce_is_an_explicit_log_softmax_over_the_cosine_matrix(seed, n, d, tau):
    z1, z2 = pair(seed, n, d)
    cos = (z1 / z1.norm(dim=1, keepdim=True)) @ (z2 / z2.norm(dim=1, keepdim=True)).T
    expected = -torch.diagonal(torch.log_softmax(cos / tau, dim=1)).mean()
    assert torch.allclose(info_nce(z1, z2, tau), expected, rtol=1e-12, atol=1e-12)


@given(seeds, sizes, dims, temperatures)
def test_symmetric_is_the_mean_of_both_directions(seed, n, d, tau):
    z1, z2 = pair(seed, n, d)
    both = (direct_info_nce(z1, z2, tau) + direct_info_nce(z2, z1, tau)) / 2
    assert info_nce(z1, z2, tau, symmetric=True).item() == pytest.approx(both, rel=1e-10, abs=1e-10)
    assert torch.allclose(info_nce(z1, z2, tau, symmetric=True),
                          (info_nce(z1, z2, tau) + info_nce(z2, z1, tau)) / 2, rtol=1e-12, atol=1e-12)


@given(seeds, sizes, dims, temperatures, st.lists(st.floats(0.01, 100.0), min_size=9, max_size=9))
def test_info_nce_ignores_the_length_of_each_embedding(seed, n, d, tau, scales):
    z1, z2 = pair(seed, n, d)
    s = torch.tensor(scales[:n], dtype=torch.float64).unsqueeze(1)
    assert torch.allclose(info_nce(z1 * s, z2 * s.flip(0), tau), info_nce(z1, z2, tau), rtol=1e-10, atol=1e-12)


@given(seeds, sizes, dims, temperatures)
def test_info_nce_is_non_negative_and_log_n_when_everything_is_the_same(seed, n, d, tau):
    z1, z2 = pair(seed, n, d)
    assert info_nce(z1, z2, tau).item() >= 0.0
    same = z1[:1].expand(n, d) * 3.0
    assert info_nce(same, same, tau).item() == pytest.approx(math.log(n), abs=1e-12)
    assert info_nce(same, same, tau, symmetric=True).item() == pytest.approx(math.log(n), abs=1e-12)


@settings(max_examples=20)
@given(seeds, st.integers(1, 6), st.integers(1, 6), st.floats(0.1, 2.0), st.booleans())
def test_info_nce_gradient_matches_finite_differences(seed, n, d, tau, symmetric):
    z1, z2 = pair(seed, n, d)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: info_nce(a, b, tau, symmetric), (z1, z2))


@given(st.integers(2, 8), st.booleans())
def test_aligned_orthogonal_pairs_at_small_temperature_give_zero_loss(n, symmetric):
    z = torch.eye(n, dtype=torch.float64) * 5.0  # distinct directions (cosine 0), each paired with itself
    loss = info_nce(z, z.clone(), temperature=0.01, symmetric=symmetric).item()
    assert loss == pytest.approx(math.log1p((n - 1) * math.exp(-1 / 0.01)), abs=1e-15)  # log(1 + (n-1) e^{-1/τ}) ~ 4e-44


def test_info_nce_rejects_bad_inputs():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError):
        info_nce(z, torch.randn(5, 3))
    with pytest.raises(ValueError):
        info_nce(z, z, temperature=0.0)
    with pytest.raises(ValueError):
        info_nce(z[0], z[0])


def test_info_nce_in_bf16_is_computed_in_fp32():
    z1, z2 = pair(0, 16, 8)
    ours = info_nce(z1.bfloat16(), z2.bfloat16(), 0.05)
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(info_nce(z1.bfloat16().double(), z2.bfloat16().double(), 0.05).item(), rel=1e-5)


@given(seeds, st.integers(2, 8), dims)
def test_alignment_and_uniformity_match_their_definitions(seed, n, d):
    z1, z2 = pair(seed, n, d)
    u1, u2 = z1 / z1.norm(dim=1, keepdim=True), z2 / z2.norm(dim=1, keepdim=True)
    assert alignment(z1, z2).item() == pytest.approx(((u1 - u2) ** 2).sum(1).mean().item(), rel=1e-12)
    terms = [math.exp(-2 * float(((u1[i] - u1[j]) ** 2).sum())) for i in range(n) for j in range(n) if i != j]
    assert uniformity(z1).item() == pytest.approx(math.log(sum(terms) / len(terms)), rel=1e-10, abs=1e-12)
    assert uniformity(z1[:1].expand(n, d)).item() == pytest.approx(0.0, abs=1e-12)  # collapse


# -- Probes --------------------------------------------------------------------------------------


def separable(seed, n=200, d=6, margin=1.0):
    """Two classes on either side of a random hyperplane through the origin, with a gap of 2·margin."""
    g = torch.Generator().manual_seed(seed)
    w = F.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 3
    y = (x @ w > 0).long()
    x = x + torch.outer(torch.where(y == 1, margin, -margin).double(), w)  # push each side away from the plane
    return x, y


@settings(max_examples=20)
@given(seeds, st.integers(2, 20))
def test_logistic_probe_is_perfect_on_linearly_separable_data(seed, d):
    x, y = separable(seed, d=d)
    assume(len(torch.unique(y)) == 2)
    assert logistic_regression_probe(x, y, x, y, l2=1e-4) == 1.0  # it separates what can be separated
    x, y = separable(seed, n=600, d=d, margin=6.0)  # a wide gap: held-out points fall on the right side too
    assert logistic_regression_probe(x[:300], y[:300], x[300:], y[300:]) == 1.0


@given(seeds, st.integers(3, 20))
def test_nearest_centroid_probe_is_perfect_on_separated_clusters(seed, d):
    g = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    centres = 10 * rotation[:3]  # three orthogonal directions, 14 apart
    y = torch.randint(3, (300,), generator=g)
    x = centres[y] + 0.5 * torch.randn(300, d, generator=g, dtype=torch.float64)
    assume(len(torch.unique(y[:200])) == 3)
    assert nearest_centroid_probe(x[:200], y[:200], x[200:], y[200:]) == 1.0


@given(seeds)
def test_probes_are_at_chance_on_random_labels(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4000, 8, generator=g, dtype=torch.float64)
    y = torch.randint(2, (4000,), generator=g)
    for probe in (nearest_centroid_probe, logistic_regression_probe):
        accuracy = probe(x[:2000], y[:2000], x[2000:], y[2000:])
        assert abs(accuracy - 0.5) < 5 * 0.5 / math.sqrt(2000)  # five standard errors of a fair coin


def test_nearest_centroid_matches_scikit_learn():
    from sklearn.neighbors import NearestCentroid

    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.8 * torch.randn(500, generator=g, dtype=torch.float64) > 0).long()
    reference = NearestCentroid().fit(x[:300].numpy(), y[:300].numpy()).score(x[300:].numpy(), y[300:].numpy())
    assert nearest_centroid_probe(x[:300], y[:300], x[300:], y[300:]) == pytest.approx(reference, abs=1e-12)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_logistic_regression_reaches_scikit_learns_optimum(num_classes):
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(num_classes)
    n, d, l2 = 400, 5, 0.05
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(d, num_classes, generator=g, dtype=torch.float64)
         + torch.randn(n, num_classes, generator=g, dtype=torch.float64)).argmax(1)
    weight, bias = fit_logistic_regression(x, y, l2=l2)
    ours = torch.softmax(x @ weight.T + bias, dim=1).numpy()
    # scikit-learn minimizes C Σ loss + ||w||²/2; two classes use one vector w = W_1 - W_0, whose penalty is half ours
    c = (2.0 if num_classes == 2 else 1.0) / (l2 * n)
    reference = LogisticRegression(C=c, tol=1e-12, max_iter=10_000).fit(x.numpy(), y.numpy()).predict_proba(x.numpy())
    np.testing.assert_allclose(ours, reference, atol=1e-6)


def test_logistic_probe_is_deterministic():
    x, y = separable(3, n=300, margin=0.0)
    first = logistic_regression_probe(x[:200], y[:200], x[200:], y[200:])
    assert logistic_regression_probe(x[:200], y[:200], x[200:], y[200:]) == first


# -- PCA -------------------------------------------------------------------------------------------


@given(seeds, st.integers(3, 40), st.integers(2, 12))
def test_pca_2d_matches_numpy_svd_up_to_sign(seed, n, d):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(4, 0.5, d, dtype=torch.float64)
    centred = x.numpy() - x.numpy().mean(0)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    assume(s[0] - s[1] > 1e-3 * s[0] and (len(s) == 2 or s[1] - s[2] > 1e-3 * s[0]))  # else a direction is not unique
    expected = u[:, :2] * s[:2]
    ours, share = pca_2d(x, return_variance=True)
    for k in range(2):
        sign = np.sign(ours[:, k].numpy() @ expected[:, k])
        np.testing.assert_allclose(ours[:, k].numpy(), sign * expected[:, k], atol=1e-9 * s[0])
    np.testing.assert_allclose(share.numpy(), s[:2] ** 2 / (s ** 2).sum(), rtol=1e-10)


def test_pca_2d_agrees_with_torch_pca_lowrank():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 10, generator=g, dtype=torch.float64) * torch.tensor([5, 3, 1, 1, 1, 1, 1, 1, 1, 1.0], dtype=torch.float64) + 7
    torch.manual_seed(0)
    u, s, v = torch.pca_lowrank(x, q=4, center=True, niter=10)
    reference = (x - x.mean(0)) @ v[:, :2]
    ours = pca_2d(x)
    for k in range(2):
        assert torch.allclose(ours[:, k].abs(), reference[:, k].abs(), atol=1e-8)
    assert abs(float(ours[:, 0] @ reference[:, 0])) == pytest.approx(float(reference[:, 0] @ reference[:, 0]), rel=1e-10)


def test_pca_2d_signs_are_deterministic_and_coordinates_centred():
    x = torch.randn(50, 6, dtype=torch.float64)
    a, b = pca_2d(x), pca_2d(x.clone())
    assert torch.equal(a, b)
    assert torch.allclose(a.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError):
        pca_2d(torch.randn(5, 1))


def test_plot_embeddings_2d_writes_a_png(tmp_path):
    points, labels = torch.randn(40, 2), torch.randint(2, (40,))
    path = plot_embeddings_2d({"before": (points, labels), "after": (points * 2, labels)}, tmp_path / "pca.png")
    assert path.exists() and path.stat().st_size > 1000


# -- Sentence embeddings and SimCSE ---------------------------------------------------------------


def tiny_bert(dropout=0.1, seed=0):
    torch.manual_seed(seed)
    return BertForPreTraining(BertConfig(vocab_size=50, max_len=16, n_layer=1, n_head=2, n_embd=16, dropout=dropout))


def test_sentence_embeddings_poolings():
    model = tiny_bert().eval()
    ids = torch.tensor([[2, 7, 8, 3, 0, 0], [2, 9, 10, 11, 12, 3]])
    mask = (ids != 0).long()
    hidden, pooled = model.bert(ids, attention_mask=mask)
    assert torch.equal(sentence_embeddings(model, ids, mask, "cls"), hidden[:, 0])
    assert torch.equal(sentence_embeddings(model.bert, ids, mask, "pooler"), pooled)
    mean = sentence_embeddings(model, ids, mask, "mean")
    assert torch.allclose(mean[0], hidden[0, :4].mean(0), atol=1e-6) and torch.allclose(mean[1], hidden[1].mean(0), atol=1e-6)
    alone = sentence_embeddings(model, ids[:1, :4], mask[:1, :4], "mean")  # padding changes nothing
    assert torch.allclose(alone[0], mean[0], atol=1e-5)
    embedded = embed_sentences(model, [[2, 7, 8, 3], [2, 9, 10, 11, 12, 3]], pad_id=0, pooling="mean", batch_size=1)
    assert torch.allclose(embedded, mean, atol=1e-5)


def test_dropout_makes_two_views_and_set_dropout_zero_removes_them():
    model = tiny_bert().train()
    ids = torch.tensor([[2, 7, 8, 9, 3]])
    assert not torch.allclose(sentence_embeddings(model, ids), sentence_embeddings(model, ids))
    set_dropout(model, 0.0)
    assert model.config.dropout == 0.0
    assert torch.allclose(sentence_embeddings(model, ids), sentence_embeddings(model, ids))


def sentences(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [[2, *torch.randint(5, 50, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist(), 3]
            for _ in range(n)]


def test_simcse_batches_are_distinct_sentences_and_uniform():
    train = [[2, i, 3] if i % 2 else [2, i, i, i, 3] for i in range(5, 45)]
    task = SimCSETask(train, train[:4], pad_id=0, length_grouping=4)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(50)
    for _ in range(400):
        batch = task.sample_batch(8, g, "cpu")
        middle = batch.input_ids[:, 1]
        assert len(torch.unique(middle)) == 8  # no sentence twice
        assert len(torch.unique(batch.attention_mask.sum(1))) <= 2  # a run of the drawn 32 sorted by length: one boundary at most
        counts[middle] += 1
    share = counts[5:45] / counts.sum()
    assert torch.all((share - 1 / 40).abs() < 5 * math.sqrt(1 / 40 * (39 / 40) / 3200))


def test_simcse_validation_is_deterministic_with_full_batches_of_the_eval_size():
    model = tiny_bert()
    task = SimCSETask(sentences(40, 0), sentences(21, 1), pad_id=0, eval_batch_size=10)
    batches = list(task.eval_batches(999, "cpu"))
    assert [len(b) for b in batches] == [10, 10]
    model.eval()
    with torch.no_grad():
        first = [task.loss(model, b).item() for b in batches]
        torch.manual_seed(123)  # the global RNG state does not matter, and is left as it was
        state = torch.get_rng_state()
        second = [task.loss(model, b).item() for b in batches]
        assert torch.equal(state, torch.get_rng_state())
    assert first == second and not model.training
    model.train()  # the same as the training objective under the task's seed: dropout on
    torch.manual_seed(task.eval_seed)
    with torch.no_grad():
        assert task._two_view_loss(model, batches[0]).item() == pytest.approx(first[0], rel=1e-6)
        assert task.loss(model.eval(), batches[0]).item() != pytest.approx(
            info_nce(*[sentence_embeddings(model, batches[0].input_ids, batches[0].attention_mask)] * 2, 0.05).item())


def test_simcse_trains_with_the_shared_trainer(tmp_path):
    from minillm.train import TrainConfig, Trainer

    model = tiny_bert(dropout=0.1).bert
    task = SimCSETask(sentences(200, 0), sentences(40, 1), pad_id=0, temperature=0.05, pooling="cls", eval_batch_size=20)
    config = TrainConfig(out=str(tmp_path / "run"), max_iters=30, batch_size=16, lr=3e-3, warmup_iters=3, eval_interval=15,
                         eval_iters=2, progress=False, device="cpu", compile="no")
    with torch.no_grad():
        before = sum(task.loss(model.eval(), b).item() for b in task.eval_batches(20, "cpu")) / 2
    result = Trainer(model, task, config, {"model": {"type": "bert-encoder"}}, log=lambda message: None).fit()
    assert math.isfinite(result.val_loss) and result.steps == 30
    assert result.val_loss < before
    assert (tmp_path / "run" / "loss.png").exists()
