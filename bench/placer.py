"""`warmserve bench placer [--json]`: wall and CPU time of one full planning tick of the placer core
on 8-GPU nodes with TP 1/2/4/8 models: the tick that fills an empty cluster, then ticks after the
forecasts are reshuffled and 30 % of models get live load (placement, eviction, allocation, scaling).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from services.placer.core import Config, ModelSpec, Node, Gpu, Snapshot, apply_effects, plan_tick

GIB = 1 << 30
CASES = ((16, 8, 0.010), (64, 64, 0.100), (1024, 1000, 2.0))  # (GPUs, models, target seconds)
TP_CHOICES = (1, 1, 1, 2, 2, 4, 8)


def build_snapshot(gpus: int, models: int, seed: int) -> Snapshot:
    rng = random.Random(seed)
    nodes = tuple(Node(f"n{i}", tuple(Gpu(d, 80 * GIB) for d in range(8))) for i in range(gpus // 8))
    specs = []
    for i in range(models):
        tp = rng.choice(TP_CHOICES)
        avg = rng.expovariate(1 / 24)
        specs.append(ModelSpec(f"m{i}", int(tp * rng.uniform(8, 60) * GIB), tp, avg=avg,
                               peak=avg * rng.uniform(1, 4), kv_bytes=2 * GIB))
    return Snapshot(nodes, tuple(specs))


def reshuffled(snapshot: Snapshot, seed: int) -> Snapshot:
    rng = random.Random(seed)
    forecasts = [(m.avg, m.peak) for m in snapshot.models]
    rng.shuffle(forecasts)
    specs = tuple(ModelSpec(m.name, m.size_bytes, m.tp, avg, peak, m.kv_bytes)
                  for m, (avg, peak) in zip(snapshot.models, forecasts))
    loads = {m.name: m.avg for m in specs if rng.random() < 0.3}
    return Snapshot(snapshot.nodes, specs, loads)  # each node keeps its copies and instances


def run_case(gpus: int, models: int, repeats: int, config: Config) -> dict:
    snapshot = build_snapshot(gpus, models, seed=gpus + models)
    start = time.perf_counter()
    first = plan_tick(snapshot, 0.0, config)
    fill_s = time.perf_counter() - start
    warmed = reshuffled(apply_effects(snapshot, first.effects, 0.0), seed=1)
    times, cpu_times, result = [], [], None
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = plan_tick(warmed, 100.0, config)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    kinds: dict[str, int] = {}
    for effect in result.effects:
        kinds[type(effect).__name__] = kinds.get(type(effect).__name__, 0) + 1
    return {"gpus": gpus, "models": models, "copies_before": len(warmed.copies), "effects": kinds,
            "fill_tick_s": fill_s, "median_s": statistics.median(times), "max_s": max(times),
            "median_cpu_s": statistics.median(cpu_times)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="warmserve bench placer", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--repeats", type=int, default=5, help="timed ticks per case")
    parser.add_argument("--placement", default="evict_aware", choices=("evict_aware", "paper", "round_robin"))
    args = parser.parse_args(argv[1:] if argv[:1] == ["placer"] else argv)
    config = Config(placement=args.placement)
    rows = []
    for gpus, models, target in CASES:
        row = run_case(gpus, models, args.repeats, config)
        row.update(target_s=target, within_target=row["median_s"] < target)
        rows.append(row)
    if args.json:
        print(json.dumps({"benchmark": "placer_tick", "placement": args.placement, "cases": rows}, indent=2))
    else:
        print(f"{'GPUs':>6} {'models':>7} {'copies':>7} {'fill ms':>9} {'median ms':>10} {'max ms':>9} "
              f"{'cpu ms':>9} {'target ms':>10}  effects of the timed tick")
        for r in rows:
            print(f"{r['gpus']:>6} {r['models']:>7} {r['copies_before']:>7} {r['fill_tick_s'] * 1e3:>9.2f} "
                  f"{r['median_s'] * 1e3:>10.2f} "
                  f"{r['max_s'] * 1e3:>9.2f} {r['median_cpu_s'] * 1e3:>9.2f} {r['target_s'] * 1e3:>10.0f}  {r['effects']}")
    return 0 if all(r["within_target"] for r in rows) else 1
