"""The simulator beside `bench live`: for each system, its live settings turned into a simulated
WarmServe variant (the same placer and forecaster configuration, the agents' memory rules), a timing
profile of this machine (`bench agent`'s file in sim/measured/ for real vLLM, the fake engine's own
figures for --engine fake), and sim.replay on the same slice, cluster and imported history. Also the
`oracle`: every model always warm on GPUs to spare. No stack, no clock: it runs in seconds.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

from services.forecaster.core.replay import Compression
from services.forecaster.core.windows import RequestTiming
from services.gateway.core.scheduler import Policy
from services.gpuagent.engine_fake import ENGINE_INIT_S
from services.placer import adapter
from shared.schemas import ModelInfo
from shared.settings import Settings
from shared.workload import DAY_S, Workload
from sim import replay
from sim.run import RunResult
from sim.systems.oracle import Oracle
from sim.systems.warmserve import Variant, WarmServe
from sim.timing import DEFAULT_PROFILE, MEASURED_DIR, ModelProfile, TimingProfile, apply_measured, load_profile
from warmserve import history

if TYPE_CHECKING:
    from bench.live import Config

KIND = "demo-small-a"  # the profile kind of every replayed model: both demo-small checkpoints share its shape


def variant(name: str, s: Settings) -> Variant:
    """The simulated WarmServe whose core Config is the live placer's (adapter.core_config), whose
    forecaster is the live one's and whose asks are as far apart as the gateway's; cold starts use warm
    engines only where the live agents have them."""
    return Variant(name, forecast=s.forecast_method, placement=s.placement, allocation=s.allocation,
                   keep_s=s.scale_down_keep_s, promotable_copies=s.promotable_copies,
                   promotable_max_tp=s.promotable_max_tp, unserved_first=s.unserved_first, standby_copies=s.standby_copies,
                   universal_workers=s.warm_engines, prewarm=s.prewarm, kv_prewarm=False, window_s=s.window_s,
                   season_s=s.season_s, tick_s=s.placer_tick_s, ask_interval_s=Policy.ask_interval_s)


def timing(config: Config, info: ModelInfo, s: Settings) -> TimingProfile:
    """This machine's timing for the replayed models (sized as registered), on devices of the live
    budget (nothing reserved; the page cache is the host cache: a load reads at the measured rate)."""
    sizes = {"size_bytes": info.size_bytes, "tp": info.tp, "kv_bytes_per_token": info.kv_bytes_per_token}
    if config.engine == "fake":
        measured = {"gpu": {"host_to_gpu_bytes_s": s.fake_load_bytes_s, "promote_s": 0.0, "worker_start_s": 0.0,
                            "engine_start_s": ENGINE_INIT_S, "eager_engine_start_s": ENGINE_INIT_S, "demote_s": 0.0},
                    "models": {KIND: {**sizes, "prefill_s_per_token": 0.0, "prefill_overhead_s": s.fake_token_s,
                                      "decode_s_per_token": s.fake_token_s, "decode_batch_slowdown": 0.0}}}
    else:
        measured = json.loads((MEASURED_DIR / f"{config.profile}.json").read_text())
    prof = apply_measured(load_profile(DEFAULT_PROFILE), measured)
    bandwidth = prof.gpu.host_to_gpu_bytes_s
    prof = apply_measured(prof, {"gpu": {"memory_bytes": config.device_memory_bytes, "reserved_bytes": 0,
                                         "ssd_bytes_s": bandwidth, "host_cache_bytes_per_node": 1 << 50},
                                 "models": {KIND: sizes}})  # measured in another dtype, perhaps
    return TimingProfile(f"{config.engine}:{config.profile if config.engine != 'fake' else 'fake-engine'}",
                         prof.gpu, {KIND: prof.models[KIND]})


def simulate(name: str, config: Config, infos: list[ModelInfo], s: Settings, workload: Workload,
             request_timing: RequestTiming, gap_windows: int = 1) -> tuple[dict, RunResult]:
    """One system (`s`: its live settings) on the live replay's slice; the history ends `gap_windows`
    before the replay, as the live import does."""
    names = [i.name for i in infos]
    w = config.window_s
    closed = math.ceil(config.learn_days * DAY_S / config.compress / w) * w
    anchor = closed + gap_windows * w
    start_trace = config.replay_day * DAY_S + config.replay_start_h * 3600
    sl = replay.Slice(workload, names, Compression(config.compress, start_trace, anchor), config.replay_live_s,
                      config.drain_s, config.prompt_cap, config.output_cap, closed)
    prof = timing(config, infos[0], s)
    kinds = dict.fromkeys(names, KIND)
    capacity = s.max_inflight_per_instance
    if name == "oracle":
        requests = len(sl.requests())
        cell = replay.Cell(Oracle(), prof, 1, len(names) + math.ceil(requests / capacity) + 1, kinds, capacity, {})
    else:
        imported = history.workload_history(workload, names, Compression(config.compress, start_trace, closed),
                                            config.learn_days, w, request_timing)
        specs = {i.name: adapter.model_spec(i, None, s) for i in infos}
        cell = replay.Cell(WarmServe(variant(name, s)), prof, config.nodes, config.devices_per_node, kinds, capacity,
                           {"history": imported, "kv_bytes_per_gpu": {m: sp.kv_bytes + sp.engine_bytes
                                                                      for m, sp in specs.items()},
                            "score_bandwidth_bytes_s": s.load_bandwidth_bytes_s, "csp_days": s.csp_days,
                            "csp_errors": s.csp_errors})
    summary, result = replay.run(sl, cell)
    summary["profile"] = prof.name
    return summary, result
