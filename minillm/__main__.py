"""``python -m minillm <command>``: the command-line entry point; the commands live in :mod:`minillm.commands`.

- ``pipeline``: the main job, every chapter's stage in order, resumable, with a summary.
- ``pretrain gpt`` / ``pretrain bert``: pretrain a GPT on a text file, a BERT on IMDB's unlabelled reviews (``minillm.pretrain``, ``minillm.bert_pretraining``).
- ``finetune``: fine-tune a pretrained BERT run on SST-2 or IMDB, fully or parameter-efficiently (``minillm.commands.finetune``).
- ``generate``: sample from a pretrained run.
- ``evaluate``: score a finished run on its held-out data (``minillm.evaluation``).
- ``export``: write a run as ONNX (checked with ONNX Runtime) or as a Hugging Face folder (``minillm.onnx_export``).
- ``serve``: an OpenAI-compatible HTTP server for a GPT or classifier run, batching requests (``minillm.serving``).
- ``export``: a run as an ONNX model checked against onnxruntime, or as a Hugging Face folder (``minillm.commands.export``).
- ``bench``: training throughput (and MFU on CUDA) of a GPT shape, or of BERT pretraining against Hugging Face's (``minillm.commands.bench``).

Every option comes from a configuration dataclass, so ``--help`` lists them all with their
defaults. A user's mistake (a missing file, an impossible option) prints one ``error:`` line and
exits with status 2; Ctrl-C exits with 130 and keeps everything already saved.
"""

from __future__ import annotations

import argparse
import sys

from minillm import MinillmError, __version__, interrupted_message
from minillm.config import build_config, config_parser, quick_requested


def _commands():
    from minillm.commands import commands

    return commands()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minillm", description="minillm: build LLMs from scratch in PyTorch.")
    parser.add_argument("--version", action="version", version=f"minillm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (config_class, _, help_text) in _commands().items():
        if " " in name:  # "pretrain gpt": a group of commands
            group, sub = name.split(" ", 1)
            if group not in groups:
                group_parser = commands.add_parser(group, help=f"{group} a model: " + ", ".join(
                    n.split(" ", 1)[1] for n in _commands() if n.startswith(group + " ")))
                groups[group] = group_parser.add_subparsers(dest="subcommand", metavar="model", required=True)
            command = groups[group].add_parser(sub, help=help_text, description=config_class.__doc__)
        else:
            command = commands.add_parser(name, help=help_text, description=config_class.__doc__)
        if name == "pipeline":
            from minillm.commands.pipeline import STAGES

            command.epilog = "stages: " + ", ".join(stage for stage, *_ in STAGES)
        config_parser(config_class, parser=command)
        command.set_defaults(command_name=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    name = args.pop("command_name")
    args.pop("command", None)
    args.pop("subcommand", None)
    config_class, run, _ = _commands()[name]
    try:
        try:
            config = build_config(config_class, args, quick=bool(args.get("quick")) or quick_requested())
            if isinstance(getattr(config, "device", None), str):
                from minillm.device import pick_device

                pick_device(config.device)
        except (ValueError, MinillmError) as error:
            parser.error(str(error))
        run(config)
    except MinillmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(interrupted_message(interrupt), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
