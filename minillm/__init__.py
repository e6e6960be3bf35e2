"""minillm: large language models built from scratch in pure PyTorch, chapter by chapter.

One module per idea; the README's module map lists them all. The first ones:

- ``minillm.device``: device pick, seeding, autocast policy, ``maybe_compile``
- ``minillm.linreg``: linear regression with hand-derived gradients
- ``minillm.optim``: SGD, RMSprop, Adam, AdamW, LAMB and LR schedules, written by hand
- ``minillm.data`` and ``minillm.tokenization``: the shipped data sets, cleaned, tokenized and batched
- ``minillm.attention``, ``minillm.layers``, ``minillm.transformer``: attention, the Transformer's
  layers and blocks, and the encoder-decoder with greedy and beam decoding
- ``minillm.metrics``: BLEU, exact match, perplexity, accuracy, precision / recall / F1, confusion matrix
- ``minillm.plots``: the figures chapters save
- ``minillm.config``: dataclass configurations turned into command-line interfaces
"""

__version__ = "0.1.0"


class MinillmError(Exception):
    """A user's mistake (bad file, bad option): shown as one sentence, never as a traceback."""
