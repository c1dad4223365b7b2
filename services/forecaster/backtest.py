"""`warmserve forecast backtest`: forecast accuracy of every method on a real-trace workload.

Builds the workload (shared.workload; or `--trace periodic`: synthetic batch jobs, each model a
burst every 12-70 min), turns each model's requests into per-window average and peak outstanding
requests (each request lasts prefill + output x decode time), learns on the first days and scores
one-step-ahead forecasts on the rest, and the share of idle-to-busy onsets each method foresaw.
Prints a table (or JSON), writes a PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from services.forecaster.core.baselines import holt_winters_one_step, sarima_one_step
from services.forecaster.core.metrics import onsets_foreseen, score
from services.forecaster.core.online import METHODS, OnlineForecaster
from services.forecaster.core.windows import RequestTiming, season_length, trace_windows
from shared.traces import AZURE_DIR, SERVEGEN_DIR
from shared.workload import DAY_S, Workload, build_workload

STATSMODELS = {"holt_winters": holt_winters_one_step, "sarima": sarima_one_step}
ALL_METHODS = METHODS + tuple(STATSMODELS)
PLOTTED_MODELS = 4
PERIODIC_PERIOD_S = 700.0  # periodic trace: model m bursts every (1 + m % 6) x this (no multiple divides a day)
PERIODIC_BURST = (10, 30)  # requests per burst (uniform), arriving within PERIODIC_BURST_S
PERIODIC_BURST_S = 20.0
PERIODIC_BACKGROUND_RPS = 0.02  # odd models also get a steady Poisson trickle
PERIODIC_TOKENS = (200, 64)  # prompt and output tokens of every periodic request


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="warmserve forecast backtest", description=__doc__)
    parser.add_argument("--trace", choices=["servegen", "periodic"], default="servegen",
                        help="workload source (periodic: synthetic bursts, --train-days learnt, one day scored)")
    parser.add_argument("--models", type=int, default=16, help="number of models")
    parser.add_argument("--alpha", type=float, default=0.5, help="popularity skew (i+1)^-alpha")
    parser.add_argument("--rate", type=float, default=20.0, help="total request rate, req/s")
    parser.add_argument("--window", type=float, default=300.0, help="window length W, seconds")
    parser.add_argument("--train-days", type=int, default=7, help="days to learn on; the rest is scored")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated methods")
    parser.add_argument("--csp-days", type=int, default=3, help="CSP: D previous days")
    parser.add_argument("--csp-errors", type=int, default=10, help="CSP: N recent errors")
    parser.add_argument("--prefill-s-per-token", type=float, default=RequestTiming.prefill_s_per_token)
    parser.add_argument("--decode-s-per-token", type=float, default=RequestTiming.decode_s_per_token)
    parser.add_argument("--servegen-dir", default=str(SERVEGEN_DIR))
    parser.add_argument("--azure-dir", default=str(AZURE_DIR))
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", default=None, help="PNG path (default out/forecast_backtest_w<W>.png)")
    args = parser.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(ALL_METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)} (choose from {', '.join(ALL_METHODS)})")
    return args


def trace_loads(workload: Workload, window_s: float, timing: RequestTiming) -> tuple[np.ndarray, np.ndarray]:
    """(avg, peak) arrays of shape (models, windows) over the whole workload."""
    n_windows = int(workload.duration_s // window_s)
    avg, peak = np.zeros((len(workload.models), n_windows)), np.zeros((len(workload.models), n_windows))
    for m in range(len(workload.models)):
        requests = workload.model_arrivals(m, 0.0, workload.duration_s)
        durations = timing.durations(requests.prompt_tokens, requests.output_tokens)
        avg[m], peak[m] = trace_windows(requests.time_s, durations, window_s, n_windows)
    return avg, peak


def periodic_loads(n_models: int, days: int, window_s: float, timing: RequestTiming,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(avg, peak) per (model, window) of the synthetic periodic trace: batch jobs at a fixed
    period and random phase, each a burst of requests."""
    rng = np.random.default_rng(seed)
    duration_s = days * DAY_S
    n_windows = int(duration_s // window_s)
    avg, peak = np.zeros((n_models, n_windows)), np.zeros((n_models, n_windows))
    prompt, output = PERIODIC_TOKENS
    for m in range(n_models):
        period_s = PERIODIC_PERIOD_S * (1 + m % 6)
        starts = np.arange(rng.uniform(0, period_s), duration_s, period_s)
        sizes = rng.integers(PERIODIC_BURST[0], PERIODIC_BURST[1] + 1, len(starts))
        arrivals = [s + rng.uniform(0, PERIODIC_BURST_S, n) for s, n in zip(starts, sizes)]
        if m % 2:
            arrivals.append(rng.uniform(0, duration_s, rng.poisson(PERIODIC_BACKGROUND_RPS * duration_s)))
        time_s = np.sort(np.concatenate(arrivals))
        durations = timing.durations(np.full(len(time_s), prompt), np.full(len(time_s), output))
        avg[m], peak[m] = trace_windows(time_s, durations, window_s, n_windows)
    return avg, peak


def run_online(method: str, avg: np.ndarray, peak: np.ndarray, window_s: float, train: int,
               csp_days: int, csp_errors: int) -> tuple[np.ndarray, np.ndarray, float, dict[str, int]]:
    """Feed every window in order; forecasts for windows >= train, ms per window, method counts."""
    forecaster = OnlineForecaster(method, window_s, csp_days, csp_errors)
    for m in range(len(avg)):
        forecaster.add_model(f"m{m}")
    pred_avg, pred_peak = np.zeros_like(avg[:, train:]), np.zeros_like(peak[:, train:])
    used: dict[str, int] = {}
    elapsed = 0.0
    for t in range(avg.shape[1]):
        began = time.perf_counter()
        predicted = forecaster.forecast_rows(t)
        forecaster.observe_rows(t, avg[:, t], peak[:, t])
        if t >= train:
            elapsed += time.perf_counter() - began
            pred_avg[:, t - train], pred_peak[:, t - train] = predicted.avg, predicted.peak
            for label in predicted.methods:
                used[label] = used.get(label, 0) + 1
    return pred_avg, pred_peak, 1000 * elapsed / max(avg.shape[1] - train, 1), used


def run_statsmodels(method: str, avg: np.ndarray, peak: np.ndarray, train: int,
                    season: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Fit once per model and series on the training part, filter forward; ms per scored window."""
    one_step = STATSMODELS[method]
    began = time.perf_counter()
    pred_avg = np.array([one_step(series, train, season) for series in avg])
    pred_peak = np.array([one_step(series, train, season) for series in peak])
    return pred_avg, pred_peak, 1000 * (time.perf_counter() - began) / max(avg.shape[1] - train, 1)


def backtest(args: argparse.Namespace) -> dict:
    timing = RequestTiming(args.prefill_s_per_token, args.decode_s_per_token)
    if args.trace == "periodic":
        days, models, clients = args.train_days + 1, [f"periodic{m}" for m in range(args.models)], []
        avg, peak = periodic_loads(args.models, days, args.window, timing, args.seed)
    else:
        workload = build_workload(args.models, args.alpha, args.rate, args.seed, args.servegen_dir, args.azure_dir)
        days, models, clients = workload.days, workload.models, workload.clients
        avg, peak = trace_loads(workload, args.window, timing)
    season = season_length(args.window)
    train = args.train_days * season
    results, predictions = {}, {}
    for method in args.methods.split(","):
        if method in STATSMODELS:
            pred_avg, pred_peak, ms = run_statsmodels(method, avg, peak, train, season)
            used = {method: pred_avg.size}
        else:
            pred_avg, pred_peak, ms, used = run_online(method, avg, peak, args.window, train,
                                                       args.csp_days, args.csp_errors)
        predictions[method] = pred_peak
        foreseen, onsets = onsets_foreseen(pred_peak, peak[:, train:])
        results[method] = {"avg": asdict(score(pred_avg, avg[:, train:])),
                           "peak": asdict(score(pred_peak, peak[:, train:])),
                           "onsets_foreseen": foreseen, "onsets": onsets,
                           "ms_per_window": ms, "methods_used": used}
    plot_path = Path(args.plot or f"out/forecast_backtest_{args.trace}_w{args.window:g}.png")
    plot(plot_path, peak[:, train:], predictions, args.window, models)
    return {"workload": {"trace": args.trace, "models": models, "clients": clients,
                         "alpha": args.alpha, "total_rate_rps": args.rate, "seed": args.seed,
                         "window_s": args.window, "train_days": args.train_days,
                         "eval_days": days - args.train_days, "timing": asdict(timing),
                         "mean_avg_outstanding": avg.mean(axis=1).round(2).tolist()},
            "results": results, "plot": str(plot_path)}


def plot(path: Path, actual_peak: np.ndarray, predicted_peak: dict[str, np.ndarray], window_s: float,
         models: list[str]) -> None:
    """Predicted vs actual peak of the most popular models over the first two scored days."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    span = min(int(2 * DAY_S // window_s), actual_peak.shape[1])
    hours = np.arange(span) * window_s / 3600
    fig, axes = plt.subplots(2, 2, figsize=(14, 8), sharex=True)
    for m, ax in enumerate(axes.flat[:min(PLOTTED_MODELS, len(actual_peak))]):
        ax.plot(hours, actual_peak[m, :span], color="black", linewidth=1.2, label="actual")
        for method in ("csp", "ours"):
            if method in predicted_peak:
                ax.plot(hours, predicted_peak[method][m, :span], linewidth=0.9, label=method)
        ax.set_title(f"{models[m]}: peak outstanding requests per {window_s:g} s window")
        ax.set_xlabel("hours into the scored period")
        ax.legend(loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(report: dict) -> str:
    w = report["workload"]
    source = (f"ServeGen clients {w['clients']}), alpha {w['alpha']}, {w['total_rate_rps']} req/s"
              if w["trace"] == "servegen" else "synthetic bursts every 12-70 min)")
    lines = [f"workload: {len(w['models'])} models ({source}, window {w['window_s']:g} s, "
             f"learn {w['train_days']} d, score {w['eval_days']} d",
             f"{'method':<16}{'avg acc':>9}{'avg med':>9}{'avg MRE':>9}{'peak acc':>10}{'peak med':>10}"
             f"{'peak MRE':>10}{'onsets':>8}{'ms/window':>11}   top-4 models avg | peak accuracy"]
    for method, r in report["results"].items():
        a, p = r["avg"], r["peak"]
        top = " ".join(f"{x:.3f}" for x in a["per_model"][:PLOTTED_MODELS]) + " | " + " ".join(
            f"{x:.3f}" for x in p["per_model"][:PLOTTED_MODELS])
        lines.append(f"{method:<16}{a['overall']:>9.4f}{a['median_model']:>9.4f}{a['mre']:>9.4f}"
                     f"{p['overall']:>10.4f}{p['median_model']:>10.4f}{p['mre']:>10.4f}"
                     f"{r['onsets_foreseen']:>8.3f}{r['ms_per_window']:>11.3f}"
                     f"   {top}")
    lines.append("accuracy = 1 - sum|pred-actual|/sum actual (empty windows included); MRE over non-empty "
                 "windows only; onsets = share of idle-to-busy windows whose predicted peak was >= 0.5 (a copy is "
                 "placed); ms/window = forecast (+ online update) of all models for one window")
    lines.append(f"plot: {report['plot']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv[1:] if argv[:1] == ["backtest"] else argv)
    report = backtest(args)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
