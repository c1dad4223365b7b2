"""Typed wire messages exchanged between services (and stored in Redis).

Small frozen models, one comment per field, units in names. New fields are appended with
defaults; unknown fields are ignored on decode so services can be upgraded one at a time.
Events are past tense, commands imperative. No I/O here.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

INT64_MAX = 2**63 - 1
SeedValue = Annotated[int, Field(ge=-(2**63), le=INT64_MAX)]  # what msgpack and vLLM carry


class Message(BaseModel):
    """Frozen; unknown fields ignored; NaN and infinities refused in every float field."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)


# ---------------------------------------------------------------- registry


class ModelInfo(Message):
    name: str = Field(min_length=1, max_length=200)  # public model name (the OpenAI `model`)
    path: str  # directory with config.json, tokenizer and *.safetensors
    size_bytes: int = Field(ge=0)  # total weight bytes, in the dtype they are served in
    tp: int = Field(default=1, ge=1)  # tensor-parallel degree (devices per copy)
    content_hash: str  # block sha256 of the safetensors files (shared/model_files.py), identifies a copy
    arch: str = ""  # architecture signature: engines with equal `arch` can serve each other's modules
    max_model_len: int = Field(default=2048, ge=1)  # context length in tokens
    kv_bytes_per_token: int = Field(default=0, ge=0)  # KV cache bytes per token (all layers)
    dtype: str = ""  # the engine's weight and activation dtype (registration fills it in; "": bfloat16)
    tool_parser: str = "hermes"  # vLLM's tool-call parser for the model's chat answers (--tool-call-parser)


# ---------------------------------------------------------------- load and forecasts


class LoadSample(Message):
    model: str  # model name
    at_s: float  # end of the sampling interval, unix seconds
    interval_s: float = Field(gt=0)  # length of the sampling interval
    avg_outstanding: float = Field(ge=0)  # time-weighted mean of queued + running requests
    peak_outstanding: float = Field(ge=0)  # maximum of queued + running requests
    arrivals: int = Field(default=0, ge=0)  # requests that arrived in the interval
    source: str = ""  # the gateway that measured it: loads of several gateways add up


class Forecast(Message):
    model: str
    window_start_s: float  # start of the predicted window, unix seconds
    window_s: float = Field(gt=0)  # window length
    avg: float = Field(ge=0)  # predicted time-weighted mean outstanding requests
    peak: float = Field(ge=0)  # predicted peak outstanding requests
    method: str  # which predictor produced this forecast (e.g. "csp", "ensemble:csp")
    chance: float = Field(default=0.0, ge=0, le=1)  # probability of at least one request in the window


class ForecastSet(Message):
    forecasts: list[Forecast] = []


class ForecastQuery(Message):
    models: list[str] = []  # empty: all models


class WindowLoad(Message):
    """One model's load in one past window (forecast history import and export)."""

    window_start_s: float  # start of the window, unix seconds (a multiple of window_s)
    avg: float = Field(ge=0)  # time-weighted mean outstanding requests
    peak: float = Field(ge=0)  # peak outstanding requests


class HistoryImport(Message):
    """CLI -> forecaster: seed one model's window history (a trace's learn days, a CSV); answered
    with a CommandResult."""

    model: str  # a registered model
    window_s: float = Field(gt=0)  # must be the forecaster's window
    windows: list[WindowLoad] = []
    last: bool = True  # the import's last message: the forecaster relearns and publishes forecasts


# ---------------------------------------------------------------- agent state


class CopyState(str, Enum):
    loading = "loading"
    ready = "ready"
    evicting = "evicting"


class InstanceState(str, Enum):
    starting = "starting"
    ready = "ready"
    draining = "draining"


class DeviceView(Message):
    index: int = Field(ge=0)  # device index on the node
    budget_bytes: int = Field(ge=0)  # memory the agent may use on this device
    free_bytes: int = Field(ge=0)  # budget minus copies and the serving engine (idle warm engines count as free)
    kind: str = "cpu"  # "cpu" (logical device) or "cuda"
    idle_engine_bytes: int = Field(default=0, ge=0)  # warm engines kept for fast promotion, dropped on demand


class CopyView(Message):
    model: str
    content_hash: str
    devices: list[int]  # device indices holding this copy (a TP group)
    state: CopyState
    bytes: int = Field(ge=0)  # pool bytes (rounded to 2 MiB pages) per device
    progress: float = Field(default=1.0, ge=0, le=1)  # fraction loaded
    origin: str = ""  # why the copy is there: forecast_prewarm | kept_copy | cold_start | commanded


class InstanceView(Message):
    instance_id: str
    model: str
    devices: list[int]
    state: InstanceState
    inflight: int = Field(default=0, ge=0)  # requests being generated
    started_at_s: float = 0.0  # unix seconds when the instance was created
    kv_bytes: int = Field(default=0, ge=0)  # KV cache bytes per device


class NodeView(Message):
    node: str
    at_s: float  # when the agent produced this view
    devices: list[DeviceView] = []
    copies: list[CopyView] = []
    instances: list[InstanceView] = []
    boot_id: str = ""  # changes on every agent start


# ---------------------------------------------------------------- agent commands


class CommandKind(str, Enum):
    prewarm = "prewarm"
    evict = "evict"
    promote = "promote"
    demote = "demote"
    cold_start = "cold_start"


