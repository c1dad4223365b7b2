"""`warmserve forecast import | export`: the live forecaster's window history in and out.

import --csv FILE: per-window loads, one row each: `model,window_start_s,avg,peak` (header first;
an optional `window_s` column must equal the forecaster's window; window_start_s in unix seconds,
a multiple of window_s; `--shift-to-now` moves them so the newest ends where the current window
starts). import --workload: the shared workload builder's ServeGen models, `--learn-days` trace days
before `--start-day`, compressed `--compress` times and ending where the current window starts
(trace day --start-day begins then). Each model's windows go to the forecaster (HistoryImport);
the last message makes it relearn and forecast. export: the stored history as that CSV.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import sys
import time
from typing import TextIO

from services.forecaster.core.replay import Compression, history_windows
from services.forecaster.core.windows import RequestTiming, WindowStats
from shared.bus import Bus
from shared.schemas import CommandResult, HistoryImport, WindowLoad
from shared.settings import CONNECTION, Settings, add_arguments, load_settings
from shared.state import State
from shared.traces import AZURE_DIR, SERVEGEN_DIR
from shared.workload import DAY_S, Workload, build_workload

COLUMNS = ("model", "window_start_s", "window_s", "avg", "peak")
WINDOWS_PER_MESSAGE = 2000  # NATS' 1 MB payload limit holds about 10 000 windows


class HistoryError(ValueError):
    """A history file or import the forecaster cannot take; the message says why."""


def read_csv(source: TextIO, window_s: float) -> dict[str, list[WindowLoad]]:
    reader = csv.DictReader(source)
    missing = {"model", "window_start_s", "avg", "peak"} - set(reader.fieldnames or ())
    if missing:
        raise HistoryError(f"CSV lacks the columns {sorted(missing)} (header: model,window_start_s,avg,peak)")
    history: dict[str, list[WindowLoad]] = {}
    for line, row in enumerate(reader, start=2):
        try:
            if row.get("window_s") and abs(float(row["window_s"]) - window_s) > 1e-9:
                raise HistoryError(f"window_s {row['window_s']} is not the forecaster's window ({window_s:g} s)")
            load = WindowLoad(window_start_s=float(row["window_start_s"]), avg=float(row["avg"]),
                              peak=float(row["peak"]))
        except (ValueError, TypeError) as exc:
            raise HistoryError(f"line {line}: {exc}") from None
        history.setdefault(row["model"], []).append(load)
    return history


def write_csv(history: dict[str, list[WindowStats]], out: TextIO) -> None:
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    for model in sorted(history):
        for w in sorted(history[model], key=lambda w: w.window_start_s):
            writer.writerow([model, f"{w.window_start_s:.3f}", f"{w.window_s:g}", f"{w.avg:.6g}", f"{w.peak:.6g}"])


def shift_to(history: dict[str, list[WindowLoad]], end_s: float, window_s: float) -> dict[str, list[WindowLoad]]:
    """Every window moved by the same whole number of windows so the newest ends at `end_s`."""
    newest = max((w.window_start_s for loads in history.values() for w in loads), default=end_s - window_s)
    shift = round((end_s - window_s - newest) / window_s) * window_s
    return {m: [w.model_copy(update={"window_start_s": w.window_start_s + shift}) for w in loads]
            for m, loads in history.items()}


def workload_history(workload: Workload, names: list[str], compression: Compression, learn_days: float,
                     window_s: float, timing: RequestTiming) -> dict[str, list[WindowLoad]]:
    """The `learn_days` before the compression's anchor of the workload's first len(names) models,
    in live windows ending at the anchor (which should be a window boundary)."""
    n_windows = math.floor(learn_days * DAY_S / compression.factor / window_s)
    end_s = compression.anchor_live_s
    loads = history_windows(workload, list(range(len(names))), compression, end_s - n_windows * window_s,
                            n_windows, window_s, timing)
    return dict(zip(names, loads))


async def send(settings: Settings, history: dict[str, list[WindowLoad]]) -> list[CommandResult]:
    """Every model's windows to the forecaster, in messages of WINDOWS_PER_MESSAGE; the very last
    one asks it to relearn. A refused message stops the import."""
    messages = [HistoryImport(model=model, window_s=settings.window_s, windows=loads[i:i + WINDOWS_PER_MESSAGE],
                              last=False)
                for model, loads in sorted(history.items()) for i in range(0, max(len(loads), 1), WINDOWS_PER_MESSAGE)]
    if messages:
        messages[-1] = messages[-1].model_copy(update={"last": True})
    bus = await Bus.connect(settings, "warmserve-forecast-import")
    results = []
    try:
        for message in messages:
            result = await bus.request(bus.subjects.forecast_import(), message, CommandResult, timeout_s=120.0)
            results.append(result)
            if not result.ok:
                raise HistoryError(f"{message.model}: {result.reason}")
    finally:
        await bus.close()
    return results


async def stored(settings: Settings, models: list[str]) -> dict[str, list[WindowStats]]:
    state = await State.connect(settings)
    try:
        chosen = models or sorted(await state.models())
        return {m: list((await state.hgetall(state.keys.window_history(m), WindowStats)).values()) for m in chosen}
    finally:
        await state.close()


async def registered(settings: Settings) -> list[str]:
    state = await State.connect(settings)
    try:
        return sorted(await state.models())
    finally:
        await state.close()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="warmserve forecast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["import", "export"])
    parser.add_argument("--csv", help="import: per-window loads (see above); export: where to write (default stdout)")
    parser.add_argument("--shift-to-now", action="store_true", help="import --csv: end the history now")
    parser.add_argument("--end-s", type=float, default=None, help="import: 'now' for --shift-to-now and --workload, "
                                                                   "unix seconds (default: the current window's start)")
    parser.add_argument("--workload", action="store_true", help="import the shared workload builder's models")
    parser.add_argument("--models", default="", help="comma-separated model names (import --workload: which "
                                                     "registered models replay workload models 0, 1, ...; default all, "
                                                     "by name; export: which to write)")
    parser.add_argument("--alpha", type=float, default=0.5, help="workload: popularity skew")
    parser.add_argument("--rate", type=float, default=1.0, help="workload: total rate in trace time, req/s (the "
                                                                "live rate is --compress times more)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--order", choices=["rate", "quiet"], default="rate", help="workload: client order")
    parser.add_argument("--learn-days", type=float, default=7.0, help="workload: trace days of history")
    parser.add_argument("--start-day", type=float, default=7.0, help="workload: the trace day that begins now")
    parser.add_argument("--compress", type=float, default=1.0, help="workload: trace seconds per live second "
                                                                    "(a day in 24 min: 60; season_s = 86400 / this)")
    parser.add_argument("--prefill-s-per-token", type=float, default=RequestTiming.prefill_s_per_token)
    parser.add_argument("--decode-s-per-token", type=float, default=RequestTiming.decode_s_per_token)
    parser.add_argument("--servegen-dir", default=str(SERVEGEN_DIR))
    parser.add_argument("--azure-dir", default=str(AZURE_DIR))
    add_arguments(parser, (*CONNECTION, "window_s"))
    args = parser.parse_args(argv)
    if args.action == "import" and bool(args.csv) == args.workload:
        parser.error("import needs exactly one of --csv FILE and --workload")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    settings = load_settings(vars(args))
    models = [m for m in args.models.split(",") if m]
    if args.action == "export":
        history = asyncio.run(stored(settings, models))
        if args.csv:
            with open(args.csv, "w", newline="") as out:
                write_csv(history, out)
        else:
            write_csv(history, sys.stdout)
        return 0
    now_s = time.time() if args.end_s is None else args.end_s
    end_s = math.floor(now_s / settings.window_s) * settings.window_s  # the current window's start
    summary: dict = {}
    try:
        if args.csv:
            with open(args.csv, newline="") as source:
                history = read_csv(source, settings.window_s)
            if args.shift_to_now:
                history = shift_to(history, end_s, settings.window_s)
        else:
            names = models or asyncio.run(registered(settings))
            workload = build_workload(len(names), args.alpha, args.rate, args.seed, args.servegen_dir,
                                      args.azure_dir, order=args.order)
            history = workload_history(workload, names, Compression(args.compress, args.start_day * DAY_S, end_s),
                                       args.learn_days, settings.window_s,
                                       RequestTiming(args.prefill_s_per_token, args.decode_s_per_token))
            summary["replay"] = {"trace_day": args.start_day, "starts_at_s": end_s, "compress": args.compress,
                                 "season_s": DAY_S / args.compress}
        results = asyncio.run(send(settings, history))
    except (HistoryError, OSError) as exc:
        print(f"warmserve forecast import: {exc}", file=sys.stderr)
        return 1
    summary.update(models=len(history), windows=sum(r.detail.get("windows", 0) for r in results),
                   skipped=sum(r.detail.get("skipped", 0) for r in results))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
