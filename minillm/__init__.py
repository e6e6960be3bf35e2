"""minillm: large language models built from scratch in pure PyTorch, chapter by chapter.

One module per idea, on floors: topics below, commands on top (the README's architecture section draws
them; tests/test_architecture.py keeps them). From the bottom:

- foundations: ``files``, ``device``, ``distributed`` and ``fully_sharded`` (process groups, FSDP),
  ``loss_scaling``, ``config``, ``plots``, ``timing``, ``metrics``, ``gradcheck``, ``linreg``, ``optim``
- data: ``data``, ``datasets``, ``tokenization``, ``checkpoint``, ``hpsearch``
- parts: ``attention``, ``layers``, ``hf``, and chapters 02-05's small models ``bow``, ``reversal``,
  ``number_words``
- models: ``gpt``, ``bert``, ``transformer``; ``memory`` (what training them holds) and
  ``activation_checkpointing``; a GPT split over processes: ``tensor_parallel`` (its blocks' matrices),
  ``pipeline_parallel`` (its layers, in stages); ``quantization`` (int8) and ``batched_generation`` (requests of
  different lengths decoded together)
- the loop: ``train`` (``Trainer``, ``Task``) and ``runs`` (run folders)
- recipes: ``pretrain``, ``bert_pretraining``, ``finetune``, ``peft``, ``contrastive``, ``nanogpt``
- deployment: ``inference_runs`` (any run loaded for inference), ``evaluation``, ``distillation``, ``onnx_export``,
  ``serving``, ``load_test``, ``generation_speed``
- commands: ``minillm.commands`` (``python -m minillm ...``); the chapter scripts ship as ``minillm.chapters``
"""

__version__ = "0.1.0"


class MinillmError(Exception):
    """A user's mistake (bad file, bad option): shown as one sentence, never as a traceback."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a training run after it saved its checkpoint; the message says how to continue. A
    ``KeyboardInterrupt``, so code after the run never treats it as finished; the entry points exit with 130."""


def interrupted_message(error: KeyboardInterrupt) -> str:
    """What to print on Ctrl-C: the run's own message, or a general one when no run was training."""
    if isinstance(error, RunInterrupted) and str(error):
        return f"\n{error}"
    return "\ninterrupted: files saved so far are kept; rerun the same command with --resume to continue a training run"
