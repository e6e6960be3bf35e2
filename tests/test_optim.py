"""minillm.optim against torch.optim: same trajectories, same defaults, same state.

Tolerance: trajectories are compared in float64 with rtol=1e-7 (the issue's bar) and
atol=1e-10. Both implementations do the same arithmetic in a slightly different order (for
example sqrt(v / c) instead of sqrt(v) / sqrt(c)), which costs a few ulps (~1e-16 relative)
per step; over 40 steps of a contracting problem that stays below 1e-13, so 1e-7 has six
orders of magnitude of headroom while still catching any wrong coefficient, which shows up
at the 1e-3 level or above after a few steps.
"""

from __future__ import annotations

import copy
import inspect
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minillm import optim

STEPS = 40
RTOL, ATOL = 1e-7, 1e-10


# ---------------------------------------------------------------------------------------------
# A small non-quadratic problem whose gradients stay bounded for any parameter values
# ---------------------------------------------------------------------------------------------


@st.composite
def problems(draw):
    """Shapes of 1-3 parameter tensors (one of them sometimes frozen) and a seed."""
    n_params = draw(st.integers(1, 3))
    shapes = [tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))) for _ in range(n_params)]
    return {"shapes": shapes, "seed": draw(st.integers(0, 2**31 - 1)), "freeze_last": draw(st.booleans())}


def make_params(problem):
    generator = torch.Generator().manual_seed(problem["seed"])
    params = [torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_() for shape in problem["shapes"]]
    targets = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in problem["shapes"]]
    return params, targets


def loss_fn(params, targets):
    """sum(log cosh(p - t)) + 0.05 sum(p^2): gradients tanh(p - t) + 0.1 p stay bounded."""
    total = torch.zeros((), dtype=torch.float64)
    for param, target in zip(params, targets):
        diff = param - target
        total = total + (diff.abs() + torch.nn.functional.softplus(-2 * diff.abs()) - math.log(2)).sum()
        total = total + 0.05 * (param * param).sum()
    return total


def trajectory(optimizer_cls, problem, steps=STEPS, groups=False, **settings):
    params, targets = make_params(problem)
    trainable = params[:-1] if problem["freeze_last"] and len(params) > 1 else params
    if groups and len(trainable) > 1:
        # a second param group with half the learning rate
        param_groups = [{"params": trainable[:1]}, {"params": trainable[1:], "lr": settings["lr"] / 2}]
        opt = optimizer_cls(param_groups, **settings)
    else:
        opt = optimizer_cls(trainable, **settings)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(params, targets).backward()
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history, opt


def assert_same_trajectory(ours, theirs):
    for step, (ours_step, theirs_step) in enumerate(zip(ours, theirs)):
        for ours_param, theirs_param in zip(ours_step, theirs_step):
            torch.testing.assert_close(ours_param, theirs_param, rtol=RTOL, atol=ATOL, msg=lambda m: f"step {step}: {m}")


lrs = st.floats(1e-4, 0.3)
weight_decays = st.one_of(st.just(0.0), st.floats(1e-4, 0.2))
betas = st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.9999))
epsilons = st.floats(1e-10, 1e-3)


@given(problem=problems(), lr=lrs, momentum=st.one_of(st.just(0.0), st.floats(0.0, 0.95)),
       dampening=st.floats(0.0, 0.5), nesterov=st.booleans(), weight_decay=weight_decays,
       maximize=st.booleans(), groups=st.booleans())
def test_sgd_matches_torch_sgd(problem, lr, momentum, dampening, nesterov, weight_decay, maximize, groups):
    if nesterov:
        momentum, dampening = max(momentum, 0.1), 0.0
    settings = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
    ours, _ = trajectory(optim.SGD, problem, groups=groups, **settings)
    theirs, _ = trajectory(torch.optim.SGD, problem, groups=groups, **settings)
    assert_same_trajectory(ours, theirs)


@given(problem=problems(), lr=st.floats(1e-4, 0.05), alpha=st.floats(0.5, 0.999), eps=epsilons,
       weight_decay=weight_decays, momentum=st.one_of(st.just(0.0), st.floats(0.0, 0.9)),
       centered=st.booleans(), maximize=st.booleans())
