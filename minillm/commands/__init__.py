"""The commands of ``python -m minillm``: thin layers that parse a configuration and call topic modules.

Each command is a configuration dataclass (its fields are the command line, :mod:`minillm.config`) and a
function that runs it. Topic modules (models, tasks, data, training) never import a command; commands
import topics. :data:`COMMANDS` lists them for :mod:`minillm.__main__`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple


class Command(NamedTuple):
    config_class: type
    run: Callable
    help: str


def commands() -> dict[str, Command]:
    """command name -> :class:`Command` ("pretrain gpt": a command of the group "pretrain"). Imported on
    demand, so that ``--help`` of one command does not import every other."""
    from minillm.bert_pretraining import BertPretrainConfig, pretrain_bert
    from minillm.commands.bench import BenchConfig, run_bench
    from minillm.commands.evaluate import EvaluateConfig, run_evaluate
    from minillm.commands.export import ExportConfig, run_export
    from minillm.commands.finetune import FinetuneCommandConfig, run_finetune
    from minillm.commands.generate import GenerateConfig, generate
    from minillm.commands.notebooks import NotebooksConfig, run_notebooks
    from minillm.commands.pipeline import PipelineConfig, run_pipeline
    from minillm.commands.serve import ServeConfig, run_serve
    from minillm.pretrain import GPTPretrainConfig, pretrain_gpt

    return {
        "pipeline": Command(PipelineConfig, run_pipeline, "run the main job: every chapter's stage in order, resumable, "
                                                          "with a summary"),
        "pretrain gpt": Command(GPTPretrainConfig, pretrain_gpt, "pretrain a GPT language model on a text file"),
        "pretrain bert": Command(BertPretrainConfig, pretrain_bert, "pretrain a BERT (masked LM + next sentence) on IMDB's "
                                                                    "unlabelled reviews, SST-2 or a text file"),
        "finetune": Command(FinetuneCommandConfig, run_finetune, "fine-tune a pretrained BERT run as a sentiment classifier "
                                                                 "(full, head-only, top layers, adapters, LoRA, prompt tuning)"),
        "generate": Command(GenerateConfig, generate, "sample text from a pretrained GPT run"),
        "evaluate": Command(EvaluateConfig, run_evaluate, "score a finished run on its held-out data (perplexity, "
                                                          "accuracy / F1 / confusion matrix, BLEU): eval.json"),
        "notebooks": Command(NotebooksConfig, run_notebooks, "execute the chapter notebooks and save them with their "
                                                             "outputs and figures"),
        "export": Command(ExportConfig, run_export, "export a run as an ONNX model (checked against onnxruntime) or a "
                                                    "Hugging Face transformers folder"),
        "bench": Command(BenchConfig, run_bench, "measure training tokens/s (and MFU on CUDA) of a GPT shape, or of BERT "
                                                 "pretraining against Hugging Face's"),
        "serve": Command(ServeConfig, run_serve, "serve a GPT run (OpenAI-compatible /v1/completions) or a classifier run "
                                                 "(/v1/classify) over HTTP, with dynamic batching"),
    }
