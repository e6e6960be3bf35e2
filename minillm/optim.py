"""Optimizers and learning-rate schedules, written out with plain tensor arithmetic.

Every optimizer here is a ``torch.optim.Optimizer`` subclass with the same argument names,
defaults and per-parameter state names as its ``torch.optim`` namesake, so it drops into any
training loop (and loads a ``torch.optim`` state dict). Only the implementation switches
(``foreach``, ``fused``, ``capturable``, ``differentiable``) are left out: each ``step`` is a
plain Python loop over parameters (:class:`HandwrittenOptimizer`), and each class's ``update``
is the equations of its docstring, one line each.
``tests/test_optim.py`` checks every trajectory against ``torch.optim`` to 1e-7 relative.

Notation: :math:`\\theta_t` parameters, :math:`g_t = \\nabla_\\theta L(\\theta_{t-1})` gradient,
:math:`\\eta` learning rate, :math:`\\lambda` weight decay, :math:`t = 1, 2, \\dots` the step.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

Params = Iterable[torch.Tensor] | Iterable[dict]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_betas(betas: tuple[float, float]) -> None:
    _check(len(betas) == 2, f"betas must be a pair (beta1, beta2), got {betas!r}")
    for index, beta in enumerate(betas):
        _check(0.0 <= beta < 1.0, f"Invalid beta parameter at index {index}: {beta} (must be in [0, 1))")


def _gradient(param: torch.Tensor, maximize: bool, name: str) -> torch.Tensor:
    grad = param.grad
    if grad.is_sparse:
        raise RuntimeError(f"{name} does not support sparse gradients")
    if torch.is_complex(param):
        raise RuntimeError(f"{name} supports real-valued parameters only")
    return -grad if maximize else grad


def _zeros(param: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(param, memory_format=torch.preserve_format)


class HandwrittenOptimizer(Optimizer):
    """The loop every optimizer here shares; subclasses write only :meth:`update`.

    ``step`` re-evaluates the loss if given a closure, then calls ``update`` once per parameter
    that has a gradient (frozen or unused parameters are left alone, as in torch.optim).
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    grad = _gradient(param, group["maximize"], type(self).__name__)
                    self.update(param, grad, self.state[param], group)
        return loss

    def update(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        """Change ``param`` in place, given its gradient, its state dict and its param group's settings."""
        raise NotImplementedError


def _adam_moments(state: dict, param: torch.Tensor, grad: torch.Tensor, beta1: float, beta2: float) -> float:
    """Advance Adam's moment estimates in ``state``; return the new step count t.

    :math:`m_t = \\beta_1 m_{t-1} + (1 - \\beta_1) g_t` and :math:`v_t = \\beta_2 v_{t-1} + (1 - \\beta_2) g_t^2`,
    starting from zeros (hence the bias corrections :math:`1 - \\beta^t` Adam and LAMB apply).
    """
    if "step" not in state:
        state["step"] = torch.tensor(0.0)  # a tensor, as torch.optim keeps it, so state dicts interchange
        state["exp_avg"] = _zeros(param)
        state["exp_avg_sq"] = _zeros(param)
    state["step"] += 1
    state["exp_avg"].lerp_(grad, 1 - beta1)                                    # m_t = b1 m + (1-b1) g
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)     # v_t = b2 v + (1-b2) g^2
    return state["step"].item()


class SGD(HandwrittenOptimizer):
    """Stochastic gradient descent with momentum (Polyak 1964; Sutskever et al. 2013 for Nesterov).

    .. math::
        g_t &\\leftarrow g_t + \\lambda \\theta_{t-1}                       && \\text{(L2 weight decay)} \\\\
        b_t &= \\mu b_{t-1} + (1 - \\tau) g_t, \\quad b_1 = g_1          && \\text{(momentum buffer, dampening } \\tau) \\\\
        d_t &= g_t + \\mu b_t \\ \\text{(nesterov)} \\quad\\text{or}\\quad d_t = b_t \\\\
        \\theta_t &= \\theta_{t-1} - \\eta d_t

    Without momentum (:math:`\\mu = 0`) it is plain :math:`\\theta_t = \\theta_{t-1} - \\eta g_t`.
    """

    def __init__(self, params: Params, lr: float = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False):
        _check(lr >= 0.0, f"Invalid learning rate: {lr}")
        _check(momentum >= 0.0, f"Invalid momentum value: {momentum}")
        _check(weight_decay >= 0.0, f"Invalid weight_decay value: {weight_decay}")
        _check(not nesterov or (momentum > 0 and dampening == 0), "Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults)

    def update(self, param, grad, state, group):
        momentum = group["momentum"]
        if group["weight_decay"] != 0:
            grad = grad.add(param, alpha=group["weight_decay"])                  # g += wd theta
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.clone().detach()           # b_1 = g_1
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])      # b_t = mu b + (1-tau) g
            grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf   # d = g + mu b, or b
        param.add_(grad, alpha=-group["lr"])                                     # theta -= lr d


