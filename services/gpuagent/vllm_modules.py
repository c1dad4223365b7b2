"""Zero-copy promotion: the vLLM internals it needs, in one place (written against vLLM 0.32).

A prewarmed copy is a complete model module in the form the engine computes with: vLLM's own
loader path builds the layers, loads the checkpoint tensors through the model's `load_weights`
(fused and merged projections, the engine's dtype) and runs `process_weights_after_loading` (on CPU
the packed GEMM handles, after which the checkpoint tensors are dropped). It is built in a
VllmConfig of its own, so its attention layers do not clash with the engine's.

Promotion points the engine's model runner at that module and the engine's attention-layer table at
the module's attention layers, bound to the engine's KV cache; demotion points both back at the
engine's own (weightless) placeholders. Not one weight byte moves either way.

Also here, as it wraps the same model runner: on CPU, each step's intra-op threads by its size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import vllm
from torch import nn

SUPPORTED_VLLM = ("0.32.",)  # the internals below were read in these versions


class UnsupportedVllm(RuntimeError):
    pass


def check_version() -> None:
    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        raise UnsupportedVllm(
            f"zero-copy promotion reaches into vLLM internals checked for vLLM {', '.join(SUPPORTED_VLLM)}x; "
            f"installed is {vllm.__version__}: check services/gpuagent/vllm_modules.py against it")


check_version()

from vllm.config import set_current_vllm_config  # noqa: E402
from vllm.distributed import parallel_state  # noqa: E402
from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading  # noqa: E402
from vllm.utils.network_utils import get_distributed_init_method, get_open_port  # noqa: E402
from vllm.utils.torch_utils import set_default_torch_dtype  # noqa: E402


@dataclass
class EngineModule:
    """A model module ready to serve, and its attention layers by layer name."""

    model: nn.Module
    attention: dict[str, nn.Module]


def build(engine_args, tensors: dict[str, torch.Tensor]) -> EngineModule:
    """The engine-ready module of a checkpoint, for engines made from the same `engine_args`: vLLM's
    own load steps (as in its BaseModelLoader.load_model) with the tensors already read and checked."""
    config = engine_args.create_engine_config()
    _single_process_groups(config)
    device = torch.device(config.device_config.device)
    with set_default_torch_dtype(config.model_config.dtype), device:
        model = initialize_model(vllm_config=config, model_config=config.model_config)
    model.load_weights(iter(tensors.items()))
    process_weights_after_loading(model, config.model_config, device)
    return EngineModule(model.eval(), dict(config.compilation_config.static_forward_context))


def _single_process_groups(config) -> None:
    """Layers ask for their tensor/pipeline-parallel group at construction; a copy may be built before
    any engine has set those up in this process, so set up the same one-process groups an engine would
    (an engine started later finds them and keeps them)."""
    if parallel_state.model_parallel_is_initialized():
        return
    with set_current_vllm_config(config):
        parallel_state.init_distributed_environment(
            1, 0, get_distributed_init_method("127.0.0.1", get_open_port()), 0, "gloo")
        parallel_state.ensure_model_parallel_initialized(1, 1)


def _runner(engine):
    return engine.model_executor.driver_worker.worker.model_runner


def _layer_table(engine) -> dict[str, nn.Module]:
    return _runner(engine).vllm_config.compilation_config.static_forward_context


def placeholders(engine) -> EngineModule:
    """Take the engine's own model away (its weights are freed) and keep its attention layers,
    which hold the engine's KV cache binding, as the table to restore on demotion."""
    runner = _runner(engine)
    kept = EngineModule(nn.Module(), dict(_layer_table(engine)))
    runner.model = kept.model  # an empty module: nothing is served until a promotion
    return kept


def bind(engine, module: EngineModule) -> None:
    """Make the engine compute with `module` (its own tensors and handles, not copies)."""
    table = _layer_table(engine)
    if table.keys() != module.attention.keys():
        raise ValueError("the module's attention layers are not the engine's: a different architecture")
    for name, layer in module.attention.items():
        engine_layer = table[name]
        for attr, value in vars(engine_layer).items():  # state the engine's runner set on its layers (CPU: `isa`)
            vars(layer).setdefault(attr, value)
        layer.bind_kv_cache(engine_layer.kv_cache)
    table.update(module.attention)
    _runner(engine).model = module.model


def unbind(engine, module: EngineModule, kept: EngineModule) -> None:
    """Give the engine its placeholders back; `module` keeps no reference to the engine's KV cache."""
    table = _layer_table(engine)
    table.update(kept.attention)
    _runner(engine).model = kept.model
    for layer in module.attention.values():
        layer.bind_kv_cache(torch.tensor([]))


def threads_by_step_size(engine, threads: int, min_tokens: int) -> None:
    """CPU: compute a step with `threads` intra-op threads when it has at least `min_tokens` tokens (a
    prefill: its GEMMs scale with the threads) and with one otherwise (a decode step's small operations
    gain nothing from more threads and pay their synchronisation). The engine's CPU worker disables
    `torch.set_num_threads` after binding its threads, so the step sets them through torch's own call."""
    runner = _runner(engine)
    execute = runner.execute_model

    def execute_model(scheduler_output, *args, **kwargs):
        torch.get_num_threads()  # torch sets a thread's count from the process-wide one on its first parallel op;
        # let that happen now, not mid-step (another engine's thread may have changed the process-wide count)
        torch._C.set_num_threads(threads if scheduler_output.total_num_scheduled_tokens >= min_tokens else 1)
        return execute(scheduler_output, *args, **kwargs)

    runner.execute_model = execute_model


def served_model(engine) -> nn.Module:
    return _runner(engine).model

