"""ONNX export: a trained model as a file that onnxruntime (or any ONNX runtime) runs without PyTorch or minillm.

ONNX (Open Neural Network Exchange) stores a model as a graph of standard operators (MatMul, Softmax,
LayerNormalization, ...) with the weights inside. Two models are exported, each through a small wrapper that
gives the graph plain tensors in and one tensor out::

    GPT (language model)    input_ids (B, T) int64                          -> logits (B, T, vocab) float32
    sequence classifier     input_ids (B, T), attention_mask (B, T) int64  -> logits (B, num_labels) float32

(a BERT or GPT classifier of :mod:`minillm.finetune`, with any :mod:`minillm.peft` method inside it). B and T
are **dynamic axes**: the graph takes any batch size and any length from 1 up to the model's context, not only
the example's shape it was exported with, and :func:`export_onnx` checks that on shapes other than the example.

**The exporter.** ``torch.onnx.export(..., dynamo=True)``, the default since PyTorch 2.9: ``torch.export``
traces the model symbolically (B and T stay symbols, ``torch.export.Dim``), then onnxscript translates each
operator. The older TorchScript tracer (``dynamo=False``) is deprecated, and it runs the Python code once with
the example's numbers: a check like ``if T > block_size: raise`` is evaluated for T = 8 and dropped. Under
``torch.export`` the same check becomes a constraint on the symbol: ``Dim("sequence", max=block_size)``
proves it never fires, and the export refuses a range where it could. So the models export as they are:
``MinillmError`` checks, the fused ``F.scaled_dot_product_attention`` (decomposed into MatMul, Softmax and a
triangular mask) and ``if kv_cache is not None`` branches (the graph takes the no-cache path) need no change.
The graph has no KV cache: each call reads the whole sequence (a cache would be ``past_key_values`` inputs
and outputs; serving generates with PyTorch).

**The check.** onnxruntime computes in float32 like PyTorch, but sums in another order (its own MatMul and
Softmax kernels, fused LayerNorm and GELU), and float32 addition is not associative: each sum of K products
may differ by a few units of float32's 2^-23 ≈ 1.2e-7 relative to the terms' size, and the differences
pass through every layer. The tolerance is therefore relative to the logits' size:
``max |onnx - torch| <= 1e-4 * max(1, max |torch logits|)`` (:data:`RELATIVE_TOLERANCE`). Measured on the
2-core CPU: at most 1.2e-5 on the logits (up to 14) of chapter 06's 4-layer GPT trained on Tiny Shakespeare,
under 1e-6 of the largest logit, and at most 6.5e-7 on the shipped 4-layer BERT fine-tuned on SST-2 with LoRA
(merged), at batches 1 to 32 and lengths 1 to the full context; so 1e-4 leaves a 100x margin, while a real mistake (a lost mask, a
shifted position, a missing layer) moves logits by a percent of their size or more.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import warnings
from typing import NamedTuple, Sequence

import torch
from torch import nn

from minillm import MinillmError
from minillm.bert import BertForSequenceClassification
from minillm.files import atomic_write_bytes
from minillm.finetune import GPTForSequenceClassification
from minillm.gpt import GPT
from minillm.peft import PromptTuning

RELATIVE_TOLERANCE = 1e-4
"""ONNX logits may differ from PyTorch's by this much times max(1, the largest |logit|): see the module docstring."""

CHECK_SHAPES: tuple[tuple[int, int | None], ...] = ((1, 1), (3, 5), (4, None))
"""(batch, length) pairs :func:`export_onnx` checks, none the example's (2, 8); length None: the longest the
model takes. Lengths beyond it are cut to it."""

MAX_ONNX_BYTES = 2 * 1024**3
"""An ONNX file is one protobuf message, which cannot exceed 2 GiB (bigger models keep their weights in a
second file, which minillm does not write)."""


# ---------------------------------------------------------------------------------------------
# What the graph takes: a wrapper per kind of model
# ---------------------------------------------------------------------------------------------


class LanguageModelLogits(nn.Module):
    """A :class:`~minillm.gpt.GPT` as the ONNX graph sees it: ``input_ids`` (B, T) -> logits (B, T, vocab).

    ``GPT.forward`` returns ``(logits, loss)`` and takes keyword options (targets, KV caches); the graph has
    one input and one output. The GPT is held, not copied: its weights are the exported ones."""

    input_names = ("input_ids",)

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits, _ = self.gpt(input_ids)  # (B, T, vocab)
        return logits


class ClassifierLogits(nn.Module):
    """A sequence classifier as the ONNX graph sees it: ``input_ids`` and ``attention_mask`` (B, T; 1 = token,
    0 = padding) -> logits (B, num_labels). The classifier's ``ClassificationOutput`` becomes its logits."""

    input_names = ("input_ids", "attention_mask")

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(input_ids, attention_mask=attention_mask).logits  # (B, num_labels)