def test_rmsprop_matches_torch_rmsprop(problem, lr, alpha, eps, weight_decay, momentum, centered, maximize):
    settings = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered, maximize=maximize)
    ours, _ = trajectory(optim.RMSprop, problem, **settings)
    theirs, _ = trajectory(torch.optim.RMSprop, problem, **settings)
    assert_same_trajectory(ours, theirs)


@given(problem=problems(), lr=st.floats(1e-4, 0.1), betas=betas, eps=epsilons, weight_decay=weight_decays,
       amsgrad=st.booleans(), maximize=st.booleans(), decoupled=st.booleans(), groups=st.booleans())
def test_adam_matches_torch_adam(problem, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled, groups):
    settings = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                    decoupled_weight_decay=decoupled)
    ours, _ = trajectory(optim.Adam, problem, groups=groups, **settings)
    theirs, _ = trajectory(torch.optim.Adam, problem, groups=groups, **settings)
    assert_same_trajectory(ours, theirs)


@given(problem=problems(), lr=st.floats(1e-4, 0.1), betas=betas, eps=epsilons,
       weight_decay=st.floats(0.0, 0.5), amsgrad=st.booleans(), maximize=st.booleans())
def test_adamw_matches_torch_adamw(problem, lr, betas, eps, weight_decay, amsgrad, maximize):
    settings = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    ours, _ = trajectory(optim.AdamW, problem, **settings)
    theirs, _ = trajectory(torch.optim.AdamW, problem, **settings)
    assert_same_trajectory(ours, theirs)


@given(problem=problems(), lr=st.floats(1e-4, 0.1), betas=betas, eps=epsilons, weight_decay=weight_decays,
       maximize=st.booleans(), decoupled=st.booleans(), groups=st.booleans())
def test_adam_foreach_path_takes_the_same_steps_as_the_per_parameter_path(problem, lr, betas, eps, weight_decay,
                                                                         maximize, decoupled, groups):
    """The multi-tensor fast path does update()'s element-wise operations in the same order: equal to the bit."""
    settings = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                    decoupled_weight_decay=decoupled)
    fast, _ = trajectory(optim.Adam, problem, groups=groups, foreach=True, **settings)
    per_parameter, _ = trajectory(optim.Adam, problem, groups=groups, foreach=False, **settings)
    for fast_step, slow_step in zip(fast, per_parameter):
        assert all(torch.equal(a, b) for a, b in zip(fast_step, slow_step))
    theirs, _ = trajectory(torch.optim.Adam, problem, groups=groups, foreach=True, **settings)
    assert_same_trajectory(fast, theirs)


@pytest.mark.parametrize("name", ["SGD", "RMSprop", "Adam", "AdamW"])
def test_defaults_and_argument_names_match_torch_optim(name):
    ours = inspect.signature(getattr(optim, name)).parameters
    theirs = inspect.signature(getattr(torch.optim, name)).parameters
    implementation_switches = {"foreach", "fused", "capturable", "differentiable"}
    assert set(theirs) - implementation_switches <= set(ours) <= set(theirs)
    for arg in ours:
        assert ours[arg].default == theirs[arg].default, arg


@pytest.mark.parametrize("name, settings", [
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True)),
    ("Adam", dict(lr=0.01, amsgrad=True)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
])
def test_resuming_from_a_torch_optim_state_dict_continues_the_same_trajectory(name, settings):
    problem = {"shapes": [(3, 4), (4,)], "seed": 7, "freeze_last": False}
    params, targets = make_params(problem)
    torch_opt = getattr(torch.optim, name)(params, **settings)
    for _ in range(5):
        torch_opt.zero_grad()
        loss_fn(params, targets).backward()
        torch_opt.step()
    our_params = [p.detach().clone().requires_grad_() for p in params]
    our_opt = getattr(optim, name)(our_params, **settings)
    our_opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))  # state_dict() shares tensors
    for _ in range(10):
        for opt, ps in ((torch_opt, params), (our_opt, our_params)):
            opt.zero_grad()
            loss_fn(ps, targets).backward()
            opt.step()
    for ours, theirs in zip(our_params, params):
        torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL)
    assert set(our_opt.state[our_params[0]]) == set(torch_opt.state[params[0]])


