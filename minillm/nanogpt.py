"""nanoGPT, re-typed: the reference minillm races (``python -m minillm bench --compare`` and ``--whole-run``).

Karpathy's nanoGPT (``model.py`` and ``train.py``) is the usual yardstick for a small GPT's training
speed. :class:`ReferenceGPT` is the same model written nanoGPT's way, and :func:`nanogpt_recipe` its
``train.py`` loop for the Tiny Shakespeare CPU recipe; both are re-typed from their description (no code
copied), so that a difference in speed is a difference in implementation, not in the model or recipe.
"""

from __future__ import annotations

import json
import math
import pathlib
import time

import numpy as np
import torch

from minillm import data
from minillm.device import autocast, maybe_compile
from minillm.gpt import GPTConfig


class ReferenceGPT(torch.nn.Module):
    """The same model written the way nanoGPT writes it, for a side-by-side timing (``--compare``).

    One fused ``c_attn`` Linear for q, k and v, ``nn.LayerNorm``, ``nn.GELU``, the fused SDPA kernel,
    a tied output layer: what nanoGPT's ``model.py`` computes, so that a difference in speed is a
    difference in implementation, not in the model. Stepped by ``torch.optim.AdamW`` with its
    defaults on the device, as nanoGPT's CPU recipe does.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        d, bias = config.n_embd, config.bias
        self.n_head, self.dropout = config.n_head, config.dropout
        self.wte = torch.nn.Embedding(config.vocab_size, d)
        self.wpe = torch.nn.Embedding(config.block_size, d)
        self.drop = torch.nn.Dropout(config.dropout)
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({
            "ln_1": torch.nn.LayerNorm(d, bias=bias), "c_attn": torch.nn.Linear(d, 3 * d, bias=bias),
            "c_proj": torch.nn.Linear(d, d, bias=bias), "resid_dropout": torch.nn.Dropout(config.dropout),
            "ln_2": torch.nn.LayerNorm(d, bias=bias), "c_fc": torch.nn.Linear(d, 4 * d, bias=bias), "gelu": torch.nn.GELU(),
            "mlp_proj": torch.nn.Linear(4 * d, d, bias=bias), "mlp_dropout": torch.nn.Dropout(config.dropout)})
            for _ in range(config.n_layer))
        self.ln_f = torch.nn.LayerNorm(d, bias=bias)
        self.lm_head = torch.nn.Linear(d, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for module in self.modules():  # nanoGPT's (GPT-2's) init: N(0, 0.02), zero biases, scaled residual outputs
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        for block in self.blocks:
            for projection in (block["c_proj"], block["mlp_proj"]):
                torch.nn.init.normal_(projection.weight, mean=0.0, std=0.02 / (2 * config.n_layer) ** 0.5)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor):
        batch, length = idx.shape
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(length, device=idx.device)))  # (B, T, C)
        for block in self.blocks:
            q, k, v = block["c_attn"](block["ln_1"](x)).split(x.shape[-1], dim=2)
            q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                 dropout_p=self.dropout if self.training else 0.0)
            x = x + block["resid_dropout"](block["c_proj"](y.transpose(1, 2).reshape(batch, length, -1)))  # (B, T, C)
            x = x + block["mlp_dropout"](block["mlp_proj"](block["gelu"](block["c_fc"](block["ln_2"](x)))))
        logits = self.lm_head(self.ln_f(x))
        return logits, torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))



def nanogpt_precision(device: torch.device) -> str:
    """What nanoGPT's train.py runs in: fp32 on a CPU (no autocast there), bf16 autocast on a CUDA GPU that has it."""
    return "auto" if device.type == "cuda" else "fp32"



