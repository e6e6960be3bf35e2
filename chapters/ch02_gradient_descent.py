"""Chapter 02: gradient descent, from hand-derived gradients to Adam, AdamW and LAMB.

Part 1 fits a linear regression with gradients derived by hand, with autograd, and in closed
form, and stops it by each convergence criterion. Part 2 races the hand-written optimizers of
minillm.optim on a real problem: a bag-of-words sentiment classifier on SST-2.

    python chapters/ch02_gradient_descent.py            # the full chapter (about a minute on a CPU)
    python chapters/ch02_gradient_descent.py --quick    # seconds; what the tests run
"""

from __future__ import annotations

import pathlib
import time
from dataclasses import asdict, dataclass, field

import torch

from minillm import bow, datasets, linreg, optim, plots
from minillm.config import QuickConfig, run_chapter
from minillm.device import seed_everything
from minillm.files import write_json
from minillm.tokenization import WordTokenizer


@dataclass
class Config(QuickConfig):
    """Chapter 02: linear regression by hand, then SGD, momentum, RMSprop, Adam, AdamW and LAMB race on SST-2."""

    n_samples: int = field(default=500, metadata={"help": "samples in the synthetic regression problem"})
    n_features: int = field(default=5, metadata={"help": "features in the synthetic regression problem"})
    gd_lr: float = field(default=0.1, metadata={"help": "gradient-descent step size for the linear regression"})
    race_steps: int = field(default=1500, metadata={"help": "optimizer steps per racer (526 steps = one SST-2 epoch)"})
    batch_size: int = field(default=128, metadata={"help": "sentences per minibatch"})
    n_train: int = field(default=0, metadata={"help": "SST-2 training phrases to use (0: all 67,349)"})
    max_words: int = field(default=20_000, metadata={"help": "vocabulary size (words seen at least twice)"})
    embed_dim: int = field(default=64, metadata={"help": "word-vector width of the classifier"})
    warmup: float = field(default=0.05, metadata={"help": "fraction of steps of linear warmup before cosine decay"})
    lr_sgd: float = field(default=5.0, metadata={"help": "peak learning rate of plain SGD"})
    lr_momentum: float = field(default=1.0, metadata={"help": "peak learning rate of SGD with momentum 0.9"})
    lr_rmsprop: float = field(default=3e-3, metadata={"help": "peak learning rate of RMSprop"})
    lr_adam: float = field(default=3e-3, metadata={"help": "peak learning rate of Adam"})
    lr_adamw: float = field(default=3e-3, metadata={"help": "peak learning rate of AdamW (weight decay 0.01)"})
    lr_lamb: float = field(default=1e-2, metadata={"help": "peak learning rate of LAMB (weight decay 0.01)"})
    seed: int = field(default=1337, metadata={"help": "random seed"})
    out: str = field(default="runs/ch02", metadata={"help": "folder for plots and results.json"})
    QUICK = {"race_steps": 60, "n_train": 4000, "max_words": 5000}

    def validate(self):
        for name in ("n_samples", "n_features", "race_steps", "batch_size", "max_words", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.n_samples < 2 * self.n_features + 4:
            raise ValueError(f"--n-samples must be at least 2 * n_features + 4 = {2 * self.n_features + 4}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"--warmup must be in [0, 1), got {self.warmup}")


def linear_regression(config: Config, out: pathlib.Path) -> dict:
    """Part 1: the same fit by hand-derived gradients, by autograd, and in closed form."""
    generator = torch.Generator().manual_seed(config.seed)
    X = torch.randn(config.n_samples, config.n_features, generator=generator, dtype=torch.float64)
    w_true = torch.linspace(-2, 2, config.n_features, dtype=torch.float64)
    y = X @ w_true + 0.5 + 0.3 * torch.randn(config.n_samples, generator=generator, dtype=torch.float64)
    n_val = config.n_samples // 5
    X_train, y_train, X_val, y_val = X[n_val:], y[n_val:], X[:n_val], y[:n_val]

    w0 = torch.zeros(config.n_features, dtype=torch.float64)
    dw, db = linreg.mse_gradients(X_train, y_train, w0, 0.0)
    dw_auto, db_auto = linreg.autograd_gradients(X_train, y_train, w0, 0.0)
    print(f"1. Hand-derived gradient vs autograd at w = 0: max difference {(dw - dw_auto).abs().max().item():.1e}")

    manual = linreg.fit(X_train, y_train, lr=config.gd_lr, max_iters=300, gradients="manual")
    auto = linreg.fit(X_train, y_train, lr=config.gd_lr, max_iters=300, gradients="autograd")
    w_ls, b_ls = linreg.least_squares(X_train, y_train)
    ls_loss = linreg.mse_loss(X_train, y_train, w_ls, b_ls).item()
    print(f"   300 steps of gradient descent: loss {manual.train_loss[-1]:.6f} by hand, {auto.train_loss[-1]:.6f} by autograd;"
          f" closed form {ls_loss:.6f}; |w_gd - w_closed| = {(manual.w - w_ls).abs().max().item():.1e}")

    print("   Convergence criteria (which one stopped the loop, after how many iterations):")
    runs = {
        "loss below 0.095": dict(loss_threshold=0.095),
        "val loss stalls (patience 10)": dict(X_val=X_val, y_val=y_val, patience=10, min_delta=1e-6),
        "max_iters = 50": dict(max_iters=50),
    }
    criteria = {}
    for label, kwargs in runs.items():
        result = linreg.fit(X_train, y_train, lr=config.gd_lr, **{"max_iters": 5000, **kwargs})
        criteria[label] = {"stop_reason": result.stop_reason, "iterations": result.n_iters, "train_loss": result.train_loss[-1]}
        print(f"   {label:<32} stop={result.stop_reason:<15} iterations={result.n_iters:<5} loss={result.train_loss[-1]:.5f}")

    def gap(losses):  # distance to the closed-form minimum; floored so the log scale can show 0
        return [max(loss - ls_loss, 1e-16) for loss in losses]

    plots.plot_loss_curves({"hand-derived gradients": gap(manual.train_loss), "autograd (same curve)": gap(auto.train_loss)},
                           out / "linreg.png", title="Linear regression: gradient descent converges to the closed form",
                           xlabel="iteration", ylabel="training MSE minus the closed-form minimum", logy=True)
    return {"gradient_max_diff": (dw - dw_auto).abs().max().item(), "gd_loss": manual.train_loss[-1],
            "closed_form_loss": ls_loss, "w_max_diff": (manual.w - w_ls).abs().max().item(), "criteria": criteria}


def optimizer_race(config: Config, out: pathlib.Path) -> dict:
    """Part 2: every optimizer trains the same model from the same init on the same batches."""
    train_sentences, train_labels = datasets.read_sst2("train")
    if config.n_train:
        train_sentences, train_labels = train_sentences[: config.n_train], train_labels[: config.n_train]
    dev_sentences, dev_labels = datasets.read_sst2("dev")
    tokenizer = WordTokenizer.train(train_sentences, max_words=config.max_words, min_count=2)
    train_bags = bow.encode_bags(tokenizer, train_sentences, train_labels)
    dev_bags = bow.encode_bags(tokenizer, dev_sentences, dev_labels)
    print(f"\n2. Optimizer race on SST-2: {len(train_bags):,} training phrases, {len(dev_bags)} dev sentences, "
          f"{len(tokenizer):,} words, {config.race_steps} steps of batch {config.batch_size}, warmup + cosine schedule")

    racers = {
        "SGD": (optim.SGD, dict(lr=config.lr_sgd)),
        "SGD + momentum": (optim.SGD, dict(lr=config.lr_momentum, momentum=0.9)),
        "RMSprop": (optim.RMSprop, dict(lr=config.lr_rmsprop)),
        "Adam": (optim.Adam, dict(lr=config.lr_adam)),
        "AdamW": (optim.AdamW, dict(lr=config.lr_adamw, weight_decay=0.01)),
        "LAMB": (optim.LAMB, dict(lr=config.lr_lamb, weight_decay=0.01)),
    }
    histories, table = {}, {}
    warmup_steps = int(config.warmup * config.race_steps)
    for name, (optimizer_class, settings) in racers.items():
        torch.manual_seed(config.seed)  # the same initial weights for every racer
        model = bow.BagOfWordsClassifier(len(tokenizer), config.embed_dim)
        optimizer = optimizer_class(model.parameters(), **settings)
        scheduler = optim.warmup_cosine_schedule(optimizer, warmup_steps, config.race_steps, min_lr_ratio=0.0)
        start = time.perf_counter()
        history = bow.fit(model, optimizer, train_bags, dev_bags, config.race_steps, config.batch_size, scheduler,
                            eval_every=max(1, config.race_steps // 15), seed=config.seed, description=name)
        seconds = time.perf_counter() - start
        histories[name] = history
        tail = history.train_loss[-50:]
        table[name] = {"lr": settings["lr"], "final_train_loss": sum(tail) / len(tail), "dev_accuracy": history.dev_accuracy[-1],
                       "best_dev_accuracy": max(history.dev_accuracy), "seconds": seconds}
        print(f"   {name:<15} peak lr {settings['lr']:<6g} train loss {table[name]['final_train_loss']:.3f}  "
              f"dev accuracy {history.dev_accuracy[-1]:.1%}  ({seconds:.1f} s)")

    plots.plot_panels([
        {"curves": {name: h.train_loss for name, h in histories.items()}, "smoothing": 0.95,
         "title": "training loss (smoothed)", "ylabel": "cross-entropy"},
        {"curves": {name: (h.eval_steps, h.dev_accuracy) for name, h in histories.items()},
         "title": "SST-2 dev accuracy", "ylabel": "accuracy"},
    ], out / "optimizer_race.png", title="Chapter 02: hand-written optimizers racing on SST-2 (bag of words)")
    plots.plot_lr_schedule(histories["Adam"].lr, out / "lr_schedule.png",
                           title=f"Linear warmup ({warmup_steps} steps) + cosine decay (Adam's peak {config.lr_adam:g})")
    return table


def main(config: Config) -> dict:
    out = pathlib.Path(config.out)
    seed_everything(config.seed)
    regression = linear_regression(config, out)
    race = optimizer_race(config, out)
    best = max(race, key=lambda name: race[name]["dev_accuracy"])
    summary = {"linear regression: GD loss vs closed form": f"{regression['gd_loss']:.5f} vs {regression['closed_form_loss']:.5f}",
               **{f"SST-2 dev accuracy, {name}": f"{row['dev_accuracy']:.1%}" for name, row in race.items()}}
    write_json(out / "results.json", {"linear_regression": regression, "optimizer_race": race, "best_optimizer": best,
                                      "config": asdict(config), "summary": summary})
    print(f"\nBest dev accuracy: {best} ({race[best]['dev_accuracy']:.1%}). "
          f"Saved {out / 'linreg.png'}, {out / 'optimizer_race.png'}, {out / 'lr_schedule.png'} and {out / 'results.json'}")
    return {"linear_regression": regression, "optimizer_race": race}


if __name__ == "__main__":
    run_chapter(main, Config)