# ---------------------------------------------------------------------------------------------
# LAMB: no torch.optim reference, so an independent NumPy transcription of the paper's formulas
# ---------------------------------------------------------------------------------------------


def lamb_reference_step(theta, m, v, g, t, lr, beta1, beta2, eps, weight_decay, max_trust_ratio=None):
    """One step of You et al. (2019), Algorithm 2, for one parameter tensor, in NumPy float64."""
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g**2
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    u = m_hat / (np.sqrt(v_hat) + eps) + weight_decay * theta
    w_norm, u_norm = np.linalg.norm(theta), np.linalg.norm(u)
    ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
    if max_trust_ratio is not None:
        ratio = min(ratio, max_trust_ratio)
    return theta - lr * ratio * u, ratio


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1),
       lr=st.floats(1e-4, 0.05), betas=betas, eps=st.floats(1e-8, 1e-4), weight_decay=weight_decays,
       max_trust_ratio=st.one_of(st.none(), st.floats(0.5, 10.0)))
def test_lamb_trust_ratio_and_steps_match_the_paper_formula(shape, seed, lr, betas, eps, weight_decay, max_trust_ratio):
    """Every step of a 40-step run equals the NumPy transcription applied to LAMB's own state.

    Step by step (not the whole trajectory) because with beta1 = 0 the dynamics can be chaotic,
    and two correct implementations that round differently drift apart by more than 1e-7 over
    40 steps; one step agrees to ~1e-15, so rtol=1e-10 leaves room and still catches any error.
    """
    rng = np.random.default_rng(seed)
    theta0, target = rng.normal(size=shape), rng.normal(size=shape)
    param = torch.tensor(theta0, requires_grad=True)
    opt = optim.LAMB([param], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_trust_ratio=max_trust_ratio)
    for t in range(1, STEPS + 1):
        opt.zero_grad()
        loss_fn([param], [torch.tensor(target)]).backward()
        theta, g = param.detach().numpy().copy(), param.grad.numpy().copy()
        state = opt.state[param]
        m = state["exp_avg"].numpy().copy() if state else np.zeros(shape)
        v = state["exp_avg_sq"].numpy().copy() if state else np.zeros(shape)
        expected_theta, expected_ratio = lamb_reference_step(theta, m, v, g, t, lr, *betas, eps, weight_decay, max_trust_ratio)
        opt.step()
        assert opt.state[param]["trust_ratio"].item() == pytest.approx(expected_ratio, rel=1e-10)
        np.testing.assert_allclose(param.detach().numpy(), expected_theta, rtol=1e-10, atol=1e-14)


@given(problem=problems(), lr=st.floats(1e-4, 0.1), betas=betas, eps=epsilons, weight_decay=st.floats(0.0, 0.5))
def test_lamb_without_layer_adaptation_takes_adamw_steps(problem, lr, betas, eps, weight_decay):
    """Step by step from the same parameters: LAMB writes u = m/(sqrt(v)+eps) + wd theta explicitly,
    AdamW folds the decay into a multiply, so their roundings differ by an ulp per step; comparing
    each step from synchronized parameters keeps a chaotic trajectory from amplifying that."""
    settings = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    params, targets = make_params(problem)
    lamb_params = [p.detach().clone().requires_grad_() for p in params]
    adamw = torch.optim.AdamW(params, **settings)
    lamb = optim.LAMB(lamb_params, layer_adaptation=False, **settings)
    for _ in range(STEPS):
        for opt, ps in ((adamw, params), (lamb, lamb_params)):
            opt.zero_grad()
            loss_fn(ps, targets).backward()
            opt.step()
        for ours, theirs in zip(lamb_params, params):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
            with torch.no_grad():
                ours.copy_(theirs)


def test_lamb_trust_ratio_is_one_for_zero_weights():
    param = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = optim.LAMB([param], lr=0.1)
    param.grad = torch.ones(4, dtype=torch.float64)
    opt.step()
    assert opt.state[param]["trust_ratio"].item() == 1.0
    assert torch.all(param < 0)  # it still moved, by lr * the Adam direction


