"""Timing model of the simulated cluster: GPU and model figures, and the arithmetic on them.

Profiles are JSON files (sim/profiles/) of cited public figures; `apply_measured` overrides them
with figures measured by the agent benchmark. Pure arithmetic: no clock, no state.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

PROFILE_DIR = Path(__file__).parent / "profiles"
MEASURED_DIR = Path(__file__).parent / "measured"  # figures measured by the agent benchmark (apply_measured)
DEFAULT_PROFILE = PROFILE_DIR / "h100_llama2.json"
PAGE_BYTES = 2 << 20  # pool memory is counted in 2 MiB pages (DESIGN.md 3.2)
STEADY_BATCH = 8  # the decode batch that times a request's stay in flight outside the event loop


@dataclass(frozen=True)
class GpuProfile:
    memory_bytes: int  # HBM per GPU
    reserved_bytes: int  # CUDA context, activations and fragmentation headroom per GPU
    host_to_gpu_bytes_s: float  # host-memory cache -> one GPU
    ssd_bytes_s: float  # local SSD -> host memory, shared by a node's loads
    host_cache_bytes_per_node: int  # host memory that caches checkpoints
    engine_start_s: float  # start a fresh engine process with the serving defaults, on top of loading the weights
    eager_engine_start_s: float  # start an engine in a process with the framework imported ahead, eager mode
    promote_s: float  # turn a prewarmed copy into a serving instance
    worker_start_s: float  # start an instance in an engine process already running on its GPUs (universal
    #                        GPU workers / warm engines), on top of loading the weights
    demote_s: float  # stop serving, keep the weights as a prewarmed copy

    @property
    def usable_bytes(self) -> int:
        return self.memory_bytes - self.reserved_bytes

    def start_s(self, engine: str) -> float:
        """What a cold start adds to the weight load: a fresh `engine`, an `eager_engine` in a
        process started ahead, or an instance in a `worker` already running on its GPUs."""
        return {"engine": self.engine_start_s, "eager_engine": self.eager_engine_start_s,
                "worker": self.worker_start_s}[engine]


@dataclass(frozen=True)
class ModelProfile:
    size_bytes: int  # all weights
    tp: int  # GPUs per copy
    kv_bytes_per_token: int  # KV cache of one token, all layers, summed over the TP group
    prefill_s_per_token: float
    prefill_overhead_s: float  # fixed cost of one prefill
    decode_s_per_token: float  # one decode step at batch 1
    decode_batch_slowdown: float  # relative step-time increase per extra batched request

    @property
    def bytes_per_gpu(self) -> int:
        return pages(-(-self.size_bytes // self.tp))

    def prefill_s(self, prompt_tokens: int) -> float:
        return self.prefill_overhead_s + prompt_tokens * self.prefill_s_per_token

    def decode_step_s(self, batch: int) -> float:
        return self.decode_s_per_token * (1.0 + self.decode_batch_slowdown * max(batch - 1, 0))

    def service_s(self, prompt_tokens, output_tokens, batch: int):
        """How long requests stay in flight at a steady decode batch (scalars or arrays)."""
        return self.prefill_s(prompt_tokens) + output_tokens * self.decode_step_s(batch)

    def kv_bytes_per_gpu(self, tokens: int) -> int:
        return pages(tokens * self.kv_bytes_per_token // self.tp)


@dataclass(frozen=True)
class TimingProfile:
    name: str
    gpu: GpuProfile
    models: dict[str, ModelProfile]  # by model kind (e.g. "llama2-7b")

    def host_load_s(self, kind: str) -> float:
        """Host memory -> GPUs; the TP shards load in parallel over their own links."""
        return self.models[kind].bytes_per_gpu / self.gpu.host_to_gpu_bytes_s

    def ssd_load_s(self, kind: str) -> float:
        """SSD -> host memory (the node's SSD bandwidth is shared by its loads)."""
        return self.models[kind].size_bytes / self.gpu.ssd_bytes_s


def pages(n_bytes: int) -> int:
    """Round up to whole 2 MiB pages."""
    return -(-n_bytes // PAGE_BYTES) * PAGE_BYTES


def load_profile(path: str | Path = DEFAULT_PROFILE) -> TimingProfile:
    raw = json.loads(Path(path).read_text())
    return TimingProfile(
        name=raw.get("name", Path(path).stem),
        gpu=GpuProfile(**raw["gpu"]),
        models={kind: ModelProfile(**spec) for kind, spec in raw["models"].items()},
    )


def apply_measured(profile: TimingProfile, measured: dict) -> TimingProfile:
    """Override figures with measured ones: {"gpu": {field: value}, "models": {kind: {field: value}}}.

    Unknown fields are an error (a typo must not silently keep the default); a model kind the
    profile lacks is added, and must then give every field (`bench agent` measures demo models)."""
    gpu = dataclasses.replace(profile.gpu, **measured.get("gpu", {}))
    models = dict(profile.models)
    for kind, fields in measured.get("models", {}).items():
        models[kind] = dataclasses.replace(models[kind], **fields) if kind in models else ModelProfile(**fields)
    return TimingProfile(profile.name + "+measured", gpu, models)
