"""Linear regression three ways: hand-derived gradients, gradient descent, and the closed form.

The model is :math:`\\hat y = Xw + b` with ``X`` of shape (n, d), ``w`` of shape (d,) and a scalar
``b``; the loss is the mean squared error

.. math::  L(w, b) = \\frac{1}{n} \\sum_i (x_i^\\top w + b - y_i)^2 = \\frac{1}{n}\\lVert Xw + b - y \\rVert^2 .

Differentiating with the chain rule (the residual is :math:`r = Xw + b - y`):

.. math::  \\frac{\\partial L}{\\partial w} = \\frac{2}{n} X^\\top r, \\qquad
           \\frac{\\partial L}{\\partial b} = \\frac{2}{n} \\sum_i r_i .

Setting both to zero gives the normal equations, solved in closed form by :func:`least_squares`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

GradientFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _check_shapes(X: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> None:
    if X.ndim != 2:
        raise ValueError(f"X must have shape (n, d), got {tuple(X.shape)}")
    if y.shape != (X.shape[0],):
        raise ValueError(f"y must have shape (n,) = ({X.shape[0]},), got {tuple(y.shape)}")
    if w is not None and w.shape != (X.shape[1],):
        raise ValueError(f"w must have shape (d,) = ({X.shape[1]},), got {tuple(w.shape)}")


def predict(X: torch.Tensor, w: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """:math:`\\hat y = Xw + b`, shape (n,)."""
    return X @ w + b


def mse_loss(X: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """:math:`L = \\frac1n \\lVert Xw + b - y \\rVert^2`, a scalar tensor."""
    residual = predict(X, w, b) - y  # (n,)
    return (residual * residual).mean()


def mse_gradients(
    X: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of :func:`mse_loss`, derived by hand (no autograd).

    :math:`\\partial L/\\partial w = \\frac2n X^\\top (Xw + b - y)`, shape (d,), and
    :math:`\\partial L/\\partial b = \\frac2n \\sum_i (x_i^\\top w + b - y_i)`, a scalar tensor.
    """
    _check_shapes(X, y, w)
    n = X.shape[0]
    residual = predict(X, w, b) - y  # (n,)
    dw = (2.0 / n) * (X.T @ residual)  # (d,)
    db = (2.0 / n) * residual.sum()  # ()
    return dw, db