class Signature(NamedTuple):
    """What an exported model takes: its inputs' names, the longest sequence, the ids it knows."""

    wrapper: nn.Module  # LanguageModelLogits or ClassifierLogits around the model
    input_names: tuple[str, ...]
    max_length: int  # T may be 1..max_length
    vocab_size: int
    pad_id: int | None  # the classifier's padding id (inputs use it where attention_mask is 0)


def signature(model: nn.Module) -> Signature:
    """The wrapper and the input ranges of ``model``: a GPT, or a BERT / GPT sequence classifier (possibly a
    :class:`~minillm.peft.PromptTuning` one, whose P prompt vectors take P of the context's positions)."""
    if isinstance(model, GPT):
        return Signature(LanguageModelLogits(model), LanguageModelLogits.input_names, model.config.block_size,
                         model.config.vocab_size, None)
    classifier, n_prompt = (model.model, model.n_prompt_tokens) if isinstance(model, PromptTuning) else (model, 0)
    if isinstance(classifier, BertForSequenceClassification):
        context, pad_id = classifier.config.max_len, classifier.config.pad_id
    elif isinstance(classifier, GPTForSequenceClassification):
        context, pad_id = classifier.config.block_size, classifier.pad_id
    else:
        raise MinillmError(f"ONNX export takes a GPT language model or a BERT / GPT sequence classifier, "
                           f"not a {type(model).__name__}")
    return Signature(ClassifierLogits(model), ClassifierLogits.input_names, context - n_prompt,
                     classifier.config.vocab_size, pad_id)


