"""minillm: large language models built from scratch in pure PyTorch, chapter by chapter.

One module per idea, on floors: topics below, commands on top (the README's architecture section draws
them; tests/test_architecture.py keeps them). From the bottom:

- foundations: ``files``, ``device``, ``config``, ``plots``, ``timing``, ``metrics``, ``gradcheck``,
  ``linreg``, ``optim``
- data: ``data``, ``datasets``, ``tokenization``, ``checkpoint``, ``hpsearch``
- parts: ``attention``, ``layers``, ``hf``, and chapters 02-05's small models ``bow``, ``reversal``,
  ``number_words``
- models: ``gpt``, ``bert``, ``transformer``
- the loop: ``train`` (``Trainer``, ``Task``) and ``runs`` (run folders)
- recipes: ``pretrain``, ``bert_pretraining``, ``finetune``, ``peft``, ``contrastive``, ``nanogpt``
- commands: ``minillm.commands`` (``python -m minillm ...``); the chapter scripts ship as ``minillm.chapters``
"""

__version__ = "0.1.0"


class MinillmError(Exception):
    """A user's mistake (bad file, bad option): shown as one sentence, never as a traceback."""
