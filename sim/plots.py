"""PNG plots of simulated runs: TTFT CDFs per system, and a timeline of every GPU's state.
Matplotlib with the Agg backend; writes files, returns their paths, shows nothing."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
import numpy as np  # noqa: E402

from sim.cluster import STATE_NAMES  # noqa: E402

STATE_COLOURS = ("#ffffff", "#9ecae1", "#fdd0a2", "#fd8d3c", "#31a354")
LINE_STYLES = ("-", "--", ":")
MIN_LABEL_SHARE = 0.03  # an instance's bar is labelled with its model when it spans this share of the window
MAX_LABELLED_ROWS = 32  # larger clusters' rows are too thin for labels


def ttft_cdf(results, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, result in enumerate(results):
        ttft = np.sort(result.ttft_s)
        if len(ttft):
            shown = np.where(np.isfinite(ttft), ttft, np.nan)
            ax.plot(shown, np.arange(1, len(ttft) + 1) / len(ttft), label=result.system,
                    ls=LINE_STYLES[i // 10 % len(LINE_STYLES)])  # the colour cycle repeats after 10
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s, log scale; unfinished requests never reach the top)")
    ax.set_ylabel("share of requests")
    ax.axvline(0.1, color="grey", lw=0.8, ls=":")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def gpu_timeline(result, nodes: int, gpus_per_node: int, path: Path) -> Path:
    """One row per GPU, coloured by its state over the replay window; on small clusters, instances
    that stay long enough to show are labelled with their model."""
    start, end = result.replay_start_s, result.replay_end_s
    n = nodes * gpus_per_node
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.18 * n + 1)))
    state = {}
    since = {}
    for t, node, device, code in (result.timeline or []):
        row = node * gpus_per_node + device
        if row in state:
            _bar(ax, row, since[row], t, state[row], start, end)
        state[row], since[row] = code, t
    for row, code in state.items():
        _bar(ax, row, since[row], end, code, start, end)
    if n <= MAX_LABELLED_ROWS:
        _labels(ax, result.spans or [], gpus_per_node, start, end)
    handles = [Patch(color=STATE_COLOURS[code], label=name) for code, name in enumerate(STATE_NAMES) if code]
    ax.set_xlim(0, (end - start) / 60)
    ax.set_ylim(-0.5, n - 0.5)
    ax.set_xlabel("minutes into the replay")
    ax.set_ylabel("GPU (node x device)")
    ax.set_title(f"GPU states: {result.system}", loc="left")
    ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=7, ncol=4, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bar(ax, row: int, t0: float, t1: float, code: int, start: float, end: float) -> None:
    t0, t1 = max(t0, start), min(t1, end)
    if t1 > t0 and code:
        ax.barh(row, (t1 - t0) / 60, left=(t0 - start) / 60, height=0.9, color=STATE_COLOURS[code], lw=0)


def _labels(ax, spans, gpus_per_node: int, start: float, end: float) -> None:
    """Each instance's model on its bar, where the bar is wide enough."""
    for t0, t1, node, devices, model in spans:
        t0, t1 = max(t0, start), min(t1, end)
        if (t1 - t0) / (end - start) >= MIN_LABEL_SHARE:
            for device in devices:
                ax.text((t0 + t1 - 2 * start) / 120, node * gpus_per_node + device, model, ha="center",
                        va="center", fontsize=6, clip_on=True)
