"""``python -m minillm serve``: serve a run folder over HTTP, OpenAI-compatible (:mod:`minillm.serving`).

::

    python -m minillm serve --run runs/shakespeare-char                 # a GPT: POST /v1/completions
    python -m minillm serve --run runs/sst2-classifier --port 8001      # a classifier: POST /v1/classify
    python -m minillm serve --run runs/shakespeare-char --max-batch 1   # no batching, for the comparison
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from minillm.device import pick_device
from minillm.serving import ServingConfig, load_served_model, serve


@dataclass
class ServeConfig(ServingConfig):
    """Serve a GPT run (OpenAI-compatible /v1/completions) or a fine-tuned classifier run (/v1/classify) over HTTP."""

    run: str = field(default="runs/gpt", metadata={"help": "run folder to serve: a GPT ('pretrain gpt') or a fine-tuned "
                                                           "classifier ('finetune')"})
    quantize: Literal["none", "int8"] = field(default="none", metadata={"help": "int8: serve int8 weights "
                                                                                "(minillm.quantization)"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:N, mps or auto (cuda > mps > cpu)"})


def run_serve(config: ServeConfig) -> None:
    served = load_served_model(config.run, pick_device(config.device), quantize=config.quantize, name=config.model_name)
    print(f"serving {served.name} ({served.kind}) on http://{config.host}:{config.port} "
          f"(max batch {config.max_batch}, window {config.batch_window_ms:g} ms); Ctrl-C stops", flush=True)
    serve(served, config)
