"""Chapter 04: attention, from one softmax worked by hand to the attention maps a model learned.

Computes softmax(Q Kᵀ / sqrt(d_k) + M) V by hand and checks it against PyTorch with boolean, float,
causal and padding masks; measures why the 1/sqrt(d_k) is there; checks minillm's MultiHeadAttention
against torch.nn.MultiheadAttention and times its fused and hand-written paths; trains an
attention-only model to reverse digit sequences of varying length and reads its attention maps;
and decodes token by token with a KV cache.

    python chapters/ch04_attention.py            # the full chapter (under a minute on a 2-core CPU)
    python chapters/ch04_attention.py --quick    # seconds; what the tests run
"""

from __future__ import annotations

import math
import pathlib
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from minillm import plots
from minillm.attention import MultiHeadAttention, causal_mask, scaled_dot_product_attention
from minillm.config import QuickConfig, run_chapter
from minillm.device import describe_device, pick_device, seed_everything
from minillm.files import write_json
from minillm.reversal import AttentionOnlyModel, attention_mass_on, reversal_batch, sequence_accuracy, train_reversal
from minillm.timing import time_callable

DIGITS = 10


@dataclass
class Config(QuickConfig):
    """Chapter 04: scaled dot-product attention, masks, multi-head attention, learned attention maps, KV cache."""

    d_model: int = field(default=256, metadata={"help": "width of the multi-head attention compared, timed and decoded"})
    n_heads: int = field(default=8, metadata={"help": "heads of that multi-head attention"})
    bench_batch: int = field(default=8, metadata={"help": "batch size of the fused vs hand-written timing"})
    bench_len: int = field(default=256, metadata={"help": "sequence length of the fused vs hand-written timing"})
    decode_tokens: int = field(default=256, metadata={"help": "tokens decoded with and without the KV cache"})
    max_len: int = field(default=10, metadata={"help": "longest digit sequence the toy model reverses"})
    min_len: int = field(default=3, metadata={"help": "shortest digit sequence the toy model reverses"})
    toy_d_model: int = field(default=64, metadata={"help": "width of the toy reversal model"})
    toy_heads: int = field(default=2, metadata={"help": "attention heads per layer of the toy model"})
    toy_layers: int = field(default=2, metadata={"help": "attention layers of the toy model (a 1-layer one is trained to compare)"})
    steps: int = field(default=800, metadata={"help": "training steps of the toy model"})
    batch_size: int = field(default=128, metadata={"help": "sequences per training step"})
    lr: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate (warmup, then cosine decay)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps"})
    seed: int = field(default=1337, metadata={"help": "random seed"})
    out: str = field(default="runs/ch04", metadata={"help": "folder for plots and results.json"})
    QUICK = {"d_model": 64, "n_heads": 4, "bench_batch": 2, "bench_len": 64, "decode_tokens": 32, "max_len": 8,
             "toy_d_model": 32, "steps": 150, "batch_size": 64, "lr": 1e-2}

    def validate(self):
        for name in ("d_model", "n_heads", "bench_batch", "bench_len", "decode_tokens", "toy_d_model", "toy_heads",
                     "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.toy_layers < 2:
            raise ValueError(f"--toy-layers must be at least 2 (a 1-layer model is trained to compare), got {self.toy_layers}")
        if self.d_model % self.n_heads or self.toy_d_model % self.toy_heads:
            raise ValueError("--d-model must be divisible by --n-heads, and --toy-d-model by --toy-heads")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= --min-len <= --max-len, got {self.min_len} and {self.max_len}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def attention_by_hand() -> dict:
    """Part 1: softmax(Q Kᵀ / sqrt(d_k) + M) V for 4 positions of width 2, then every kind of mask."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]])  # (L=4, d_k=2)
    k = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [1.0, 1.0]])  # (S=4, d_k=2)
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]])  # (S=4, d_v=2)
    scores = q @ k.T / math.sqrt(q.shape[-1])  # (L, S): how well query i matches key j
    weights = torch.softmax(scores, dim=-1)  # (L, S): every row sums to 1
    output = weights @ v  # (L, d_v): each query's weighted average of the values
    torch_out = F.scaled_dot_product_attention(q, k, v)
    by_hand = max(max_diff(output, torch_out), max_diff(scaled_dot_product_attention(q, k, v), torch_out))
    print(f"1. Q Kᵀ / sqrt(2):\n{scores.numpy().round(3)}\n   softmax, row by row:\n{weights.numpy().round(3)}\n"
          f"   times V:\n{output.numpy().round(3)}\n   max |by hand - torch SDPA| = {by_hand:.1e} (minillm's function too)")

    causal = causal_mask(4, 4)  # (L, S) bool, True = may attend: key j <= query i
    additive = torch.zeros(4, 4).masked_fill(~causal, float("-inf"))  # the same mask as 0 / -inf added to the scores
    variants = [scaled_dot_product_attention(q, k, v, attn_mask=causal), scaled_dot_product_attention(q, k, v, attn_mask=additive),
                scaled_dot_product_attention(q, k, v, is_causal=True)]
    masks = max(max_diff(out, F.scaled_dot_product_attention(q, k, v, is_causal=True)) for out in variants)
    print(f"   Causal mask (True = may attend):\n{causal.int().numpy()}\n   as a float mask:\n{additive.numpy()}\n"
          f"   boolean mask, float mask and is_causal=True agree with torch to {masks:.1e}")
    padding = torch.tensor([False, False, False, True])  # key 3 is padding
    _, padded_weights = scaled_dot_product_attention(q, k, v, attn_mask=~padding, return_weights=True)  # (S,) broadcasts
    print(f"   Padding mask (key 3 is padding), weights:\n{padded_weights.numpy().round(3)}")
    blind = causal.clone()
    blind[0] = False  # query 0 may attend to nothing
    naive = torch.softmax(scores.masked_fill(~blind, float("-inf")), dim=-1)[0]
    ours, blind_weights = scaled_dot_product_attention(q, k, v, attn_mask=blind, return_weights=True)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=blind)
    print(f"   A row that may attend to nothing: naive softmax gives {naive.tolist()}; minillm defines weights "
          f"{blind_weights[0].tolist()} and output {ours[0].tolist()}; torch's kernel gives {theirs[0].tolist()}")
    return {"max_abs_diff_vs_torch": by_hand, "masks_max_abs_diff": masks}


def why_scale(out: pathlib.Path, generator: torch.Generator, n_keys: int = 16) -> dict:
    """Part 2: q·k of unit-variance vectors has variance d_k; unscaled, the softmax saturates."""
    dims, table = [2**p for p in range(1, 11)], {"var raw": [], "var scaled": [], "H raw": [], "H scaled": [], "max raw": []}
    for d_k in dims:
        q = torch.randn(500, 1, d_k, generator=generator)  # (N, 1, d_k)
        k = torch.randn(500, n_keys, d_k, generator=generator)  # (N, S, d_k)
        raw = (q * k).sum(-1)  # (N, S): dot products q·k_j
        for name, scores in (("raw", raw), ("scaled", raw / math.sqrt(d_k))):
            weights = torch.softmax(scores, dim=-1)  # (N, S)
            table[f"var {name}"].append(scores.var().item())
            table[f"H {name}"].append(torch.special.entr(weights).sum(-1).mean().item())  # entropy -Σ p ln p
        table["max raw"].append(torch.softmax(raw, dim=-1).max(-1).values.mean().item())
    print(f"\n2. Why 1/sqrt(d_k): q, k with N(0, 1) entries, {n_keys} keys; entropy H of the weights (uniform: ln {n_keys} = "
          f"{math.log(n_keys):.2f})\n   | d_k | var(q·k) | var(q·k/sqrt(d_k)) | H unscaled | H scaled | largest weight, unscaled |\n   |" + " --- |" * 6)
    for i, d_k in enumerate(dims):
        print(f"   | {d_k} | {table['var raw'][i]:.1f} | {table['var scaled'][i]:.2f} | {table['H raw'][i]:.2f} | "
              f"{table['H scaled'][i]:.2f} | {table['max raw'][i]:.3f} |")
    print("   Unscaled, the scores spread as sqrt(d_k) and the softmax becomes one-hot: its gradient vanishes and\n"
          "   attention stops averaging. Dividing by sqrt(d_k) keeps the variance at 1 for every width.")
    log_dims = [math.log2(d) for d in dims]
    plots.plot_panels([
        {"curves": {"q·k": (log_dims, table["var raw"]), "q·k / sqrt(d_k)": (log_dims, table["var scaled"])},
         "logy": True, "xlabel": "log2 d_k", "ylabel": "variance of the score", "title": "score variance"},
        {"curves": {"softmax(q·k)": (log_dims, table["H raw"]), "softmax(q·k / sqrt(d_k))": (log_dims, table["H scaled"]),
                    f"uniform (ln {n_keys})": (log_dims, [math.log(n_keys)] * len(dims))},
         "xlabel": "log2 d_k", "ylabel": "entropy (nats)", "title": "entropy of the attention weights"}],
        out / "scaling.png", title=f"Why attention divides by sqrt(d_k) ({n_keys} keys, N(0, 1) entries)")
    return {"d_k": dims, **table}


def multi_head(config: Config, device: torch.device) -> dict:
    """Part 3: MultiHeadAttention's shapes, torch.nn.MultiheadAttention with the same weights, fast vs hand-written."""
    d, h, batch, length, memory_len = config.d_model, config.n_heads, 2, 5, 7
    ours = MultiHeadAttention(d, h).to(device).eval()
    x = torch.randn(batch, length, d, device=device)  # (B, T, d_model)
    memory = torch.randn(batch, memory_len, d, device=device)  # (B, S, d_model), e.g. an encoder's output
    with torch.no_grad():
        self_out, self_weights = ours(x, need_weights=True)  # q, k, v from x
        cross_out, cross_weights = ours(x, memory, need_weights=True)  # q from x; k, v from memory
    print(f"\n3. MultiHeadAttention(d_model={d}, n_heads={h}): each head works in d_k = {d // h} dimensions\n"
          f"   x {tuple(x.shape)} -> q_proj -> (B, T, d_model) -> split heads -> (B, n_heads, T, d_k) = "
          f"{(batch, h, length, d // h)}\n   self-attention:  output {tuple(self_out.shape)}, weights (B, n_heads, T, T) "
          f"{tuple(self_weights.shape)}\n   cross-attention: output {tuple(cross_out.shape)}, weights (B, n_heads, T, S) "
          f"{tuple(cross_weights.shape)}")

    reference = torch.nn.MultiheadAttention(d, h, batch_first=True).to(device).eval()
    with torch.no_grad():
        for projection, packed_weight, packed_bias in zip((ours.q_proj, ours.k_proj, ours.v_proj),
                                                          reference.in_proj_weight.chunk(3), reference.in_proj_bias.chunk(3)):
            projection.weight.copy_(packed_weight)  # in_proj_weight (3 d_model, d_model) = [W_q; W_k; W_v]
            projection.bias.copy_(packed_bias)
        ours.out_proj.load_state_dict(reference.out_proj.state_dict())
        memory_padding = torch.zeros(batch, memory_len, dtype=torch.bool, device=device)
        memory_padding[1, -3:] = True  # the second memory has 3 padding positions
        mine, my_weights = ours(x, memory, key_padding_mask=memory_padding, need_weights=True)
        theirs, their_weights = reference(x, memory, memory, key_padding_mask=memory_padding, average_attn_weights=False)
        # torch's boolean attn_mask means the opposite of SDPA's: True = may NOT attend, hence the ~
        causal_theirs, _ = reference(x, x, x, attn_mask=~causal_mask(length, length, device=device), need_weights=False)
        torch_diff = max(max_diff(mine, theirs), max_diff(my_weights, their_weights),
                         max_diff(ours(x, is_causal=True)[0], causal_theirs))
        big = torch.randn(config.bench_batch, config.bench_len, d, device=device)  # (B, T, d_model)
        fast_diff = max_diff(ours(big, is_causal=True, use_fast_path=True)[0], ours(big, is_causal=True, use_fast_path=False)[0])
        fast_s = time_callable(lambda: ours(big, is_causal=True, use_fast_path=True), device)
        slow_s = time_callable(lambda: ours(big, is_causal=True, use_fast_path=False), device)
    print(f"   vs torch.nn.MultiheadAttention with the same weights (cross with padding, causal self): max diff {torch_diff:.1e}\n"
          f"   causal self-attention on {tuple(big.shape)}: fused SDPA path {fast_s * 1e3:.2f} ms, hand-written "
          f"{slow_s * 1e3:.2f} ms (x{slow_s / fast_s:.1f}); outputs differ by at most {fast_diff:.1e}")
    return {"max_abs_diff_vs_torch_mha": torch_diff, "fast_vs_hand_max_abs_diff": fast_diff, "fast_ms": fast_s * 1e3,
            "hand_written_ms": slow_s * 1e3}


def learn_reversal(config: Config, device: torch.device, out: pathlib.Path) -> dict:
    """Part 4: an attention-only model learns to reverse digit sequences; its maps show how."""
    runs, models = {}, {}
    for layers in (config.toy_layers, 1):  # the same budget for a one-layer model, to compare
        seed_everything(config.seed)
        models[layers] = AttentionOnlyModel(DIGITS, config.max_len, config.toy_d_model, config.toy_heads, layers).to(device)
        runs[layers] = train_reversal(models[layers], config.steps, config.batch_size, config.min_len, lr=config.lr,
                                      generator=torch.Generator().manual_seed(config.seed), device=device)
    held_out = reversal_batch(2000, config.max_len, DIGITS, config.min_len, device=device,
                              generator=torch.Generator().manual_seed(config.seed + 1))  # never seen in training
    accuracy = {layers: sequence_accuracy(model, held_out) for layers, model in models.items()}
    model = models[config.toy_layers]
    with torch.no_grad():
        logits, weights = model(held_out.inputs, held_out.padding_mask, need_weights=True)  # weights: per layer (B, heads, L, L)
    mass = [attention_mass_on(w, held_out.source_positions, held_out.padding_mask).tolist() for w in weights]
    first_query = attention_mass_on(weights[0][:, :, :1], held_out.source_positions[:, :1]).tolist()  # query 0 -> key n-1
    print(f"\n4. Reversing {config.min_len}-{config.max_len} digits with attention alone ({config.steps} steps of "
          f"{config.batch_size}, AdamW lr {config.lr}), held out on 2,000 new sequences:")
    for layers, (token_acc, seq_acc) in accuracy.items():
        print(f"   {layers} attention layer{'s' * (layers > 1)}: {token_acc:.1%} of tokens, {seq_acc:.1%} of whole sequences "
              f"right ({runs[layers].seconds:.1f} s of training)")
    print("   Output i copies input n-1-i, and n varies. One layer can aim only at keys it can single out by position:\n"
          "   the last real token (the highest position not masked as padding) or the first, never 'n-1-i' for all n.\n"
          f"   Layer 1 of the {config.toy_layers}-layer model does just that: query 0 puts " +
          " / ".join(f"{m:.2f}" for m in first_query) + " of its weight (per head) on the last\n   real token, and its "
          "middle queries blur. The next layer, whose queries now carry what layer 1 gathered, aims at n-1-i.\n   Mean weight on the source position n-1-i over all real "
          "queries, per head: " +
          "; ".join(f"layer {i + 1}: " + ", ".join(f"{m:.2f}" for m in heads) for i, heads in enumerate(mass)) +
          f"\n   The last layer's maps are the anti-diagonal of the real tokens ({out / 'attention_heatmaps.png'}).")

    plots.plot_loss_curves({f"{layers} attention layer{'s' * (layers > 1)}": run.losses for layers, run in runs.items()},
                           out / "reversal_loss.png", title="Reversal: training loss (fresh random batches)",
                           smoothing=0.9, logy=True)
    example = int((held_out.lengths == config.max_len - 1).int().argmax())  # one with a padding position, if any
    n = int(held_out.lengths[example])
    maps = torch.stack([w[example, head, :n] for w in weights for head in range(config.toy_heads)])  # (layers*heads, n, L)
    keys = [str(t) if t < DIGITS else "pad" for t in held_out.inputs[example].tolist()]
    plots.plot_attention(maps, out / "attention_heatmaps.png", x_labels=keys, columns=config.toy_heads,
                         y_labels=[str(t) for t in logits[example, :n].argmax(-1).tolist()],
                         titles=[f"layer {i + 1}, head {j}" for i in range(len(weights)) for j in range(config.toy_heads)],
                         xlabel="key: input digit", ylabel="query: output digit",
                         title=f"Reversing {''.join(keys[:n])}: attention of each head (rows sum to 1)")
    return {"accuracy": {f"{layers}_layers": {"token": t, "sequence": s} for layers, (t, s) in accuracy.items()},
            "attention_mass_on_source": mass, "layer1_query0_mass_on_last_token": first_query,
            "train_seconds": {layers: run.seconds for layers, run in runs.items()},
            "final_loss": {layers: run.losses[-1] for layers, run in runs.items()}}


def kv_cache(config: Config, device: torch.device) -> dict:
    """Part 5: decoding token by token with a KV cache equals recomputing the whole prefix every step."""
    mha = MultiHeadAttention(config.d_model, config.n_heads).to(device).eval()
    n = config.decode_tokens
    x = torch.randn(1, n, config.d_model, device=device)  # (1, N, d_model): the tokens, one per step

    def cached() -> torch.Tensor:  # each step projects only the new token; keys and values of the past are kept
        cache = mha.new_cache(1, n)
        return torch.cat([mha(x[:, t:t + 1], is_causal=True, kv_cache=cache)[0] for t in range(n)], dim=1)  # (1, N, d)

    def recomputed() -> torch.Tensor:  # each step runs attention over the whole prefix and keeps the last row
        return torch.cat([mha(x[:, :t + 1], is_causal=True)[0][:, -1:] for t in range(n)], dim=1)  # (1, N, d)

    with torch.no_grad():
        full = mha(x, is_causal=True)[0]  # (1, N, d_model): all positions at once
        diff = max(max_diff(cached(), full), max_diff(recomputed(), full))
        cached_s = time_callable(cached, device, warmup=1, repeats=3)
        recomputed_s = time_callable(recomputed, device, warmup=1, repeats=3)
    print(f"\n5. KV cache: {n} tokens decoded one at a time equal the full causal pass to {diff:.1e}; decoding took "
          f"{cached_s * 1e3:.1f} ms with the cache, {recomputed_s * 1e3:.1f} ms recomputing the prefix "
          f"(x{recomputed_s / cached_s:.1f}, one layer of width {config.d_model})")
    return {"max_abs_diff": diff, "cached_ms": cached_s * 1e3, "recomputed_ms": recomputed_s * 1e3}


def main(config: Config) -> dict:
    out = pathlib.Path(config.out)
    seed_everything(config.seed)
    device = pick_device(config.device)
    print(f"Running on {describe_device(device, 'fp32')} with torch {torch.__version__}\n")
    results = {"by_hand": attention_by_hand(), "scaling": why_scale(out, torch.Generator().manual_seed(config.seed))}
    results["multi_head"] = multi_head(config, device)
    results["reversal"] = learn_reversal(config, device, out)
    results["kv_cache"] = kv_cache(config, device)

    mh, rev, kv = results["multi_head"], results["reversal"], results["kv_cache"]
    last = f"{config.toy_layers}_layers"
    summary = {
        "hand-written attention vs torch SDPA (max abs diff)": f"{results['by_hand']['max_abs_diff_vs_torch']:.1e}",
        f"softmax entropy at d_k=1024, unscaled / scaled (uniform {math.log(16):.2f})":
            f"{results['scaling']['H raw'][-1]:.2f} / {results['scaling']['H scaled'][-1]:.2f}",
        "MultiHeadAttention vs torch.nn.MultiheadAttention (max abs diff)": f"{mh['max_abs_diff_vs_torch_mha']:.1e}",
        f"causal MHA on ({config.bench_batch}, {config.bench_len}, {config.d_model}), fused / hand-written (ms)":
            f"{mh['fast_ms']:.2f} / {mh['hand_written_ms']:.2f}",
        f"reversal, held-out tokens / sequences right, {config.toy_layers} layers":
            f"{rev['accuracy'][last]['token']:.1%} / {rev['accuracy'][last]['sequence']:.1%}",
        "reversal, held-out tokens / sequences right, 1 layer":
            f"{rev['accuracy']['1_layers']['token']:.1%} / {rev['accuracy']['1_layers']['sequence']:.1%}",
        "reversal, last layer's attention on the source position, per head":
            " / ".join(f"{m:.2f}" for m in rev["attention_mass_on_source"][-1]),
        "KV-cache decoding vs full recomputation (max abs diff)": f"{kv['max_abs_diff']:.1e}",
        f"decode {config.decode_tokens} tokens, KV cache / recompute prefix (ms)": f"{kv['cached_ms']:.1f} / {kv['recomputed_ms']:.1f}",
    }
    write_json(out / "results.json", results | {"config": asdict(config), "summary": summary})
    print(f"\nSaved {out / 'scaling.png'}, {out / 'reversal_loss.png'}, {out / 'attention_heatmaps.png'} and {out / 'results.json'}")
    return results


if __name__ == "__main__":
    run_chapter(main, Config)
