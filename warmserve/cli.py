"""The `warmserve` command: one entry point dispatching to subcommand modules (imported lazily,
so `warmserve status` never pays for importing vLLM or statsmodels)."""

from __future__ import annotations

import importlib
import sys

# command words -> module exposing `main(argv: list[str]) -> int`
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("up",): ("warmserve.up", "start NATS, Redis and the four services; Ctrl-C stops everything"),
    ("models", "build-demo"): ("warmserve.models", "build the demo models and register them"),
    ("models", "list"): ("warmserve.models", "list registered models"),
    ("watch",): ("warmserve.watch", "print lifecycle events live"),
    ("status",): ("warmserve.status", "devices x models table and instances"),
    ("service",): ("warmserve.service", "run one service: forecaster | placer | gateway | gpuagent"),
    ("forecast", "backtest"): ("services.forecaster.backtest", "forecast accuracy on real traces"),
    ("bench", "placer"): ("bench.placer", "planning tick wall time"),
    ("bench", "agent"): ("bench.agent", "cold start vs promote vs warm TTFT with real vLLM"),
    ("bench", "gateway"): ("bench.gateway", "gateway added latency, max rate, cold burst"),
    ("bench", "fuzz"): ("bench.fuzz", "hostile request bodies and bus messages against a running stack"),
    ("bench", "chaos"): ("bench.chaos", "kill each service, a device worker, NATS and Redis under load"),
    ("sim", "sweep"): ("sim.cli", "max request rate per system under a P99 TTFT SLO"),
    ("sim",): ("sim.cli", "simulate the systems on a trace workload"),
}


def usage() -> str:
    lines = ["usage: warmserve COMMAND [options]", "", "commands:"]
    lines += [f"  {' '.join(words):<20} {help_}" for words, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for words, (module, _) in sorted(COMMANDS.items(), key=lambda kv: -len(kv[0])):
        if tuple(argv[: len(words)]) == words:
            # the module gets everything after the first word ("models list -v" -> ["list", "-v"])
            return importlib.import_module(module).main(argv[1:]) or 0
    print(usage(), file=sys.stderr)
    return 0 if argv[:1] in (["-h"], ["--help"]) else 2


if __name__ == "__main__":
    sys.exit(main())