class AgentCommand(Message):
    command_id: str = Field(min_length=1)  # idempotency key: a repeated id is executed once
    kind: CommandKind
    model: str = ""
    devices: list[int] = []  # the device group the command addresses
    instance_id: str = ""  # promote/cold_start: id to give; demote: id to demote
    reason: str = ""  # why the placer decided this (for events and logs)
    kv_bytes: int = Field(default=0, ge=0)  # KV cache to allocate per device (0: agent default)


class CommandResult(Message):
    command_id: str
    ok: bool
    reason: str = ""  # why it was refused or failed
    duration_ms: float = 0.0
    detail: dict[str, Any] = {}


class DeviceOp(str, Enum):
    load_copy = "load_copy"  # read a checkpoint into the device's weight pool
    drop_copy = "drop_copy"  # free a pool copy
    start_instance = "start_instance"  # serve a model (from the pool copy, else from disk)
    stop_instance = "stop_instance"  # drain, then stop serving (the pool copy and the engine stay)
    drop_engine = "drop_engine"  # free the idle warm engine of `arch`
    warm_engine = "warm_engine"  # initialise an idle engine for `model`'s architecture (no weights served)
    status = "status"  # in-flight counts and resident copies


class DeviceCall(Message):
    """Agent -> its own device worker (one process per device for real engines)."""

    op: DeviceOp
    model: ModelInfo | None = None
    instance_id: str = ""
    kv_bytes: int = Field(default=0, ge=0)
    drain_timeout_s: float = 30.0
    arch: str = ""  # drop_engine: the architecture whose warm engine to free
    agent_boot_id: str = ""  # the calling agent's boot id: only an agent's calls keep a worker from its orphan timeout
    ready_event: Event | None = None  # start_instance: the agent's instance_ready, which the worker publishes
    #                                     the moment the instance serves (a hop sooner than the agent could)


# ---------------------------------------------------------------- placement requests


class InstanceNeed(Message):
    """Gateway -> placer: a model has requests waiting and no free capacity."""

    model: str
    waiting: int = Field(default=1, ge=0)  # requests queued for the model


class InstanceRoute(Message):
    instance_id: str
    model: str
    node: str
    devices: list[int] = []


class InstanceAnswer(Message):
    status: str  # "ready" (instances listed), "starting" (wait for instance_ready), "error"
    instances: list[InstanceRoute] = []
    reason: str = ""


# ---------------------------------------------------------------- inference


class SamplingSpec(Message):
    """vLLM's sampling parameters that the gateway honours (neutral defaults: as if absent)."""

    max_tokens: int = Field(default=16, ge=1, le=INT64_MAX)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: list[str] = []
    seed: SeedValue | None = None
    ignore_eos: bool = False
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, gt=0, le=INT64_MAX)
    top_k: int = Field(default=0, ge=-1, le=INT64_MAX)  # 0 or -1: all tokens
    min_p: float = Field(default=0.0, ge=0, le=1)
    min_tokens: int = Field(default=0, ge=0, le=INT64_MAX)
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT64_MAX)]] = []
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] = {}  # token id -> bias added to its logit


class InferRequest(Message):
    request_id: str
    model: str
    reply_to: str  # subject the engine streams InferChunk messages to
    prompt: str | None = None  # completion prompt
    messages: list[dict[str, Any]] | None = None  # chat messages (the engine applies the template)
    sampling: SamplingSpec = SamplingSpec()
    attempt: int = Field(default=0, ge=0)  # how often the gateway sent it before (a send lost in a bus outage)
    path: str = ""  # OpenAI route ("/v1/chat/completions", "/tokenize", ...): the engine answers in OpenAI bytes
    body: bytes = b""  # the client's JSON body for `path`, forwarded unchanged


class InferChunk(Message):
    request_id: str
    seq: int = Field(ge=0)  # chunk number, from 0
    text: str = ""  # newly generated text
    finish_reason: str | None = None  # "stop" / "length" / "cancelled" on the last chunk
    error: str | None = None  # set on failure: the last chunk
    error_code: int = 0  # HTTP-like status for errors (400 bad input, 503 engine gone, ...)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_queue_ms: float = 0.0  # time from receipt by the engine to scheduling
    engine_ttft_ms: float = 0.0  # time from receipt by the engine to the first token
    instance_id: str = ""  # the instance that sent it (a request re-dispatched elsewhere ignores the old one)
    attempt: int = 0  # the request's attempt it answers (InferRequest.attempt)
    data: bytes = b""  # OpenAI requests: bytes to relay as written (SSE events, a JSON body, an error body)


class CancelInference(Message):
    request_id: str
    attempt: int = -1  # only this attempt of the request (-1: every attempt)


# ---------------------------------------------------------------- plan and events


class PlannedCopy(Message):
    model: str
    node: str
    devices: list[int]
    score: float = 0.0
    reason: str = ""


class Plan(Message):
    at_s: float
    copies: list[PlannedCopy] = []  # desired prewarmed copies
    instances: dict[str, int] = {}  # desired instance count per model


class Event(Message):
    """A lifecycle change, published on `{ns}.{domain}.evt.{name}` and kept in the event stream."""

    name: str  # e.g. model_registered, prewarm_started, instance_ready, evicted, plan_changed
    at_s: float
    model: str = ""
    node: str = ""
    devices: list[int] = []
    instance_id: str = ""
    reason: str = ""
    detail: dict[str, Any] = {}
