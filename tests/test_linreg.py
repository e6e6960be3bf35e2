"""minillm.linreg: hand-derived gradients against autograd, closed form against NumPy, GD convergence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from minillm import linreg


@st.composite
def regression_data(draw, min_extra_rows=0):
    d = draw(st.integers(1, 8))
    n = draw(st.integers(d + min_extra_rows + 1, d + min_extra_rows + 60))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    scale = draw(st.floats(0.1, 10.0))
    X = scale * torch.randn(n, d, generator=generator, dtype=torch.float64)
    w_true = torch.randn(d, generator=generator, dtype=torch.float64)
    noise = draw(st.floats(0.0, 1.0))
    y = X @ w_true + 0.5 + noise * torch.randn(n, generator=generator, dtype=torch.float64)
    w = torch.randn(d, generator=generator, dtype=torch.float64)
    b = torch.randn((), generator=generator, dtype=torch.float64)
    return X, y, w, b


@given(data=regression_data())
def test_mse_gradients_equal_autograd(data):
    """float64; both compute the same sums in a different order, so 1e-10 relative is ample."""
    X, y, w, b = data
    dw, db = linreg.mse_gradients(X, y, w, b)
    dw_ref, db_ref = linreg.autograd_gradients(X, y, w, b)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(db, db_ref, rtol=1e-10, atol=1e-10)


@given(data=regression_data())
def test_mse_gradients_match_central_finite_differences(data):
    """An autograd-free check of the derivation: (L(w + h e_i) - L(w - h e_i)) / 2h, error O(h^2)."""
    X, y, w, b = data
    dw, db = linreg.mse_gradients(X, y, w, b)
    h = 1e-6
    for i in range(len(w)):
        e = torch.zeros_like(w)
        e[i] = h
        numeric = (linreg.mse_loss(X, y, w + e, b) - linreg.mse_loss(X, y, w - e, b)) / (2 * h)
        assert numeric.item() == pytest.approx(dw[i].item(), rel=1e-5, abs=1e-5)
    numeric_b = (linreg.mse_loss(X, y, w, b + h) - linreg.mse_loss(X, y, w, b - h)) / (2 * h)
    assert numeric_b.item() == pytest.approx(db.item(), rel=1e-5, abs=1e-5)


def numpy_lstsq_with_intercept(X, y):
    design = np.hstack([X.numpy(), np.ones((X.shape[0], 1))])
    solution = np.linalg.lstsq(design, y.numpy(), rcond=None)[0]
    return solution[:-1], solution[-1]


@given(data=regression_data())
def test_least_squares_equals_numpy_lstsq(data):
    """Normal equations vs NumPy's SVD-based solver; errors scale with cond(X^T X) ~ 1e2 at most here."""
    X, y, _, _ = data
    w, b = linreg.least_squares(X, y)
    w_ref, b_ref = numpy_lstsq_with_intercept(X, y)
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-7, atol=1e-8)
    assert b.item() == pytest.approx(b_ref, rel=1e-7, abs=1e-8)


def test_least_squares_returns_the_minimum_norm_solution_when_features_outnumber_samples():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(4, 10, generator=generator, dtype=torch.float64)
    y = torch.randn(4, generator=generator, dtype=torch.float64)
    w, b = linreg.least_squares(X, y)
    torch.testing.assert_close(linreg.predict(X, w, b), y, rtol=1e-9, atol=1e-9)  # interpolates
    w_ref = np.linalg.lstsq(X.numpy() - X.numpy().mean(0), y.numpy() - y.numpy().mean(), rcond=None)[0]
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-8, atol=1e-10)


@given(data=regression_data(min_extra_rows=10))
def test_fit_converges_to_the_least_squares_solution_on_well_conditioned_data(data):
    """Step 1/L with L the largest eigenvalue of the Hessian H = 2/n [X 1]^T [X 1]; the error
    shrinks by (1 - 1/kappa) per step, so 40 kappa steps bring it below e^-40 of the start."""
    X, y, _, _ = data
    design = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], dim=1)
    eigenvalues = torch.linalg.eigvalsh(2 / len(X) * design.T @ design)
    kappa = (eigenvalues[-1] / eigenvalues[0]).item()
    assume(kappa < 200)
    result = linreg.fit(X, y, lr=1 / eigenvalues[-1].item(), max_iters=int(40 * kappa) + 10)
    w_ref, b_ref = linreg.least_squares(X, y)
    torch.testing.assert_close(result.w, w_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(result.b, b_ref, rtol=1e-6, atol=1e-6)
    assert result.stop_reason == "max_iters"
    assert all(later <= earlier + 1e-12 for earlier, later in zip(result.train_loss, result.train_loss[1:]))


def simple_problem(seed=0, n=200):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 + 0.1 * torch.randn(n, generator=generator, dtype=torch.float64)
    return X, y


def test_fit_stops_when_the_loss_falls_below_the_threshold():
    X, y = simple_problem()
    result = linreg.fit(X, y, lr=0.1, max_iters=10_000, loss_threshold=0.05)
    assert result.stop_reason == "loss_threshold"
    assert result.train_loss[-1] < 0.05 <= result.train_loss[-2]
    assert result.n_iters < 10_000


def test_fit_early_stopping_returns_the_parameters_with_the_best_validation_loss():
    X, y = simple_problem(n=40)
    X_val, y_val = simple_problem(seed=1, n=40)
    # a tiny min_delta improvement requirement that the later, flat part of training cannot meet
    result = linreg.fit(X, y, lr=0.05, max_iters=10_000, X_val=X_val, y_val=y_val, patience=5, min_delta=1e-4)
    assert result.stop_reason == "early_stopping"
    assert result.n_iters < 10_000
    best_val = linreg.mse_loss(X_val, y_val, result.w, result.b).item()
    assert best_val == pytest.approx(result.val_loss[result.best_iter])
    assert len(result.val_loss) - 1 - result.best_iter == 5


def test_fit_uses_all_iterations_without_other_criteria():
    X, y = simple_problem()
    result = linreg.fit(X, y, lr=0.01, max_iters=37)
    assert (result.stop_reason, result.n_iters) == ("max_iters", 37)


def test_fit_reports_divergence_instead_of_returning_nan_silently():
    X, y = simple_problem()
    result = linreg.fit(X, y, lr=50.0, max_iters=1000)
    assert result.stop_reason == "diverged"


def test_fit_with_manual_and_autograd_gradients_gives_the_same_history():
    X, y = simple_problem()
    manual = linreg.fit(X, y, lr=0.1, max_iters=50, gradients="manual")
    auto = linreg.fit(X, y, lr=0.1, max_iters=50, gradients="autograd")
    np.testing.assert_allclose(manual.train_loss, auto.train_loss, rtol=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=0.0), "lr must be positive"),
    (dict(max_iters=0), "max_iters"),
    (dict(patience=3), "validation set"),
])
def test_fit_rejects_impossible_settings(kwargs, message):
    X, y = simple_problem()
    with pytest.raises(ValueError, match=message):
        linreg.fit(X, y, **kwargs)


def test_shape_mistakes_are_reported_clearly():
    X, y = simple_problem()
    with pytest.raises(ValueError, match=r"y must have shape \(n,\)"):
        linreg.mse_gradients(X, y[:-1], torch.zeros(3, dtype=X.dtype), 0.0)
