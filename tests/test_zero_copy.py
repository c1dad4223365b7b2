"""Zero-copy promotion with real vLLM (CPU build), in-process: after a promotion the engine computes
with the pool's own module (its parameters by data pointer, its CPU GEMM handles by identity), the
answers equal those of an engine that loaded the checkpoint itself, and a demotion hands the module
back without keeping a reference to the engine's KV cache; in the dtype registration picked for
this machine and in float32."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import torch

from services.gpuagent.core.ledger import instance_kv_bytes
from shared.model_files import checkpoint_info
from shared.schemas import InferRequest, SamplingSpec

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
DEVICE = os.environ.get("WARMSERVE_TEST_DEVICE", "cpu")  # bench/gpu_agent.sh runs it with cuda:0


@pytest.fixture(scope="module")
def vllm_modules():
    from services.gpuagent import vllm_modules

    return vllm_modules


async def greedy(host, instance_id: str, prompt: str = "def main(") -> str:
    request = InferRequest(request_id=uuid.uuid4().hex, model="m", reply_to="", prompt=prompt,
                           sampling=SamplingSpec(max_tokens=8, temperature=0.0))
    return "".join([piece.text async for piece in host.generate(instance_id, request)])


def computes_with(served: torch.nn.Module, module: torch.nn.Module) -> None:
    """Every parameter and buffer `served` holds is `module`'s own storage, and every CPU GEMM
    handle is the one built at prewarm."""
    pool_pointers = {t.data_ptr() for t in (*module.parameters(), *module.buffers()) if t.numel()}
    for name, tensor in (*served.named_parameters(), *served.named_buffers()):
        assert not tensor.numel() or tensor.data_ptr() in pool_pointers, name
    pool_layers = dict(module.named_modules())
    packed = [(name, layer) for name, layer in served.named_modules() if hasattr(layer, "cpu_linear")]
    assert packed or next(served.parameters()).is_cuda
    for name, layer in packed:
        assert layer.cpu_linear is pool_layers[name].cpu_linear, name


@pytest.mark.parametrize("dtype", ["registered", "float32"])
async def test_promotion_binds_the_pools_module_and_demotion_hands_it_back(demo_models, vllm_modules, dtype):
    """`registered`: the dtype registration picked for this machine; float32: what an AVX2 CPU runs."""
    from services.gpuagent.engine_vllm import VllmHost

    a, b = demo_models["demo-small-a"], demo_models["demo-small-b"]
    if dtype != "registered":
        if a.dtype == dtype:
            pytest.skip(f"registration already picked {dtype} here")
        a, b = (checkpoint_info(i.name, Path(i.path), dtype=dtype) for i in (a, b))
    kv_bytes = instance_kv_bytes(a.kv_bytes_per_token, a.max_model_len, 0)  # one full context
    host = VllmHost(DEVICE, kv_bytes)
    for info in (a, b):
        loaded = await host.load_copy(info, lambda _: None)
        assert loaded["bytes"] == info.size_bytes
    first = await host.start_instance("a1", a, 0)
    assert first["path"] == "new_engine" and first["copied_bytes"] == 0
    slot = host.instances["a1"][0]
    computes_with(vllm_modules.served_model(slot.engine), host.pool[a.name][1].model)
    a_text = await greedy(host, "a1")
    await host.stop_instance("a1")
    assert vllm_modules.served_model(slot.engine) is slot.placeholders.model
    assert all(not layer.kv_cache.numel() for layer in host.pool[a.name][1].attention.values())

    second = await host.start_instance("b1", b, 0)
    assert second["path"] == "warm_engine" and second["copied_bytes"] == 0
    assert vllm_modules.served_model(slot.engine) is host.pool[b.name][1].model
    computes_with(vllm_modules.served_model(slot.engine), host.pool[b.name][1].model)
    b_text = await greedy(host, "b1")
    assert b_text != a_text  # greedy decoding: other weights, other tokens (the prefix cache was reset)
    await host.stop_instance("b1")

    # a fresh engine that loaded b from disk the ordinary way answers the same
    fresh = VllmHost(DEVICE, kv_bytes)
    await fresh.load_copy(b, lambda _: None)
    await fresh.start_instance("ref", b, 0)
    fresh_slot = fresh.instances["ref"][0]
    from vllm import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    reference = LLMEngine.from_engine_args(EngineArgs(
        model=b.path, enforce_eager=True, dtype=b.dtype, kv_cache_memory_bytes=kv_bytes,
        distributed_executor_backend="uni", max_model_len=b.max_model_len, disable_log_stats=True))
    from vllm import SamplingParams

    reference.add_request("r", "def main(", SamplingParams(max_tokens=8, temperature=0.0))
    text = ""
    while reference.has_unfinished_requests():
        for out in reference.step():
            text = out.outputs[0].text
    assert text == b_text
    assert await greedy(fresh, "ref") == b_text
    await fresh.stop_instance("ref")
    for h in (host, fresh):
        for arch in list(h.slots):
            await h.drop_engine(arch)
    del fresh_slot


def test_an_unsupported_vllm_is_refused_with_a_clear_error(vllm_modules, monkeypatch):
    monkeypatch.setattr(vllm_modules.vllm, "__version__", "0.1.0")
    with pytest.raises(vllm_modules.UnsupportedVllm, match="0.1.0"):
        vllm_modules.check_version()


async def test_a_cpu_engine_prefills_on_all_its_threads_and_decodes_on_one(demo_models, monkeypatch):
    """Decode steps' small operations lose time to thread synchronisation, prefill GEMMs gain: the
    engine's runner picks the intra-op threads per step by its token count."""
    from services.gpuagent.engine_vllm import CPU_THREADS, PARALLEL_STEP_TOKENS, VllmHost

    if DEVICE != "cpu" or CPU_THREADS < 2:
        pytest.skip("needs a CPU engine with more than one intra-op thread")
    chosen: list[int] = []
    set_threads = torch._C.set_num_threads
    monkeypatch.setattr(torch._C, "set_num_threads", lambda n: (chosen.append(n), set_threads(n))[1])
    a = demo_models["demo-small-a"]
    host = VllmHost(DEVICE, instance_kv_bytes(a.kv_bytes_per_token, a.max_model_len, 0))
    await host.load_copy(a, lambda _: None)
    await host.start_instance("a1", a, 0)
    await greedy(host, "a1", prompt=" ".join(["word"] * (2 * PARALLEL_STEP_TOKENS)))
    assert chosen[0] == CPU_THREADS and set(chosen[1:]) == {1}, chosen  # the prefill step, then 7 decode steps
    await host.stop_instance("a1")
    for arch in list(host.slots):
        await host.drop_engine(arch)