class RMSprop(HandwrittenOptimizer):
    """RMSprop (Hinton, Coursera lecture 6e, 2012), optionally centered (Graves 2013).

    .. math::
        g_t &\\leftarrow g_t + \\lambda \\theta_{t-1} \\\\
        v_t &= \\alpha v_{t-1} + (1 - \\alpha) g_t^2 \\\\
        \\bar g_t &= \\alpha \\bar g_{t-1} + (1 - \\alpha) g_t, \\quad
            \\tilde v_t = v_t - \\bar g_t^2 \\ \\text{(centered)}, \\ \\text{else } \\tilde v_t = v_t \\\\
        b_t &= \\mu b_{t-1} + g_t / (\\sqrt{\\tilde v_t} + \\epsilon), \\quad \\theta_t = \\theta_{t-1} - \\eta b_t
            \\ \\text{(momentum } \\mu > 0\\text{)} \\\\
        \\theta_t &= \\theta_{t-1} - \\eta\\, g_t / (\\sqrt{\\tilde v_t} + \\epsilon) \\ \\text{(otherwise)}
    """

    def __init__(self, params: Params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, momentum: float = 0, centered: bool = False, *, maximize: bool = False):
        _check(lr >= 0.0, f"Invalid learning rate: {lr}")
        _check(eps >= 0.0, f"Invalid epsilon value: {eps}")
        _check(momentum >= 0.0, f"Invalid momentum value: {momentum}")
        _check(weight_decay >= 0.0, f"Invalid weight_decay value: {weight_decay}")
        _check(alpha >= 0.0, f"Invalid alpha value: {alpha}")
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        centered=centered, maximize=maximize)
        super().__init__(params, defaults)

    def update(self, param, grad, state, group):
        alpha, eps, momentum = group["alpha"], group["eps"], group["momentum"]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["square_avg"] = _zeros(param)
            if momentum > 0:
                state["momentum_buffer"] = _zeros(param)
            if group["centered"]:
                state["grad_avg"] = _zeros(param)
        state["step"] += 1
        if group["weight_decay"] != 0:
            grad = grad.add(param, alpha=group["weight_decay"])                  # g += wd theta
        square_avg = state["square_avg"]
        square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)             # v = a v + (1-a) g^2
        if group["centered"]:
            grad_avg = state["grad_avg"]
            grad_avg.lerp_(grad, 1 - alpha)                                       # gbar = a gbar + (1-a) g
            denom = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_().add_(eps)  # sqrt(v - gbar^2) + eps
        else:
            denom = square_avg.sqrt().add_(eps)                                   # sqrt(v) + eps
        if momentum > 0:
            buf = state["momentum_buffer"]
            buf.mul_(momentum).addcdiv_(grad, denom)                             # b = mu b + g / denom
            param.add_(buf, alpha=-group["lr"])                                  # theta -= lr b
        else:
            param.addcdiv_(grad, denom, value=-group["lr"])                      # theta -= lr g / denom


