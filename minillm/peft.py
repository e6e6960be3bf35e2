"""Parameter-efficient fine-tuning: train a few weights of a pretrained classifier, or a few new ones.

Chapter 08 fine-tunes every weight; chapter 09 trains only a few, which costs less memory (no
optimizer state for frozen weights), stores a task in a few kilobytes, and often loses little accuracy:

- Freezing (Howard & Ruder, 2018; Devlin et al., 2019): :func:`freeze_all_but_head` trains only the
  classifier (a linear probe), :func:`freeze_except_top_layers` the top k blocks as well.
- Adapters (Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP"): a small bottleneck
  MLP with a residual connection, :math:`h \\mapsto h + W_{up}\\,\\sigma(W_{down} h)`, after the
  attention and the feed-forward sublayer of every block: :func:`add_adapters`.
- LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): each chosen weight
  matrix gets a trainable low-rank update, :math:`W x + \\frac{\\alpha}{r} B A x`, which
  :func:`merge_lora` folds back into W for inference: :func:`apply_lora`, :class:`LoRALinear`.
- Prompt tuning (Lester, Al-Rfou & Constant, 2021, "The Power of Scale for Parameter-Efficient Prompt
  Tuning"): P trainable vectors placed among the input embeddings of a frozen model:
  :func:`apply_prompt_tuning`, :class:`PromptTuning`.

Every function here works on :class:`~minillm.bert.BertForSequenceClassification` and
:class:`~minillm.finetune.GPTForSequenceClassification`; :func:`count_parameters` says how many weights
then train, and :func:`training_memory_bytes` and :func:`saved_activation_bytes` what training them keeps
in memory. The freezing functions and :func:`add_adapters` change the model in place and return it;
:func:`apply_prompt_tuning` returns a new module that wraps the model (it owns the prompt);
:func:`apply_method` applies any of them by name (``python -m minillm finetune --method``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minillm.bert import BertForSequenceClassification, ClassificationOutput
from minillm.finetune import GPTForSequenceClassification
from minillm.gpt import Block
from minillm.layers import Activation, LayerNorm, make_activation
from minillm.memory import saved_activation_bytes  # re-exported: chapter 09 measures with it

__all__ = [
    "count_parameters", "training_memory_bytes", "saved_activation_bytes",
    "freeze_all_but_head", "freeze_except_top_layers",
    "Adapter", "WithAdapter", "add_adapters", "LoRALinear", "apply_lora", "merge_lora", "lora_layers",
    "PromptTuning", "apply_prompt_tuning", "METHODS", "METHOD_RECIPES", "PeftOptions", "apply_method",
]


# ---------------------------------------------------------------------------------------------
# Which parts a classifier has
# ---------------------------------------------------------------------------------------------


Classifier = BertForSequenceClassification | GPTForSequenceClassification


def _classifier(model: nn.Module) -> Classifier:
    """The classification model itself (unwrapping :class:`PromptTuning`), or a clear TypeError."""
    if isinstance(model, PromptTuning):
        model = model.model
    if not isinstance(model, (BertForSequenceClassification, GPTForSequenceClassification)):
        raise TypeError("expected a BertForSequenceClassification or a GPTForSequenceClassification, "
                        f"got {type(model).__name__}")
    return model


def _blocks_and_top(model: nn.Module) -> tuple[nn.ModuleList, list[nn.Module]]:
    """The Transformer blocks, bottom to top, and what sits between the top block and the classifier:
    BERT's pooler (tanh(W h_[CLS] + b)), GPT's final LayerNorm ``ln_f``."""
    model = _classifier(model)
    if isinstance(model, BertForSequenceClassification):
        return model.bert.layers, [model.bert.pooler]
    return model.gpt.blocks, [model.gpt.ln_f]


def _sublayer_outputs(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute name) of the last linear layer of a block's attention and of its feed-forward
    network: a BERT :class:`~minillm.layers.EncoderBlock`'s or a GPT :class:`~minillm.gpt.Block`'s."""
    if isinstance(block, Block):
        return [(block.attn, "c_proj"), (block.mlp, "c_proj")]
    return [(block.self_attn, "out_proj"), (block.feed_forward, "linear2")]


