"""`warmserve sim`: run the configured systems on a trace workload and print their metrics
(a table, or JSON with --json), writing PNG plots into --out; `warmserve sim sweep` finds each
system's max request rate with P99 TTFT under --slo-p99-s; `warmserve sim grid` runs every system on
a regime grid (sim/grid.py) and prints one JSON line per cell and system."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sim import grid, plots
from sim.demand import gpu_demand
from sim.run import build, load_config, make_system, replay_window, run, timing_for
from sim.sweep import max_rate

COLUMNS = ("ttft_p50_s", "ttft_p95_s", "ttft_p99_s", "share_ttft_under_100ms", "gpu_seconds",
           "prewarm_hit_rate", "bytes_loaded", "unfinished")


def _parser(mode: str) -> argparse.ArgumentParser:
    sweep = mode == "sweep"
    p = argparse.ArgumentParser(prog="warmserve sim" + (f" {mode}" if mode else ""))
    p.add_argument("--config", required=True, help="JSON config (see sim/configs/)")
    p.add_argument("--systems", help="comma-separated systems (default: the config's list)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", default="out", help="directory for PNG plots")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a config key")
    if sweep:
        p.add_argument("--slo-p99-s", type=float, default=None, help="P99 TTFT SLO (default: the config's)")
        p.add_argument("--low-rps", type=float, default=None)
        p.add_argument("--high-rps", type=float, default=None)
        p.add_argument("--steps", type=int, default=5)
    if mode == "grid":
        p.add_argument("--models-grid", default="14,28,56", help="model counts (the config's mix, scaled)")
        p.add_argument("--rates", default="2,5,10", help="total request rates, req/s")
        p.add_argument("--alpha", type=float, default=0.5, help="alpha of the full grid")
        p.add_argument("--other-alphas", default="0,1,2", help="alphas run at --point only")
        p.add_argument("--point", default="14,10", help="MODELS,RATE where the other alphas run")
    return p


def _config(args) -> dict:
    config = load_config(args.config)
    for item in args.set:
        key, _, value = item.partition("=")
        config[key] = json.loads(value)
    if args.systems:
        config["systems"] = args.systems.split(",")
    return config


def main(argv: list[str]) -> int:
    mode = argv[0] if argv[:1] in (["sweep"], ["grid"]) else ""
    args = _parser(mode).parse_args(argv[1:] if mode else argv)
    config = _config(args)
    if mode == "grid":
        return _grid(config, args)
    return _sweep(config, args) if mode else _simulate(config, args)


def _grid(config: dict, args) -> int:
    models, rate = args.point.split(",")
    for n, r, a in grid.cells([int(x) for x in args.models_grid.split(",")], [float(x) for x in args.rates.split(",")],
                              args.alpha, [float(x) for x in args.other_alphas.split(",")], (int(models), float(rate))):
        for row in grid.run_cell(config, n, r, a):
            print(json.dumps(row), flush=True)
    return 0


def _simulate(config: dict, args) -> int:
    prepared = build(config)
    results = []
    for name in config["systems"]:
        print(f"simulating {name} ...", file=sys.stderr)
        results.append(run(config, make_system(name, config), progress=True, timeline=not args.no_plots,
                           prepared=prepared))
    demand = gpu_demand(*prepared, timing_for(config), *replay_window(config),
                        config["nodes"] * config["gpus_per_node"])
    report = {"config": Path(args.config).name, "workload_demand": demand,
              "systems": {r.system: r.summary for r in results}}
    if not args.no_plots:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = Path(args.config).stem
        files = [plots.ttft_cdf(results, out / f"{stem}-ttft-cdf.png")]
        files += [plots.gpu_timeline(r, config["nodes"], config["gpus_per_node"], out / f"{stem}-gpus-{r.system}.png")
                  for r in results]
        report["plots"] = [str(f) for f in files]
    print(json.dumps(report, indent=2) if args.json else _demand_line(demand) + "\n" + _table(report["systems"]))
    return 0


def _sweep(config: dict, args) -> int:
    slo = args.slo_p99_s if args.slo_p99_s is not None else config.get("slo_p99_ttft_s", 1.0)
    low = args.low_rps if args.low_rps is not None else config.get("sweep_low_rps", 1.0)
    high = args.high_rps if args.high_rps is not None else config.get("sweep_high_rps", 4 * config["total_rate_rps"])
    report = {"config": Path(args.config).name, "slo_p99_ttft_s": slo, "systems": {}}
    for name in config["systems"]:
        print(f"sweeping {name} ...", file=sys.stderr)
        report["systems"][name] = max_rate(
            lambda rate: run({**config, "total_rate_rps": rate}, make_system(name, config)).summary,
            slo, low, high, args.steps)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"max request rate with P99 TTFT <= {slo} s")
        for name, found in report["systems"].items():
            print(f"  {name:<22} {found['max_rate_rps']:>8} req/s")
    return 0


def _demand_line(demand: dict) -> str:
    return (f"workload: one instance per model with requests needs {demand['mean_gpus_needed']} GPUs on average "
            f"(P95 {demand['p95_gpus_needed']:g}) of {demand['gpus']}; more than the cluster "
            f"{demand['share_over_capacity']:.0%} of the time")


def _table(systems: dict) -> str:
    lines = [f"{'system':<22}" + "".join(f"{c:>24}" for c in COLUMNS)]
    for name, s in systems.items():
        lines.append(f"{name:<22}" + "".join(f"{_fmt(s[c]):>24}" for c in COLUMNS))
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