def test_lamb_steps_every_layer_by_the_same_fraction_of_its_norm():
    """The point of LAMB: ||theta_t - theta_{t-1}|| = lr ||theta_{t-1}|| for every layer, whatever its gradient scale."""
    small = torch.full((10,), 0.01, dtype=torch.float64, requires_grad=True)
    large = torch.full((10,), 100.0, dtype=torch.float64, requires_grad=True)
    opt = optim.LAMB([small, large], lr=0.01, weight_decay=0.0)
    before = [small.detach().clone(), large.detach().clone()]
    small.grad = torch.linspace(-1000, 1000, 10, dtype=torch.float64)
    large.grad = torch.linspace(-1e-3, 2e-3, 10, dtype=torch.float64)
    opt.step()
    for old, new in zip(before, (small, large)):
        assert torch.linalg.vector_norm(new.detach() - old).item() == pytest.approx(0.01 * torch.linalg.vector_norm(old).item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda p: optim.SGD(p, lr=-1.0),
    lambda p: optim.SGD(p, lr=0.1, nesterov=True),
    lambda p: optim.Adam(p, betas=(1.0, 0.999)),
    lambda p: optim.AdamW(p, eps=-1e-8),
    lambda p: optim.RMSprop(p, momentum=-0.1),
    lambda p: optim.LAMB(p, weight_decay=-0.01),
])
def test_impossible_settings_raise_value_error(make):
    with pytest.raises(ValueError):
        make([torch.zeros(2, requires_grad=True)])


def test_parameters_without_gradients_are_left_alone():
    used, unused = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    for cls in optim.OPTIMIZERS.values():
        opt = cls([used, unused], lr=0.1)
        used.grad = torch.ones(3)
        opt.step()
        assert torch.equal(unused, torch.ones(3)) and unused not in opt.state


# ---------------------------------------------------------------------------------------------
# Warmup + cosine schedule
# ---------------------------------------------------------------------------------------------


schedules = st.tuples(st.integers(0, 50), st.integers(0, 500), st.floats(1e-5, 1.0), st.floats(0.0, 1.0)).map(
    lambda s: dict(warmup_steps=s[0], total_steps=s[0] + s[1], max_lr=s[2], min_lr=s[2] * s[3])
)


@given(schedule=schedules)
def test_warmup_cosine_rises_linearly_then_decays_monotonically_to_the_floor(schedule):
    W, S, top, floor = schedule["warmup_steps"], schedule["total_steps"], schedule["max_lr"], schedule["min_lr"]
    lrs = [optim.warmup_cosine_lr(step, **schedule) for step in range(S + 20)]
    for step in range(W):
        assert lrs[step] == pytest.approx(top * (step + 1) / W)
    if W < S:
        assert lrs[W] == pytest.approx(top)
        middle = (W + S) / 2
        if middle == int(middle):
            assert lrs[int(middle)] == pytest.approx((top + floor) / 2)
    decay = lrs[W:]
    assert all(later <= earlier + 1e-15 for earlier, later in zip(decay, decay[1:]))
    assert lrs[S:] == pytest.approx([floor] * 20)
    assert all(0 < lr <= top + 1e-15 for lr in lrs[:W])  # warmup starts near 0, even below the floor
    assert all(floor - 1e-15 <= lr <= top + 1e-15 for lr in lrs[W:])


@given(schedule=schedules, base_lr=st.floats(1e-4, 1.0))
def test_warmup_cosine_scheduler_sets_the_optimizer_learning_rate_step_by_step(schedule, base_lr):
    ratio = schedule["min_lr"] / schedule["max_lr"]
    opt = optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    scheduler = optim.warmup_cosine_schedule(opt, schedule["warmup_steps"], schedule["total_steps"], min_lr_ratio=ratio)
    for step in range(schedule["total_steps"] + 3):
        expected = optim.warmup_cosine_lr(step, max_lr=base_lr, warmup_steps=schedule["warmup_steps"],
                                          total_steps=schedule["total_steps"], min_lr=base_lr * ratio)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        opt.step()
        scheduler.step()


def test_warmup_cosine_rejects_a_decay_that_ends_before_warmup():
    with pytest.raises(ValueError, match="total_steps"):
        optim.warmup_cosine_lr(0, max_lr=1.0, warmup_steps=10, total_steps=5)
