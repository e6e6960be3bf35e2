"""``python -m minillm <command>``: the command-line entry point.

Commands so far:

- ``pipeline``: the main job, every chapter's stage in order, resumable, with a summary.

A user's mistake (a missing file, an impossible option) prints one ``error:`` line and exits
with status 2; Ctrl-C exits with 130 and keeps everything already saved.
"""

from __future__ import annotations

import argparse
import sys

from minillm import MinillmError, __version__
from minillm.config import build_config, config_parser


def build_parser() -> argparse.ArgumentParser:
    from minillm.pipeline import PipelineConfig, STAGES

    parser = argparse.ArgumentParser(prog="python -m minillm", description="minillm: build LLMs from scratch in PyTorch.")
    parser.add_argument("--version", action="version", version=f"minillm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    pipeline = commands.add_parser(
        "pipeline", help="run the main job: every chapter's stage in order, resumable, with a summary",
        description=PipelineConfig.__doc__,
        epilog="stages: " + ", ".join(name for name, _, _ in STAGES),
    )
    config_parser(PipelineConfig, parser=pipeline)
    pipeline.set_defaults(config_class=PipelineConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command, config_class = args.pop("command"), args.pop("config_class")
    try:
        try:
            config = build_config(config_class, args)
        except ValueError as error:
            parser.error(str(error))
        if command == "pipeline":
            from minillm.pipeline import run_pipeline

            run_pipeline(config)
    except MinillmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: everything saved so far is kept; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
