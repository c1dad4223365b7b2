"""The `warmserve` command: a tree of command words (click) over subcommand modules, each imported
only when run (so `warmserve status` never pays for importing vLLM or statsmodels).

Every group lists its commands (`warmserve bench --help`); a command's own options are its module's
(`warmserve bench fuzz --help`). Shell completion of the words: `eval "$(_WARMSERVE_COMPLETE=bash_source warmserve)"`.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import click

# command words -> (module exposing `main(argv: list[str]) -> int`, one-line help); the module gets the
# words after the first and then the options ("models list -v" -> ["list", "-v"])
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("up",): ("warmserve.up", "start NATS, Redis and the four services; Ctrl-C stops everything"),
    ("models", "build-demo"): ("warmserve.models", "build the demo models (Llama and Qwen2, random weights) and register them"),
    ("models", "list"): ("warmserve.models", "list registered models"),
    ("models", "add"): ("warmserve.model_admin", "validate, hash and register a local Hugging Face-format checkpoint"),
    ("models", "remove"): ("warmserve.model_admin", "unregister a model: the placer drains and evicts it everywhere"),
    ("models", "show"): ("warmserve.model_admin", "one model: registry entry, forecast, state per device"),
    ("watch",): ("warmserve.watch", "print lifecycle events live"),
    ("status",): ("warmserve.status", "devices x models table and instances"),
    ("service",): ("warmserve.service", "run one service: forecaster | placer | gateway | gpuagent"),
    ("forecast", "backtest"): ("services.forecaster.backtest", "forecast accuracy on real traces"),
    ("forecast", "import"): ("warmserve.history", "seed the live forecaster's history from a CSV or a compressed trace"),
    ("forecast", "export"): ("warmserve.history", "write the live forecaster's history as CSV"),
    ("bench", "placer"): ("bench.placer", "planning tick wall time"),
    ("bench", "agent"): ("bench.agent", "cold start vs promote vs warm TTFT with real vLLM"),
    ("bench", "gateway"): ("bench.gateway", "gateway added latency, max rate, cold burst"),
    ("bench", "fuzz"): ("bench.fuzz", "hostile request bodies and bus messages against a running stack"),
    ("bench", "chaos"): ("bench.chaos", "kill each service, a device worker, NATS and Redis under load"),
    ("bench", "live"): ("bench.live", "the real stack under a compressed trace slice: ours, paper, reactive, serverlessllm"),
    ("bench", "dashboard"): ("bench.dashboard", "the dashboard's panels drawn from a live in-process stack (PNG)"),
    ("sim", "sweep"): ("sim.cli", "max request rate per system under a P99 TTFT SLO"),
    ("sim",): ("sim.cli", "simulate the systems on a trace workload"),
}
GROUPS: dict[tuple[str, ...], str] = {
    (): "WarmServe: multi-LLM serving with forecast-driven GPU prewarming.",
    ("models",): "the model registry: build the demos, add your own checkpoints, list, show, remove",
    ("forecast",): "forecaster tools: backtests and load history",
    ("bench",): "benchmarks of each service and of the whole stack",
    ("sim",): "the cluster simulator (the services' cores, simulated clock)",
}
RUN = "run"  # in a group whose words are also a command, that command's name (`sim run` = `sim`)
HELP = {"help_option_names": ["-h", "--help"]}


class Module(click.Command):
    """A command run by its module's `main`; every option, --help included, is the module's."""

    def __init__(self, words: tuple[str, ...]):
        super().__init__(words[-1], help=COMMANDS[words][1], add_help_option=False,
                         params=[click.Argument(["argv"], nargs=-1)], callback=lambda argv: run(words, argv))

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.params["argv"] = list(args)  # untouched: the module parses them
        return []


class Words(click.Group):
    """The command words below `prefix`, built from COMMANDS."""

    def __init__(self, prefix: tuple[str, ...] = ()):
        runs = prefix in COMMANDS  # `sim` runs a simulation and is the group of `sim sweep`
        super().__init__(prefix[-1] if prefix else "warmserve", help=GROUPS.get(prefix, ""),
                         invoke_without_command=runs, no_args_is_help=not runs,
                         context_settings={**HELP, "ignore_unknown_options": runs},
                         callback=self.alone if runs else None)
        self.prefix = prefix

    def alone(self) -> int | None:
        """The group's own command, when no word below it was given (click calls this either way)."""
        if click.get_current_context().invoked_subcommand is None:
            return run(self.prefix, [])
        return None

    def list_commands(self, ctx: click.Context) -> list[str]:
        below = {words[len(self.prefix)] for words in COMMANDS
                 if len(words) > len(self.prefix) and words[:len(self.prefix)] == self.prefix}
        return sorted(below | ({RUN} if self.prefix in COMMANDS else set()))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == RUN and self.prefix in COMMANDS:
            return Module(self.prefix)
        words = self.prefix + (name,)
        if any(len(w) > len(words) and w[:len(words)] == words for w in COMMANDS):
            return Words(words)
        return Module(words) if words in COMMANDS else None

    def resolve_command(self, ctx: click.Context, args: list[str]):
        if self.get_command(ctx, args[0]) is None:
            if self.prefix in COMMANDS:  # not a word below: options of the group's own command
                return RUN, Module(self.prefix), args
            raise click.exceptions.NoSuchCommand(args[0], possibilities=self.list_commands(ctx), ctx=ctx)
        return super().resolve_command(ctx, args)


def invocation() -> str:
    """How a shell here runs this `warmserve`: the bare name when PATH finds this environment's script,
    else the script's path (relative when under the working directory), else `python -m warmserve.cli`."""
    script = Path(sys.executable).parent / "warmserve"
    if not script.is_file():
        return f"{sys.executable} -m warmserve.cli"
    found = shutil.which("warmserve")
    if found and Path(found).resolve() == script.resolve():
        return "warmserve"
    return str(script.relative_to(Path.cwd())) if script.is_relative_to(Path.cwd()) else str(script)


def run(words: tuple[str, ...], argv: list[str]) -> int:
    module = COMMANDS[words][0]
    return importlib.import_module(module).main([*words[1:], *argv]) or 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return Words().main(argv, prog_name="warmserve", standalone_mode=False) or 0
    except click.exceptions.NoArgsIsHelpError as exc:  # a group named alone: its help, as --help gives
        click.echo(exc.ctx.get_help())
        return 0
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        return 130


if __name__ == "__main__":
    sys.exit(main())