def _set_trainable(modules: Iterable[nn.Module], trainable: bool) -> None:
    for module in modules:
        module.requires_grad_(trainable)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` numbers of parameters, each tensor counted once (a tied matrix, such as
    GPT's token embedding and output layer, is one tensor)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def training_memory_bytes(model: nn.Module, optimizer_states_per_param: int = 2) -> int:
    """Bytes that training ``model`` keeps for its weights, besides activations:

    .. math::  \\sum_{\\text{all } p} |p| + (1 + s) \\sum_{\\text{trainable } p} |p|

    every parameter (frozen ones too: the forward pass needs them), one gradient per trainable
    parameter, and ``s`` optimizer-state tensors per trainable parameter (AdamW: s = 2, the moments
    m and v; SGD with momentum: 1), each |p| in bytes (numel x element size), each tensor counted once.
    This is where freezing saves memory: a frozen weight has no gradient and no optimizer state.
    """
    if optimizer_states_per_param < 0:
        raise ValueError(f"optimizer_states_per_param cannot be negative, got {optimizer_states_per_param}")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights + (1 + optimizer_states_per_param) * trainable


# ---------------------------------------------------------------------------------------------
# Freezing
# ---------------------------------------------------------------------------------------------


def freeze_all_but_head(model: nn.Module) -> nn.Module:
    """Train only the classifier (``model.classifier``), every other weight frozen: a linear probe
    of the pretrained features. Returns the model."""
    model.requires_grad_(False)
    _classifier(model).classifier.requires_grad_(True)
    return model


def freeze_except_top_layers(model: nn.Module, k: int) -> nn.Module:
    """Train the top ``k`` Transformer blocks, what lies above them (BERT's pooler, GPT's final
    LayerNorm ``ln_f``) and the classifier; freeze the embeddings and the lower blocks.

    The lower layers of a pretrained model hold general features and the upper ones the most
    task-specific (Howard & Ruder, 2018; Yosinski et al., 2014), so these are the ones to adapt.
    ``k = 0`` trains the pooler / ``ln_f`` and the classifier, ``k = n_layer`` every block (only the
    embeddings stay frozen). Returns the model.
    """
    blocks, top = _blocks_and_top(model)
    if not isinstance(k, int) or not 0 <= k <= len(blocks):
        raise ValueError(f"k must be an integer from 0 to the number of blocks ({len(blocks)}), got {k!r}")
    model.requires_grad_(False)
    _set_trainable(list(blocks)[len(blocks) - k:], True)
    _set_trainable(top, True)
    _classifier(model).classifier.requires_grad_(True)
    return model


# ---------------------------------------------------------------------------------------------
# Adapters (Houlsby et al., 2019)
# ---------------------------------------------------------------------------------------------


class Adapter(nn.Module):
    """A bottleneck adapter (Houlsby et al., 2019, section 2.1 and figure 2):

    .. math::  \\mathrm{Adapter}(h) = h + W_{up}\\, \\sigma(W_{down}\\, h + b_{down}) + b_{up},
               \\quad W_{down} \\in \\mathbb{R}^{m \\times d},\\; W_{up} \\in \\mathbb{R}^{d \\times m},\\; m \\ll d

    2·m·d + m + d parameters per adapter. ``up`` starts at zero, so the adapter starts as the identity
    and the pretrained model's function is unchanged before training (the paper starts near the
    identity with small weights; exactly zero makes "unchanged" testable). ``down`` is drawn from
    N(0, 0.01²) truncated at two standard deviations, as in the paper.
    """

    def __init__(self, d_model: int, bottleneck: int = 64, activation: Activation = "gelu"):
        super().__init__()
        if d_model < 1 or bottleneck < 1:
            raise ValueError(f"d_model and bottleneck must be at least 1, got {d_model} and {bottleneck}")
        self.down = nn.Linear(d_model, bottleneck)
        self.activation = make_activation(activation)
        self.up = nn.Linear(bottleneck, d_model)
        nn.init.trunc_normal_(self.down.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.activation(self.down(h)))  # (..., d) -> (..., m) -> (..., d)


class WithAdapter(nn.Module):
    """``adapter(layer(x))``: a layer followed by an adapter, in the layer's place in the block."""

    def __init__(self, layer: nn.Module, adapter: Adapter):
        super().__init__()
        self.layer, self.adapter = layer, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.layer(x))


def add_adapters(model: nn.Module, bottleneck: int = 64, activation: Activation = "gelu") -> nn.Module:
    """Insert two adapters into every block, then freeze everything but adapters, LayerNorms and the classifier.

    Where (Houlsby et al., figure 2): on the output of each sublayer, after its last projection and
    before the residual addition. In minillm's blocks that output is the last linear layer of the
    sublayer, so that layer is replaced by :class:`WithAdapter` (layer, then adapter):

    - after multi-head attention: BERT's ``block.self_attn.out_proj``, GPT's ``block.attn.c_proj``,
    - after the feed-forward network: BERT's ``block.feed_forward.linear2``, GPT's ``block.mlp.c_proj``,

    each becoming ``WithAdapter(layer, Adapter)``. For BERT's post-norm block that gives
    ``x = norm1(x + dropout(adapter(attn(x))))`` and ``x = norm2(x + dropout(adapter(FFN(x))))``; for GPT's
    pre-norm block ``x = x + dropout(adapter(attn(ln_1(x))))``, likewise for the MLP. (The paper's code puts the
    residual-branch dropout before the adapter; here it comes after, which only moves where the
    dropout mask falls.) Nothing else in the blocks changes, and the adapters start as the identity,
    so the model computes exactly what it did (in eval mode) until it is trained.

    What then trains, as in the paper: the adapters, every LayerNorm's gain and bias (embeddings,
    blocks, GPT's ``ln_f``), and the classifier. BERT's pooler stays frozen. Returns the model.
    """
    blocks, _ = _blocks_and_top(model)
    for block in blocks:
        sites = _sublayer_outputs(block)
        if any(isinstance(getattr(parent, name), WithAdapter) for parent, name in sites):
            raise ValueError("the model already has adapters")
        for parent, name in sites:
            layer = getattr(parent, name)  # (…, d_model) out: the adapter's width
            adapter = Adapter(layer.out_features, bottleneck, activation).to(device=layer.weight.device,
                                                                             dtype=layer.weight.dtype)
            setattr(parent, name, WithAdapter(layer, adapter))
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, (Adapter, LayerNorm, nn.LayerNorm)):
            module.requires_grad_(True)
    _classifier(model).classifier.requires_grad_(True)
    return model


# ---------------------------------------------------------------------------------------------
# LoRA (Hu et al., 2021)
# ---------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (Hu et al., 2021, section 4.1):

    .. math::  y = W_0 x + b + \\frac{\\alpha}{r}\\, B A x, \\quad A \\in \\mathbb{R}^{r \\times d_{in}},\\;
               B \\in \\mathbb{R}^{d_{out} \\times r},\\; r \\ll \\min(d_{in}, d_{out})

    Only A and B train: r·(d_in + d_out) parameters instead of d_in·d_out. B starts at zero, so the
    layer starts as exactly the pretrained one; A starts random (Kaiming-uniform, as ``nn.Linear``
    and the paper's code initialize), so that B's gradient is not zero. The scale α/r keeps the
    update's size roughly independent of r, so a learning rate tuned for one r works for another.
    ``dropout`` applies to the input of the update only. :meth:`merged` folds the update into the
    weight, :math:`W = W_0 + \\frac{\\alpha}{r} B A`: the same function with no extra cost.

    There is deliberately no ``weight`` attribute: code that reads ``layer.weight`` directly (as
    attention's fused q/k/v fast path does for plain ``nn.Linear`` layers) would silently skip the
    update, so it must call the layer instead, or fail loudly.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if r < 1:
            raise ValueError(f"the rank r must be at least 1, got {r}")
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = F.linear(self.dropout(x), self.lora_A)  # (..., d_in) -> (..., r): x Aᵀ
        update = F.linear(down, self.lora_B)  # (..., r) -> (..., d_out): x Aᵀ Bᵀ
        return self.base(x) + self.scaling * update

    def delta_weight(self) -> torch.Tensor:
        """(α/r) B A, (d_out, d_in): what training has added to the frozen weight."""
        return self.scaling * (self.lora_B @ self.lora_A)  # (d_out, r) @ (r, d_in)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A new plain ``nn.Linear`` with weight W₀ + (α/r) B A and the same bias (frozen, like the base)."""
        layer = copy.deepcopy(self.base)
        layer.weight += self.delta_weight()
        return layer

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The :class:`LoRALinear` layers of a model, by qualified name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, target_modules: Sequence[str] | None = None,
               dropout: float = 0.0, train_head: bool = True) -> nn.Module:
    """Freeze the model and wrap chosen linear layers in :class:`LoRALinear`; returns the model.

    ``target_modules``: a linear layer is wrapped when its qualified name is, or ends with ``.`` +,
    one of these (``["q_proj", "v_proj"]``: the paper's choice for GPT-3, the query and value
    projections of every attention layer). ``None`` wraps every ``nn.Linear``, with two exceptions:

    - the classification head ``classifier`` is never wrapped: it is new, randomly initialized and
      small, so it trains fully (``train_head=True``, as in the paper's GLUE experiments and in
      PEFT's ``modules_to_save``); ``train_head=False`` leaves it frozen;
    - ``lm_head`` is not wrapped (GPT's output layer; tied to the token embedding, and unused by a
      classifier), nor is any layer whose weight is shared with another module: a LoRA update
      would untie it.

    Everything else (embeddings, LayerNorms, biases, unwrapped layers) is frozen.
    """
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers (merge_lora folds them in first)")
    head = getattr(model.model if isinstance(model, PromptTuning) else model, "classifier", None)
    counts: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        counts[id(parameter)] = counts.get(id(parameter), 0) + 1
    linear_names, chosen = [], []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        linear_names.append(name)
        if module is head or counts[id(module.weight)] > 1:
            continue
        if target_modules is None:
            if name.split(".")[-1] != "lm_head":
                chosen.append(name)
        elif any(name == target or name.endswith("." + target) for target in target_modules):
            chosen.append(name)
    if not chosen:
        raise ValueError(f"no linear layer matches target_modules={list(target_modules or [])}; "
                         f"the model's linear layers are named like {linear_names[:6]}")
    model.requires_grad_(False)
    for name in chosen:
        _replace_module(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout))
    if head is not None:
        head.requires_grad_(train_head)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` by its merged plain ``nn.Linear`` (W₀ + (α/r) B A): the
    fine-tuned model at the cost of the original one. Returns the model (changed in place)."""
    for name, layer in lora_layers(model).items():
        _replace_module(model, name, layer.merged())
    return model


def _word_embeddings(model: Classifier) -> nn.Embedding:
    return model.bert.embeddings.word_embeddings if isinstance(model, BertForSequenceClassification) else model.gpt.wte


# ---------------------------------------------------------------------------------------------
# Prompt tuning (Lester et al., 2021)
# ---------------------------------------------------------------------------------------------


class PromptTuning(nn.Module):
    """A classifier with a trainable soft prompt: P vectors ``prompt`` (P, d_model) that the model
    reads as if they were the embeddings of P extra tokens (Lester et al., 2021).

    ``prompt_tuned(input_ids, ...)`` calls the wrapped classifier with the same arguments and
    ``prompt_embeddings=self.prompt``. Where the prompt goes:

    - BERT: right after [CLS], so the pooler still reads [CLS]; the real tokens keep their position
      embeddings 0..T-1, the prompt vectors get none (see :class:`minillm.bert.BertEmbeddings`); the
      attention mask is extended to them.
    - GPT: before the tokens, at positions 0..P-1 (the tokens move to P..P+T-1); the classifier reads
      the last real token, P positions further on.

    Either way P + T must fit the model's context (``max_len`` / ``block_size``), else a
    :class:`~minillm.MinillmError` says so.

    ``init="vocab"`` starts from the embeddings of P distinct random vocabulary tokens (the
    paper's best initialization after class labels; padding excluded), ``init="random"`` from
    N(0, s²) with s the word embeddings' standard deviation (the paper's uniform [-0.5, 0.5] suits
    T5's embedding scale, not ours).
    """

    def __init__(self, model: nn.Module, n_prompt_tokens: int = 20, init: Literal["vocab", "random"] = "vocab",
                 generator: torch.Generator | None = None):
        super().__init__()
        classifier = _classifier(model)
        if n_prompt_tokens < 1:
            raise ValueError(f"n_prompt_tokens must be at least 1, got {n_prompt_tokens}")
        embedding = _word_embeddings(classifier).weight  # (vocab, d_model)
        if init == "vocab":
            pad_id = classifier.config.pad_id if isinstance(classifier, BertForSequenceClassification) else classifier.pad_id
            candidates = torch.tensor([i for i in range(embedding.shape[0]) if i != pad_id])
            if n_prompt_tokens <= len(candidates):
                picks = torch.randperm(len(candidates), generator=generator)[:n_prompt_tokens]
            else:  # a tiny vocabulary: tokens repeat
                picks = torch.randint(len(candidates), (n_prompt_tokens,), generator=generator)
            prompt = embedding.detach()[candidates[picks].to(embedding.device)].clone()  # (P, d_model)
        elif init == "random":
            noise = torch.randn(n_prompt_tokens, embedding.shape[1], generator=generator)  # (P, d_model)
            prompt = (noise.to(embedding.device, embedding.dtype) * embedding.detach().std())
        else:
            raise ValueError(f"init must be 'vocab' or 'random', got {init!r}")
        self.model = model
        self.prompt = nn.Parameter(prompt)

    @property
    def n_prompt_tokens(self) -> int:
        return self.prompt.shape[0]

    def forward(self, *args, **kwargs) -> ClassificationOutput:
        return self.model(*args, prompt_embeddings=self.prompt, **kwargs)


def apply_prompt_tuning(model: nn.Module, n_prompt_tokens: int = 20, init: Literal["vocab", "random"] = "vocab",
                        generator: torch.Generator | None = None) -> PromptTuning:
    """Freeze the classifier's body and wrap it in :class:`PromptTuning`: only the prompt (P·d_model
    numbers) and the classification head train. Returns the wrapper (a new module; ``.model`` is
    the classifier, whose weights are shared, not copied)."""
    if isinstance(model, PromptTuning):
        raise ValueError("the model already has a soft prompt")
    classifier = _classifier(model)
    model.requires_grad_(False)
    classifier.classifier.requires_grad_(True)
    return PromptTuning(model, n_prompt_tokens, init, generator)


# ---------------------------------------------------------------------------------------------
# Any of them, by name
# ---------------------------------------------------------------------------------------------

METHODS = ("full", "head", "top", "adapters", "lora", "prompt")

# A recipe per method for the finetune command and chapter 09, (peak learning rate, AdamW weight decay). Full fine-tuning's 3e-4 was measured on the BERT
# pretrained on IMDB's reviews (the shipped one, part-way through its pretraining), 2,000 SST-2 labels, mean pooling,
# tuning seeds 0 and 10 (mean SST-2 dev accuracy: 1e-4 68.7%, 3e-4 72.7%, 1e-3 69.8%; the random-init twin scored
# 67-69% at every rate). The others are the best of 2-4 values by held-out loss after one epoch over 17,715 SST-2
# phrases for the earlier SST-2-pretrained BERT (head: 3e-3, 1e-2, 3e-2; top: 5e-4, 1e-3, 3e-3; adapters: 1e-3, 3e-3;
# LoRA: 1e-3, 3e-3, 1e-2; prompt: 3e-3, 1e-2, 3e-2, 0.1), but LoRA's: 3e-3 won there, then collapsed to predicting
# one class over all 58,722 phrases (3x the steps at a high rate), so its recipe is the safe 1e-3. Weights that start
# at zero or at random (the head, adapters, LoRA's B, the prompt) need steps at least as large. No weight decay for
# the head, adapters, LoRA and the prompt, by minillm's choice rather than the papers' (LoRA's GPT-2 runs use AdamW
# with weight decay 0.01, Hu et al., 2021, Table 11). The Trainer decays every trainable matrix toward zero, which for
# adapters and LoRA means toward the pretrained model unchanged ("no adaptation"; biases are not decayed), and for the
# prompt shrinks vectors that start as word embeddings toward the zero vector.
METHOD_RECIPES: dict[str, tuple[float, float]] = {
    "full": (3e-4, 0.01), "head": (1e-2, 0.0), "top": (1e-3, 0.01), "adapters": (1e-3, 0.0), "lora": (1e-3, 0.0),
    "prompt": (1e-2, 0.0)}


@dataclass
class PeftOptions:
    """The sizes the methods take, as configuration fields (a command's or a chapter's config mixes them in,
    so each is an option with a ``--help`` line); :meth:`options` gives them to :func:`apply_method`."""

    top_layers: int = field(default=1, metadata={"help": "method top: how many of the top blocks train"})
    adapter_size: int = field(default=64, metadata={"help": "method adapters: the bottleneck width"})
    lora_r: int = field(default=8, metadata={"help": "method lora: the rank r"})
    lora_alpha: float = field(default=16.0, metadata={"help": "method lora: the scale alpha (update x alpha/r)"})
    prompt_tokens: int = field(default=20, metadata={"help": "method prompt: soft-prompt vectors"})

    def options(self) -> dict:
        return {name: getattr(self, name) for name in PEFT_OPTIONS}

    def validate_options(self) -> None:
        for name in ("adapter_size", "lora_r", "prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.top_layers < 0:
            raise ValueError(f"--top-layers cannot be negative, got {self.top_layers}")
        if self.lora_alpha <= 0:
            raise ValueError(f"--lora-alpha must be positive, got {self.lora_alpha}")


PEFT_OPTIONS = tuple(f.name for f in fields(PeftOptions))


def apply_method(model: nn.Module, method: str, *, top_layers: int = 1, adapter_size: int = 64, lora_r: int = 8,
                 lora_alpha: float = 16.0, prompt_tokens: int = 20, generator: torch.Generator | None = None) -> nn.Module:
    """``model`` prepared for ``method``: as it is (``full``), frozen but for the classifier (``head``) or the
    top ``top_layers`` blocks (``top``), with bottleneck ``adapters``, with LoRA on every linear layer
    (``lora``), or wrapped with a soft prompt (``prompt``)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "head":
        return freeze_all_but_head(model)
    if method == "top":
        return freeze_except_top_layers(model, top_layers)
    if method == "adapters":
        return add_adapters(model, bottleneck=adapter_size)
    if method == "lora":
        return apply_lora(model, r=lora_r, alpha=lora_alpha)
    if method == "prompt":
        return apply_prompt_tuning(model, n_prompt_tokens=prompt_tokens, generator=generator)
    return model
