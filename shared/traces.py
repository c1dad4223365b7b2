"""Loaders for the real workload traces the project ships (shared/data/traces, see its README).

ServeGen per-client CSVs (one row per 600 s window: rate, CV and the fitted inter-arrival law)
and Azure LLM inference CSVs (one row per request: timestamp, prompt and output tokens).
Pure file parsing into numpy arrays; no randomness, no workload logic (that is shared.workload).
"""

from __future__ import annotations

import csv
import gzip
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).parent / "data" / "traces"
SERVEGEN_DIR = DATA_DIR / "servegen-m-large"
AZURE_DIR = DATA_DIR / "azure-llm-2023"
AZURE_FILES = {"code": "AzureLLMInferenceTrace_code.csv", "conv": "AzureLLMInferenceTrace_conv.csv"}
SERVEGEN_WINDOW_S = 600.0

# inter-arrival law codes used in ClientTrace.law
LAW_NONE, LAW_GAMMA, LAW_WEIBULL = 0, 1, 2
_LAW_CODES = {"": LAW_NONE, "gamma": LAW_GAMMA, "weibull": LAW_WEIBULL}
_CLIENT_FILE = re.compile(r"chunk-(\d+)-trace\.csv(\.gz)?$")


class TraceError(ValueError):
    """A trace file that is missing or does not have the documented format."""


@dataclass(frozen=True)
class ClientTrace:
    """One ServeGen client: parallel arrays, one entry per 600 s window, sorted by time."""

    client: int  # ServeGen client id (the number in chunk-<id>-trace.csv)
    window_start_s: np.ndarray  # seconds since midnight of day 0
    rate_rps: np.ndarray  # mean arrival rate in the window (0 when idle)
    cv: np.ndarray  # coefficient of variation of inter-arrival times
    law: np.ndarray  # LAW_NONE / LAW_GAMMA / LAW_WEIBULL
    shape: np.ndarray  # the fitted law's shape parameter (0 when idle)
    scale: np.ndarray  # the fitted law's scale parameter, seconds

    @property
    def mean_rate_rps(self) -> float:
        return float(self.rate_rps.mean()) if len(self.rate_rps) else 0.0

    @property
    def active_fraction(self) -> float:
        return float((self.rate_rps > 0).mean()) if len(self.rate_rps) else 0.0


@dataclass(frozen=True)
class RequestLengths:
    """Per-request token counts (and arrival times) from an Azure LLM inference trace."""

    arrival_s: np.ndarray  # seconds since the first request of the file
    prompt_tokens: np.ndarray  # ContextTokens
    output_tokens: np.ndarray  # GeneratedTokens


def _open_text(path: Path):
    return gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="")


def _client_files(directory: Path) -> dict[int, Path]:
    files: dict[int, Path] = {}
    for path in sorted(directory.iterdir()):
        match = _CLIENT_FILE.match(path.name)
        if match:
            files.setdefault(int(match.group(1)), path)
    return files


def servegen_clients(directory: Path | str = SERVEGEN_DIR) -> list[int]:
    """Client ids available in a ServeGen directory (plain .csv or .csv.gz files)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TraceError(f"no ServeGen trace directory at {directory}")
    return sorted(_client_files(directory))


def load_servegen_client(path: Path | str) -> ClientTrace:
    """Parse one `chunk-<client>-trace.csv[.gz]` file (no header, six columns)."""
    path = Path(path)
    match = _CLIENT_FILE.match(path.name)
    if not match:
        raise TraceError(f"{path.name}: not a ServeGen client file (chunk-<id>-trace.csv)")
    numbers: list[tuple[float, float, float, float, float]] = []
    laws: list[int] = []
    with _open_text(path) as handle:
        for line_no, row in enumerate(csv.reader(handle), start=1):
            if len(row) != 6:
                raise TraceError(f"{path.name}:{line_no}: expected 6 columns, got {len(row)}")
            law = _LAW_CODES.get(row[3].strip().lower())
            if law is None:
                raise TraceError(f"{path.name}:{line_no}: unknown law {row[3]!r}")
            try:
                numbers.append((float(row[0]), float(row[1]), float(row[2]), float(row[4]), float(row[5])))
            except ValueError as exc:
                raise TraceError(f"{path.name}:{line_no}: {exc}") from exc
            laws.append(law)
    table = np.array(numbers, dtype=float).reshape(-1, 5)
    order = np.argsort(table[:, 0], kind="stable")
    table = table[order]
    if (table[:, 1] < 0).any():
        raise TraceError(f"{path.name}: negative rate")
    return ClientTrace(client=int(match.group(1)), window_start_s=table[:, 0], rate_rps=table[:, 1],
                       cv=table[:, 2], law=np.array(laws, dtype=np.int8)[order],
                       shape=table[:, 3], scale=table[:, 4])


def load_servegen(directory: Path | str = SERVEGEN_DIR,
                  clients: list[int] | None = None) -> dict[int, ClientTrace]:
    """Load every client of a directory (or the listed ones), keyed by client id."""
    directory = Path(directory)
    files = _client_files(directory) if directory.is_dir() else {}
    wanted = sorted(files) if clients is None else clients
    missing = [c for c in wanted if c not in files]
    if missing:
        raise TraceError(f"ServeGen clients {missing} not found in {directory}")
    return {c: load_servegen_client(files[c]) for c in wanted}


def azure_path(kind: str, directory: Path | str = AZURE_DIR) -> Path:
    """The file of one Azure trace ("code" or "conv"), plain or gzipped."""
    if kind not in AZURE_FILES:
        raise TraceError(f"unknown Azure trace {kind!r} (choose {', '.join(AZURE_FILES)})")
    plain = Path(directory) / AZURE_FILES[kind]
    for candidate in (plain, plain.with_name(plain.name + ".gz")):
        if candidate.is_file():
            return candidate
    raise TraceError(f"no Azure trace file {plain} (or .gz)")


def load_azure(path: Path | str) -> RequestLengths:
    """Parse an Azure LLM CSV with header `TIMESTAMP,ContextTokens,GeneratedTokens`."""
    path = Path(path)
    stamps: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    with _open_text(path) as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        if header[:3] != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
            raise TraceError(f"{path.name}: unexpected header {header}")
        for line_no, row in enumerate(reader, start=2):
            try:
                stamp = datetime.fromisoformat(row[0].strip()[:26])
                prompts.append(int(row[1]))
                outputs.append(int(row[2]))
            except (ValueError, IndexError) as exc:
                raise TraceError(f"{path.name}:{line_no}: {exc}") from exc
            stamps.append(stamp.timestamp())
    arrival = np.array(stamps, dtype=float)
    order = np.argsort(arrival, kind="stable")
    arrival = arrival[order] - (arrival.min() if len(arrival) else 0.0)
    return RequestLengths(arrival_s=arrival, prompt_tokens=np.array(prompts, dtype=np.int64)[order],
                          output_tokens=np.array(outputs, dtype=np.int64)[order])


def load_azure_lengths(kinds: tuple[str, ...] = ("code", "conv"),
                       directory: Path | str = AZURE_DIR) -> RequestLengths:
    """Pool the requests of several Azure traces (arrival times are per file, not merged)."""
    parts = [load_azure(azure_path(kind, directory)) for kind in kinds]
    return RequestLengths(arrival_s=np.concatenate([p.arrival_s for p in parts]),
                          prompt_tokens=np.concatenate([p.prompt_tokens for p in parts]),
                          output_tokens=np.concatenate([p.output_tokens for p in parts]))