class Adam(HandwrittenOptimizer):
    """Adam (Kingma & Ba, 2015), with AMSGrad (Reddi et al., 2018) as an option.

    .. math::
        g_t &\\leftarrow g_t + \\lambda \\theta_{t-1}
            \\quad \\text{(L2 penalty; with decoupled_weight_decay, AdamW's rule instead)} \\\\
        m_t &= \\beta_1 m_{t-1} + (1 - \\beta_1) g_t                && \\text{first moment} \\\\
        v_t &= \\beta_2 v_{t-1} + (1 - \\beta_2) g_t^2              && \\text{second moment} \\\\
        \\hat m_t &= m_t / (1 - \\beta_1^t), \\quad \\hat v_t = v_t / (1 - \\beta_2^t)  && \\text{bias correction} \\\\
        \\theta_t &= \\theta_{t-1} - \\eta\\, \\hat m_t / (\\sqrt{\\hat v_t} + \\epsilon)

    With ``amsgrad``, :math:`v_t` in the bias-corrected :math:`\\hat v_t` is replaced by the running
    maximum :math:`\\max(v_1, \\dots, v_t)`.
    """

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, decoupled_weight_decay: bool = False):
        _check(lr >= 0.0, f"Invalid learning rate: {lr}")
        _check(eps >= 0.0, f"Invalid epsilon value: {eps}")
        _check(weight_decay >= 0.0, f"Invalid weight_decay value: {weight_decay}")
        _check_betas(betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, foreach=foreach,
                        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One step. With ``foreach`` (the default, unless ``amsgrad``) each group's parameters are
        updated together by ``torch._foreach_*`` operations, the same element-wise arithmetic as
        :meth:`update` in ~10 calls per group instead of ~10 per parameter; ``foreach=False``
        runs :meth:`update` parameter by parameter. Both give the same numbers (tested)."""
        if not any(group["foreach"] is not False and not group["amsgrad"] for group in self.param_groups):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["foreach"] is False or group["amsgrad"]:
                for param in params:
                    self.update(param, _gradient(param, group["maximize"], type(self).__name__), self.state[param], group)
            elif params:
                self._foreach_update(params, [_gradient(p, group["maximize"], type(self).__name__) for p in params], group)
        return loss

    def _foreach_update(self, params: list[torch.Tensor], grads: list[torch.Tensor], group: dict) -> None:
        """:meth:`update`'s equations on lists of tensors, operation for operation."""
        lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        for param, state in zip(params, states):
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = _zeros(param)
                state["exp_avg_sq"] = _zeros(param)
        if weight_decay != 0:
            if group["decoupled_weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * weight_decay)                     # theta *= 1 - lr wd
            else:
                grads = torch._foreach_add(grads, params, alpha=weight_decay)          # g += wd theta
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1)
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)                                # m_t = b1 m + (1-b1) g
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)             # v_t = b2 v + (1-b2) g^2
        t = [step.item() for step in steps]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [(1 - beta2**step) ** 0.5 for step in t])
        torch._foreach_add_(denom, eps)                                                 # sqrt(v_hat) + eps
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1 - beta1**step) for step in t])

    def update(self, param, grad, state, group):
        lr, weight_decay = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        if weight_decay != 0:
            if group["decoupled_weight_decay"]:
                param.mul_(1 - lr * weight_decay)                                # theta *= 1 - lr wd
            else:
                grad = grad.add(param, alpha=weight_decay)                       # g += wd theta
        t = _adam_moments(state, param, grad, beta1, beta2)                      # m_t, v_t
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if group["amsgrad"]:
            if "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = _zeros(param)
            torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
            exp_avg_sq = state["max_exp_avg_sq"]                                 # max(v_1..v_t)
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        # theta -= lr m_hat / (sqrt(v_hat) + eps) with m_hat = m / bc1 and sqrt(v_hat) = sqrt(v) / sqrt(bc2).
        # The division by bc1 is folded into the scalar step size: one tensor operation fewer,
        # and exactly torch.optim's rounding, so trajectories agree to the last bit.
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(group["eps"])  # sqrt(v_hat) + eps
        param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)             # theta -= (lr / bc1) m / denom


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

    The decay shrinks the weights directly instead of entering the gradient, so it is not
    rescaled by Adam's per-coordinate step size:

    .. math::
        \\theta_{t-1} &\\leftarrow \\theta_{t-1} (1 - \\eta \\lambda) \\\\
        m_t, v_t, \\hat m_t, \\hat v_t &\\ \\text{as in Adam, from the raw gradient } g_t \\\\
        \\theta_t &= \\theta_{t-1} - \\eta\\, \\hat m_t / (\\sqrt{\\hat v_t} + \\epsilon)
    """

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=foreach, maximize=maximize, decoupled_weight_decay=True)


class LAMB(HandwrittenOptimizer):
    """LAMB: layer-wise adaptive moments for large-batch training (You et al., 2019, Algorithm 2).

    Adam's direction plus decoupled weight decay, rescaled per parameter tensor ("layer") by a
    trust ratio so that each layer's step is proportional to the size of its weights:

    .. math::
        m_t &= \\beta_1 m_{t-1} + (1 - \\beta_1) g_t, \\quad v_t = \\beta_2 v_{t-1} + (1 - \\beta_2) g_t^2 \\\\
        \\hat m_t &= m_t / (1 - \\beta_1^t), \\quad \\hat v_t = v_t / (1 - \\beta_2^t)
            \\quad \\text{(if bias_correction)} \\\\
        u_t &= \\hat m_t / (\\sqrt{\\hat v_t} + \\epsilon) + \\lambda \\theta_{t-1} \\\\
        r_t &= \\lVert \\theta_{t-1} \\rVert_2 / \\lVert u_t \\rVert_2
            \\quad (r_t = 1 \\text{ if either norm is } 0) \\\\
        \\theta_t &= \\theta_{t-1} - \\eta\\, r_t\\, u_t

    ``max_trust_ratio`` clips :math:`r_t` from above (None: no clipping). With
    ``layer_adaptation=False`` the trust ratio is fixed at 1 and LAMB is exactly AdamW.
    The last trust ratio of each parameter is kept in ``optimizer.state[p]["trust_ratio"]``.
    """

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, *, bias_correction: bool = True,
                 layer_adaptation: bool = True, max_trust_ratio: float | None = None, maximize: bool = False):
        _check(lr >= 0.0, f"Invalid learning rate: {lr}")
        _check(eps >= 0.0, f"Invalid epsilon value: {eps}")
        _check(weight_decay >= 0.0, f"Invalid weight_decay value: {weight_decay}")
        _check(max_trust_ratio is None or max_trust_ratio > 0, f"Invalid max_trust_ratio: {max_trust_ratio}")
        _check_betas(betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        layer_adaptation=layer_adaptation, max_trust_ratio=max_trust_ratio, maximize=maximize)
        super().__init__(params, defaults)

    def update(self, param, grad, state, group):
        beta1, beta2 = group["betas"]
        t = _adam_moments(state, param, grad, beta1, beta2)                      # m_t, v_t
        bias_correction1 = 1 - beta1**t if group["bias_correction"] else 1.0
        bias_correction2 = 1 - beta2**t if group["bias_correction"] else 1.0
        denom = (state["exp_avg_sq"] / bias_correction2).sqrt_().add_(group["eps"])  # sqrt(v_hat) + eps
        update = (state["exp_avg"] / bias_correction1).div_(denom)               # m_hat / (sqrt(v_hat) + eps)
        if group["weight_decay"] != 0:
            update.add_(param, alpha=group["weight_decay"])                      # u_t = ... + wd theta
        trust_ratio = torch.ones((), dtype=param.dtype, device=param.device)
        if group["layer_adaptation"]:
            weight_norm = torch.linalg.vector_norm(param)                        # ||theta||
            update_norm = torch.linalg.vector_norm(update)                       # ||u||
            trust_ratio = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm, trust_ratio)
            if group["max_trust_ratio"] is not None:
                trust_ratio = trust_ratio.clamp(max=group["max_trust_ratio"])
        state["trust_ratio"] = trust_ratio
        param.add_(update.mul_(trust_ratio), alpha=-group["lr"])                 # theta -= lr r u


# --------------------------------------------------------------------------------------------
# Learning-rate schedules
# --------------------------------------------------------------------------------------------


def warmup_cosine_lr(step: int, *, max_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup, then cosine decay to a floor; the learning rate of optimizer step ``step`` (0-based).

    .. math::
        \\eta(s) = \\begin{cases}
            \\eta_{\\max} \\cdot (s + 1) / W & s < W \\\\
            \\eta_{\\min} + \\tfrac12 (\\eta_{\\max} - \\eta_{\\min}) (1 + \\cos(\\pi \\frac{s - W}{S - W})) & W \\le s \\le S \\\\
            \\eta_{\\min} & s > S
        \\end{cases}

    with :math:`W` = ``warmup_steps`` and :math:`S` = ``total_steps``. Warmup (Goyal et al., 2017)
    keeps Adam's first, noisy second-moment estimates from taking huge steps; the cosine shape
    is SGDR's (Loshchilov & Hutter, 2017) without restarts, as GPT-2/3 and nanoGPT use it.
    """
    _check(warmup_steps >= 0, f"warmup_steps must be >= 0, got {warmup_steps}")
    _check(total_steps >= warmup_steps, f"total_steps ({total_steps}) must be >= warmup_steps ({warmup_steps})")
    _check(0.0 <= min_lr <= max_lr, f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    _check(step >= 0, f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_schedule(optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> LambdaLR:
    """A ``LambdaLR`` scheduler applying :func:`warmup_cosine_lr` to every param group's initial lr.

    Each group's learning rate at step ``s`` is ``initial_lr * warmup_cosine_lr(s, max_lr=1,
    min_lr=min_lr_ratio, ...)``; call ``scheduler.step()`` after each ``optimizer.step()``.
    """
    _check(0.0 <= min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    warmup_cosine_lr(0, max_lr=1.0, warmup_steps=warmup_steps, total_steps=total_steps, min_lr=min_lr_ratio)

    def factor(step: int) -> float:
        return warmup_cosine_lr(step, max_lr=1.0, warmup_steps=warmup_steps, total_steps=total_steps, min_lr=min_lr_ratio)

    return LambdaLR(optimizer, factor)


OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": SGD,
    "rmsprop": RMSprop,
    "adam": Adam,
    "adamw": AdamW,
    "lamb": LAMB,
}
