"""`warmserve sim grid`: every system on every cell of a regime grid (number of models x total rate
at one alpha, plus other alphas at one point), one JSON line per (cell, system). The config's model
mix is scaled to each cell's model count, keeping its proportions; nothing else changes."""

from __future__ import annotations

import itertools
import math

from sim.run import build, make_system, run

KEYS = ("ttft_p50_s", "ttft_p95_s", "ttft_p99_s", "share_ttft_under_100ms", "gpu_seconds", "prewarm_hit_rate",
        "bytes_loaded", "unfinished", "requests")


def scale_mix(mix: dict[str, int], n_models: int) -> dict[str, int]:
    """`mix` scaled to `n_models` in all, by largest remainder (ties: the config's order)."""
    total = sum(mix.values())
    exact = {k: v * n_models / total for k, v in mix.items()}
    counts = {k: math.floor(x) for k, x in exact.items()}
    for k in sorted(mix, key=lambda k: -(exact[k] - counts[k]))[: n_models - sum(counts.values())]:
        counts[k] += 1
    return counts


def cells(n_models: list[int], rates: list[float], alpha: float, other_alphas: list[float],
          point: tuple[int, float]) -> list[tuple[int, float, float]]:
    """(models, rate, alpha): the full models x rates grid at `alpha`, then other alphas at `point`."""
    grid = [(n, r, alpha) for n, r in itertools.product(n_models, rates)]
    return grid + [(point[0], point[1], a) for a in other_alphas if a != alpha]


def run_cell(config: dict, n_models: int, rate: float, alpha: float):
    """Yield one summary row per system of the config for this cell."""
    cell = {**config, "models": scale_mix(config["models"], n_models), "total_rate_rps": rate, "alpha": alpha}
    prepared = build(cell)
    for name in config["systems"]:
        summary = run(cell, make_system(name, cell), prepared=prepared).summary
        yield {"models": n_models, "mix": cell["models"], "rate_rps": rate, "alpha": alpha, "system": name,
               **{k: summary[k] for k in KEYS}}