def example_inputs(model: nn.Module, batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of shape (batch, length) for ``model``'s graph, on its device: ``input_ids`` drawn from
    the vocabulary and, for a classifier, an ``attention_mask`` padded on the right, row i holding
    max(1, length - i) tokens (padding positions get the padding id), so the masks are exercised too."""
    sig = signature(model)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, sig.vocab_size, (batch, length), generator=generator)  # (B, T)
    inputs = {"input_ids": ids}
    if "attention_mask" in sig.input_names:
        real = torch.arange(length).unsqueeze(0) < (length - torch.arange(batch)).clamp(min=1).unsqueeze(1)  # (B, T)
        if sig.pad_id is not None:
            ids.masked_fill_(~real, sig.pad_id)
        inputs["attention_mask"] = real.long()
    device = next(model.parameters()).device
    return {name: tensor.to(device) for name, tensor in inputs.items()}


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


class OnnxCheck(NamedTuple):
    """onnxruntime against PyTorch on one input shape."""

    batch: int
    length: int
    max_abs_diff: float  # max |onnx logits - torch logits|
    tolerance: float  # RELATIVE_TOLERANCE * max(1, max |torch logits|)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "over the tolerance"
        return (f"batch {self.batch}, length {self.length}: max |onnx - torch| = {self.max_abs_diff:.1e} "
                f"(tolerance {self.tolerance:.1e}) {verdict}")


class OnnxExport(NamedTuple):
    path: pathlib.Path
    checks: list[OnnxCheck]  # one per checked shape; empty when not checked


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's notices that say nothing about this model: it skips torchvision's operators (not
    installed), pytree's deprecation, and axis names it merges (batch and sequence are shared by both inputs)."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r".*The axis name: .* will not be used")
            yield
    finally:
        registration.setLevel(level)


def onnx_bytes(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None, opset_version: int | None = None
               ) -> bytes:
    """``model`` exported as an ONNX model (the file's bytes), with dynamic batch and sequence axes.

    ``inputs`` (name -> (B, T) int64 tensor; default :func:`example_inputs` (2, 8)) is the example the
    exporter traces. It needs B ≥ 2 and T ≥ 2: ``torch.export`` treats a size of 1 as a constant (a
    broadcast could depend on it), which would fix that axis in the graph. The model is exported in eval
    mode (no dropout) and given back in the mode it was in."""
    sig = signature(model)
    if sig.max_length < 2:
        raise MinillmError(f"the model takes at most {sig.max_length} tokens; a dynamic sequence axis needs 2 or more")
    inputs = inputs if inputs is not None else example_inputs(model, 2, min(8, sig.max_length))
    if set(inputs) != set(sig.input_names):
        raise MinillmError(f"the example inputs are {sorted(inputs)}, but this model takes {list(sig.input_names)}")
    batch, length = inputs["input_ids"].shape
    if batch < 2 or not 2 <= length <= sig.max_length:
        raise MinillmError(f"the example inputs are ({batch}, {length}); export needs batch ≥ 2 and 2 ≤ length ≤ "
                           f"{sig.max_length} (a size of 1 would be fixed in the graph)")
    not_fp32 = {str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32}
    if not_fp32:
        raise MinillmError(f"the model has {', '.join(sorted(not_fp32))} weights; export a float32 model "
                           "(model.float()), the precision onnxruntime's CPU kernels and the check use")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if weight_bytes > MAX_ONNX_BYTES * 0.95:
        raise MinillmError(f"the model holds {weight_bytes / 1024**3:.1f} GiB of weights, more than one ONNX file "
                           "can (2 GiB); minillm writes single-file ONNX models")
    batch_axis = torch.export.Dim("batch", min=1)
    sequence_axis = torch.export.Dim("sequence", min=1, max=sig.max_length)
    dynamic_shapes = {name: {0: batch_axis, 1: sequence_axis} for name in sig.input_names}
    was_training = model.training
    sig.wrapper.eval()  # the wrapper and the model in it
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(sig.wrapper, tuple(inputs[name].long() for name in sig.input_names), dynamo=True,
                                        input_names=list(sig.input_names), output_names=["logits"],
                                        dynamic_shapes=dynamic_shapes, opset_version=opset_version,
                                        external_data=False, verbose=False)
    except ImportError as error:
        raise MinillmError(f"ONNX export needs the onnx and onnxscript packages ({error}): "
                           "pip install onnx onnxscript onnxruntime") from None
    finally:
        model.train(was_training)
    program.model.metadata_props.update({"minillm_model": type(model).__name__,
                                         "max_sequence_length": str(sig.max_length)})
    return program.model_proto.SerializeToString()


def export_onnx(model: nn.Module, path: str | os.PathLike, inputs: dict[str, torch.Tensor] | None = None, *,
                opset_version: int | None = None,
                check_shapes: Sequence[tuple[int, int | None]] = CHECK_SHAPES) -> OnnxExport:
    """Export ``model`` to ``path`` (:func:`onnx_bytes`), after checking the graph with onnxruntime on
    ``check_shapes`` (:func:`verify_onnx`; ``()`` checks nothing). A graph whose logits are not PyTorch's
    within :data:`RELATIVE_TOLERANCE` is a :class:`MinillmError` and is not written. The file is written
    atomically: ``path`` holds the old file or the new one, never half of one."""
    model_bytes = onnx_bytes(model, inputs, opset_version)
    checks = verify_onnx(model, model_bytes, check_shapes) if check_shapes else []
    failed = [check for check in checks if not check.ok]
    if failed:
        raise MinillmError(f"onnxruntime's logits are not PyTorch's ({failed[0]}); {path} was not written")
    return OnnxExport(atomic_write_bytes(path, model_bytes), checks)


# ---------------------------------------------------------------------------------------------
# Running and checking the graph with onnxruntime
# ---------------------------------------------------------------------------------------------


def onnx_session(model: str | os.PathLike | bytes, threads: int | None = None):
    """An onnxruntime ``InferenceSession`` on the CPU for an ONNX file (or its bytes), with ``threads``
    threads (default: as many as PyTorch uses, ``torch.get_num_threads()``, which follows OMP_NUM_THREADS)."""
    try:
        import onnxruntime
    except ImportError:
        raise MinillmError("running an ONNX model needs onnxruntime: pip install onnxruntime") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def onnx_logits(session, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The graph's logits for ``inputs`` (name -> tensor), as a float32 CPU tensor."""
    feed = {name: tensor.detach().cpu().to(torch.int64).numpy() for name, tensor in inputs.items()}
    (logits,) = session.run(["logits"], feed)
    return torch.from_numpy(logits)


@torch.no_grad()
def torch_logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the exported graph computes, computed by PyTorch (eval mode; the model's mode is kept)."""
    sig = signature(model)
    was_training = model.training
    sig.wrapper.eval()
    try:
        return sig.wrapper(*(inputs[name] for name in sig.input_names)).float().cpu()
    finally:
        model.train(was_training)


def logit_tolerance(reference: torch.Tensor) -> float:
    """How far ONNX logits may be from ``reference`` (PyTorch's): RELATIVE_TOLERANCE * max(1, max |logit|)."""
    return RELATIVE_TOLERANCE * max(1.0, reference.abs().max().item())


def check_onnx(model: nn.Module, path: str | os.PathLike | bytes, inputs: dict[str, torch.Tensor], session=None
               ) -> float:
    """max |onnxruntime's logits - PyTorch's| on ``inputs``, for the ONNX file (or bytes) at ``path`` exported
    from ``model``. ``session``: an open :func:`onnx_session` to reuse instead of opening ``path``."""
    session = session or onnx_session(path)
    return (onnx_logits(session, inputs) - torch_logits(model, inputs)).abs().max().item()


def verify_onnx(model: nn.Module, path: str | os.PathLike | bytes,
                shapes: Sequence[tuple[int, int | None]] = CHECK_SHAPES, seed: int = 0) -> list[OnnxCheck]:
    """:func:`check_onnx` on random :func:`example_inputs` of each (batch, length) in ``shapes`` (length None:
    the longest the model takes; longer lengths are cut to it), each against :func:`logit_tolerance`."""
    session = onnx_session(path)
    max_length = signature(model).max_length
    checks = []
    for index, (batch, length) in enumerate(shapes):
        length = max_length if length is None else min(length, max_length)
        inputs = example_inputs(model, batch, length, seed=seed + index)
        reference = torch_logits(model, inputs)  # (B, T, vocab) or (B, num_labels)
        difference = (onnx_logits(session, inputs) - reference).abs().max().item()
        checks.append(OnnxCheck(batch, length, difference, logit_tolerance(reference)))
    return checks
