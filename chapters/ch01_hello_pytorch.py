"""Chapter 01: Hello PyTorch 2.x.

Tensors and broadcasting, autograd checked against a finite difference, an nn.Module, a
training loop, the device the work runs on, and torch.compile timed against eager mode.

    python chapters/ch01_hello_pytorch.py            # the full chapter (about a minute on a CPU)
    python chapters/ch01_hello_pytorch.py --quick    # seconds; what the tests run
"""

from __future__ import annotations

import pathlib
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from minillm import gradcheck, plots, timing
from minillm.config import QuickConfig, run_chapter
from minillm.device import describe_device, is_compiled, maybe_compile, pick_device, seed_everything
from minillm.files import write_json
from minillm.layers import MLP


@dataclass
class Config(QuickConfig):
    """Chapter 01: tensors, autograd, nn.Module, a training loop, devices and torch.compile."""

    steps: int = field(default=2000, metadata={"help": "training steps for the curve-fitting MLP"})
    lr: float = field(default=1e-2, metadata={"help": "Adam learning rate"})
    hidden: int = field(default=64, metadata={"help": "hidden width of the MLP"})
    bench_width: int = field(default=1024, metadata={"help": "width of the model timed eager vs compiled"})
    bench_batch: int = field(default=512, metadata={"help": "batch size of the timing runs"})
    compile: bool = field(default=True, metadata={"help": "time torch.compile against eager mode"})
    device: str = field(default="auto", metadata={"help": "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps"})
    seed: int = field(default=1337, metadata={"help": "random seed"})
    out: str = field(default="runs/ch01", metadata={"help": "folder for plots and results.json"})
    # --quick skips compiling: a cold torch.compile costs ~20 s on a CPU, and the suite
    # compiles once already (tests/test_device.py).
    QUICK = {"steps": 150, "bench_width": 128, "bench_batch": 64, "compile": False}

    def validate(self):
        for name in ("steps", "hidden", "bench_width", "bench_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")


def main(config: Config) -> dict:
    out = pathlib.Path(config.out)
    seed_everything(config.seed)
    device = pick_device(config.device)
    print(f"Running on {describe_device(device, 'fp32')} with torch {torch.__version__}")

    # 1. Tensors: n-dimensional arrays with a shape, a dtype and a device.
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)  # (2, 3)
    print(f"\n1. A tensor of shape {tuple(x.shape)}, dtype {x.dtype}, on {x.device}:\n{x}")
    # Broadcasting: a (2, 1) column and a (3,) row stretch to (2, 3) without copying.
    column, row = torch.tensor([[10.0], [20.0]]), torch.tensor([1.0, 2.0, 3.0])
    print(f"column (2, 1) + row (3,) -> {tuple((column + row).shape)}:\n{column + row}")

    # 2. Autograd: PyTorch records the operations and differentiates them backwards.
    def f(v: torch.Tensor) -> torch.Tensor:
        return (v**3 * torch.sin(v)).sum()  # df/dv_i = 3 v_i^2 sin v_i + v_i^3 cos v_i

    point = torch.randn(5, dtype=torch.float64)
    auto = gradcheck.autograd_gradient(f, point)
    numeric = gradcheck.numerical_gradient(f, point)
    formula = 3 * point**2 * torch.sin(point) + point**3 * torch.cos(point)
    grad_error = gradcheck.max_relative_error(auto, numeric)
    print(f"\n2. Gradient of sum(x^3 sin x): autograd vs central difference, max relative error {grad_error:.1e}; "
          f"vs the formula {gradcheck.max_relative_error(auto, formula):.1e}")

    # 3. nn.Module: parameters plus a forward function. 4. A training loop on the chosen device.
    xs = torch.linspace(-3, 3, 256).unsqueeze(1)  # (256, 1)
    ys = torch.sin(2 * xs) + 0.3 * xs + 0.1 * torch.randn_like(xs)  # a noisy curve to fit
    model = MLP([1, config.hidden, config.hidden, 1]).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n3. {model.__class__.__name__} with {n_params:,} parameters:\n{model}")
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    xs_dev, ys_dev = xs.to(device), ys.to(device)
    losses = []
    for step in tqdm(range(config.steps), desc="fit", disable=None):
        prediction = model(xs_dev)  # (256, 1)
        loss = torch.nn.functional.mse_loss(prediction, ys_dev)
        optimizer.zero_grad()  # gradients accumulate unless cleared
        loss.backward()  # d loss / d every parameter
        optimizer.step()  # theta <- theta - update
        losses.append(loss.item())
    print(f"4. Fitted in {config.steps} steps: MSE {losses[0]:.3f} -> {losses[-1]:.4f} (noise floor 0.01)")
    with torch.no_grad():
        fitted = model(xs_dev).cpu()
    plots.plot_loss_curves({"train MSE": losses}, out / "loss.png", title="Chapter 01: fitting a curve with an MLP", logy=True)
    plots.plot_panels([{"scatter": {"data": (xs.squeeze(1), ys.squeeze(1))}, "curves": {"MLP": (xs.squeeze(1), fitted.squeeze(1))},
                        "xlabel": "x", "ylabel": "y", "title": "The fitted curve"}], out / "fit.png")

    # 5. torch.compile: trace the model once, generate fused kernels, then run those.
    bench_model = MLP([config.bench_width] * 4, activation=torch.nn.GELU).to(device).eval()
    batch = torch.randn(config.bench_batch, config.bench_width, device=device)
    with torch.no_grad():
        eager_s = timing.time_callable(lambda: bench_model(batch), device)
        compiled_s = None
        if config.compile and is_compiled(maybe_compile(bench_model, device=device)):
            compiled_s = timing.time_callable(lambda: bench_model(batch), device)
    print(f"\n5. Forward of a {config.bench_width}-wide, 3-layer MLP on a batch of {config.bench_batch}: "
          f"eager {eager_s * 1e3:.2f} ms" + (f", compiled {compiled_s * 1e3:.2f} ms" if compiled_s else ", compiled: skipped"))

    results = {"device": describe_device(device, "fp32"), "grad_check_max_rel_error": grad_error,
               "final_train_mse": losses[-1], "eager_ms": eager_s * 1e3,
               "compiled_ms": compiled_s * 1e3 if compiled_s else None, "config": asdict(config)}
    summary = {"autograd vs finite difference (max rel. error)": f"{grad_error:.1e}",
               "MLP curve fit, final MSE": f"{losses[-1]:.4f}",
               "eager / compiled forward (ms)": f"{eager_s * 1e3:.2f} / " + (f"{compiled_s * 1e3:.2f}" if compiled_s else "n/a")}
    write_json(out / "results.json", {**results, "summary": summary})
    print(f"\nSaved {out / 'loss.png'}, {out / 'fit.png'} and {out / 'results.json'}")
    return results


if __name__ == "__main__":
    run_chapter(main, Config)