def nanogpt_optimizer(model: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """nanoGPT's ``configure_optimizers``: torch's AdamW, decay 0.1 on matrices, betas (0.9, 0.99), fused on CUDA."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.99), fused=device.type == "cuda")



def nanogpt_recipe(corpus: str, out: str, n_layer: int, n_head: int, n_embd: int, block_size: int, batch_size: int,
                   max_iters: int, dropout: float = 0.0, bias: bool = False, lr: float = 1e-3, min_lr: float = 1e-4,
                   warmup_iters: int = 100, eval_interval: int = 250, eval_iters: int = 20, device: str = "cpu",
                   compile: bool = False, seed: int = 1337) -> dict:
    """nanoGPT's ``train.py`` as its README runs it on a CPU for Tiny Shakespeare, re-typed (no code copied)::

        python data/shakespeare_char/prepare.py
        python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
               --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
               --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

    Its parts, in its order: ``prepare.py`` (every character of the file is a token, the first 90%
    trains, uint16 ``train.bin`` / ``val.bin``); a fresh ``np.memmap`` and ``torch.stack`` of B random
    blocks per batch; an estimate of both splits' loss (``eval_iters`` batches each) every
    ``eval_interval`` steps with ``ckpt.pt`` saved (``torch.save``) when validation improves;
    warmup + cosine from ``lr`` to ``min_lr``; torch's AdamW; clipping at 1.0; ``loss.item()`` every
    step (``log_interval=1``); steps 0 .. ``max_iters`` inclusive. The model is :class:`ReferenceGPT`.
    Returns the last validation estimate, ``finished_at`` (the wall clock when nanoGPT would exit) and,
    computed after that, the whole validation split's loss (nanoGPT itself reports only its estimate).
    """
    device = torch.device(device)
    out_dir = pathlib.Path(out)
    text = data.read_text_file(corpus)  # prepare.py
    chars = sorted(set(text))
    lookup = np.zeros(max(map(ord, chars)) + 1, dtype=np.uint16)
    lookup[[ord(c) for c in chars]] = np.arange(len(chars), dtype=np.uint16)
    ids = lookup[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]
    n_train = int(len(ids) * 0.9)
    ids[:n_train].tofile(out_dir / "train.bin")
    ids[n_train:].tofile(out_dir / "val.bin")

    def get_batch(split: str):
        split_ids = np.memmap(out_dir / f"{split}.bin", dtype=np.uint16, mode="r")
        starts = torch.randint(len(split_ids) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy(split_ids[i:i + block_size].astype(np.int64)) for i in starts])
        y = torch.stack([torch.from_numpy(split_ids[i + 1:i + 1 + block_size].astype(np.int64)) for i in starts])
        return x.to(device), y.to(device)

    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=len(chars), block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                       dropout=dropout, bias=bias)
    model = ReferenceGPT(config).to(device)
    optimizer = nanogpt_optimizer(model, lr, device)
    maybe_compile(model, device, enabled=compile)
    precision = nanogpt_precision(device)

    @torch.no_grad()
    def estimate_loss() -> dict:
        model.eval()
        losses = {}
        for split in ("train", "val"):
            total = 0.0
            for _ in range(eval_iters):
                x, y = get_batch(split)
                with autocast(device, precision=precision):
                    total += model(x, y)[1].item()
            losses[split] = total / eval_iters
        model.train()
        return losses

    def get_lr(step: int) -> float:
        if step < warmup_iters:
            return lr * (step + 1) / (warmup_iters + 1)
        if step > max_iters:
            return min_lr
        coefficient = 0.5 * (1.0 + math.cos(math.pi * (step - warmup_iters) / (max_iters - warmup_iters)))
        return min_lr + coefficient * (lr - min_lr)

    best_val_loss, losses = math.inf, {}
    x, y = get_batch("train")
    for step in range(max_iters + 1):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step)
        if step % eval_interval == 0:
            losses = estimate_loss()
            print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
            if losses["val"] < best_val_loss:
                best_val_loss = losses["val"]
                if step > 0:
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": step,
                                "best_val_loss": best_val_loss}, out_dir / "ckpt.pt")
        with autocast(device, precision=precision):
            _, loss = model(x, y)
        x, y = get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # log_interval=1: a host sync and a print every step
    finished_at = time.time()  # nanoGPT's train.py ends here; what follows is not timed
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():  # the whole validation split, every block once, as minillm reports it
        for x, y in data.iter_lm_blocks(ids[n_train:], block_size, 4 * batch_size, device):
            with autocast(device, precision=precision):
                total += model(x, y)[1].item() * y.numel()
            count += y.numel()
    return {"finished_at": finished_at, "val_loss_estimate": losses.get("val", math.nan), "val_loss": total / count}



def _nanogpt_child(arguments: str) -> None:
    """Entry point of the subprocess that runs :func:`nanogpt_recipe` and prints its result as JSON."""
    result = nanogpt_recipe(**json.loads(arguments))
    print("RESULT " + json.dumps(result), flush=True)