def autograd_gradients(
    X: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same gradients as :func:`mse_gradients`, computed by PyTorch's autograd."""
    _check_shapes(X, y, w)
    w = w.detach().clone().requires_grad_(True)
    b = torch.as_tensor(b, dtype=X.dtype, device=X.device).detach().clone().requires_grad_(True)
    dw, db = torch.autograd.grad(mse_loss(X, y, w, b), (w, b))
    return dw, db


def least_squares(X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The minimiser of the MSE in closed form, from the normal equations.

    Centering removes the intercept: with :math:`\\bar x = \\frac1n\\sum_i x_i`,
    :math:`\\bar y = \\frac1n\\sum_i y_i`, :math:`X_c = X - \\bar x` and :math:`y_c = y - \\bar y`,

    .. math::  w = (X_c^\\top X_c)^{-1} X_c^\\top y_c, \\qquad b = \\bar y - \\bar x^\\top w .

    When :math:`X_c^\\top X_c` is singular (more features than independent samples) the
    minimum-norm solution is returned instead, as ``numpy.linalg.lstsq`` does.
    """
    _check_shapes(X, y)
    x_mean = X.mean(dim=0)  # (d,)
    y_mean = y.mean()  # ()
    Xc = X - x_mean  # (n, d)
    yc = y - y_mean  # (n,)
    gram = Xc.T @ Xc  # (d, d)
    rhs = Xc.T @ yc  # (d,)
    try:
        w = torch.linalg.solve(gram, rhs)
        if not torch.isfinite(w).all():
            raise torch.linalg.LinAlgError("non-finite solution")
        # An ill-conditioned Gram matrix solves "successfully" to a poor answer: check it.
        if torch.linalg.cond(gram) > 1.0 / torch.finfo(X.dtype).eps:
            raise torch.linalg.LinAlgError("ill-conditioned")
    except torch.linalg.LinAlgError:
        w = torch.linalg.lstsq(Xc, yc.unsqueeze(1), driver="gelsd" if X.device.type == "cpu" else None).solution.squeeze(1)
    b = y_mean - x_mean @ w
    return w, b


@dataclass
class FitResult:
    """What :func:`fit` returns: the parameters, the loss histories and why it stopped."""

    w: torch.Tensor
    b: torch.Tensor
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    stop_reason: Literal["loss_threshold", "early_stopping", "max_iters", "diverged"] = "max_iters"
    best_iter: int = 0  # index into val_loss of the best validation loss (0 without validation)

    @property
    def n_iters(self) -> int:
        return len(self.train_loss)


def fit(
    X: torch.Tensor,
    y: torch.Tensor,
    lr: float = 0.1,
    max_iters: int = 1000,
    loss_threshold: float | None = None,
    X_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
    patience: int | None = None,
    min_delta: float = 0.0,
    gradients: Literal["manual", "autograd"] | GradientFn = "manual",
    w0: torch.Tensor | None = None,
    b0: float = 0.0,
) -> FitResult:
    """Full-batch gradient descent :math:`\\theta \\leftarrow \\theta - \\eta \\nabla L(\\theta)` on the MSE.

    It stops at the first of three convergence criteria:

    1. ``loss_threshold``: the training loss fell below it (the fit is good enough);
    2. ``patience``: the validation loss (``X_val``, ``y_val``) has not improved by more than
       ``min_delta`` for ``patience`` iterations; the parameters with the best validation loss
       are returned, as early stopping does;
    3. ``max_iters``: the iteration budget ran out.

    A non-finite loss (a learning rate too large for the data) stops it with ``stop_reason="diverged"``.
    ``gradients`` is ``"manual"`` (:func:`mse_gradients`), ``"autograd"`` or a function with the
    same signature. The loss history is recorded before each update.
    """
    _check_shapes(X, y)
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if max_iters < 1:
        raise ValueError(f"max_iters must be at least 1, got {max_iters}")
    if patience is not None and (X_val is None or y_val is None):
        raise ValueError("patience needs a validation set: pass X_val and y_val")
    grad_fn: GradientFn = {"manual": mse_gradients, "autograd": autograd_gradients}.get(gradients, gradients)  # type: ignore[arg-type]
    if not callable(grad_fn):
        raise ValueError(f"gradients must be 'manual', 'autograd' or a function, got {gradients!r}")

    w = torch.zeros(X.shape[1], dtype=X.dtype, device=X.device) if w0 is None else w0.detach().clone()
    b = torch.tensor(float(b0), dtype=X.dtype, device=X.device)
    result = FitResult(w=w, b=b)
    best_val, best_params, since_best = math.inf, (w, b), 0
    for iteration in range(max_iters):
        loss = mse_loss(X, y, w, b).item()
        result.train_loss.append(loss)
        if not math.isfinite(loss):
            result.stop_reason = "diverged"
            break
        if X_val is not None and y_val is not None:
            val_loss = mse_loss(X_val, y_val, w, b).item()
            result.val_loss.append(val_loss)
            if val_loss < best_val - min_delta:
                best_val, best_params, since_best = val_loss, (w, b), 0
                result.best_iter = iteration
            else:
                since_best += 1
            if patience is not None and since_best >= patience:
                result.stop_reason = "early_stopping"
                w, b = best_params
                break
        if loss_threshold is not None and loss < loss_threshold:
            result.stop_reason = "loss_threshold"
            break
        dw, db = grad_fn(X, y, w, b)
        w, b = w - lr * dw, b - lr * db
    result.w, result.b = w, b
    return result
