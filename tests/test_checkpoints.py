"""Checkpoint validation before registration: every problem of a bad directory named at once,
vLLM's architecture table read without importing vLLM, overrides entering the architecture
signature, and per-architecture warm engines (a promotion never crosses architectures)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agent_helpers import command, running_agent
from shared.checkpoints import CheckpointError, registry_entry, validate, vllm_architectures, vllm_tool_parsers
from shared.schemas import CommandKind

MiB = 1 << 20


@pytest.fixture
def ckpt(demo_models, tmp_path):
    """A copy of demo-small-a under another name and place."""
    path = tmp_path / "theirs"
    shutil.copytree(demo_models["demo-small-a"].path, path)
    return path


def problems(path, **kw) -> list[str]:
    with pytest.raises(CheckpointError) as caught:
        validate(path, **kw)
    return caught.value.problems


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def test_vllm_architectures_are_read_from_its_registry():
    archs = vllm_architectures()
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"} <= archs
    assert "BertModel" not in archs  # an embedding model: not text generation


def test_demo_checkpoints_of_both_architectures_validate(demo_models):
    for name in ("demo-small-a", "demo-qwen2"):
        assert validate(Path(demo_models[name].path))["architectures"]


def test_every_problem_is_named_at_once(ckpt):
    (ckpt / "tokenizer.json").unlink()
    edit_config(ckpt, architectures=["BertModel"], num_hidden_layers="8")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    got = problems(ckpt, max_model_len=4096, dtype="int4", tp=0)
    assert len(got) == 7, got
    text = "\n".join(got)
    for part in ("architecture BertModel", "num_hidden_layers", "no tokenizer", "model.safetensors: not a safetensors file, or truncated",
                 "--max-model-len 4096", "--dtype int4", "--tp 0"):
        assert part in text, (part, text)


@pytest.mark.parametrize("damage,expected", [
    (lambda p: (p / "config.json").unlink(), "no config.json"),
    (lambda p: (p / "config.json").write_text("{nope"), "config.json is not JSON"),
    (lambda p: edit_config(p, architectures=[]), "`architectures` must be a non-empty list"),
    (lambda p: (p / "model.safetensors").unlink(), "no *.safetensors"),
    (lambda p: (p / "model.safetensors").write_bytes(b"garbage!garbage"), "model.safetensors: not a safetensors file"),
])
def test_bad_directories(ckpt, damage, expected):
    damage(ckpt)
    assert any(expected in p for p in problems(ckpt)), problems(ckpt)


def test_not_a_directory(tmp_path):
    assert problems(tmp_path / "missing") == ["not a directory"]


def test_overrides_enter_the_architecture_signature(ckpt, demo_models):
    plain = registry_entry("theirs", ckpt)
    assert (plain.arch, plain.content_hash) == (demo_models["demo-small-a"].arch, demo_models["demo-small-a"].content_hash)
    shorter = registry_entry("theirs", ckpt, max_model_len=512, dtype="float32")
    assert shorter.arch != plain.arch and (shorter.max_model_len, shorter.dtype) == (512, "float32")
    assert shorter.kv_bytes_per_token == 2 * plain.kv_bytes_per_token  # float32 KV
    edit_config(ckpt, max_position_embeddings=1024)
    assert registry_entry("theirs", ckpt).arch != plain.arch


def test_tool_parser_is_one_vllm_registers_and_leaves_the_architecture_alone(ckpt):
    assert {"hermes", "llama3_json", "mistral"} <= vllm_tool_parsers()
    assert any("--tool-parser nope: not one of the installed vLLM's" in p for p in problems(ckpt, tool_parser="nope"))
    plain, llama = registry_entry("theirs", ckpt), registry_entry("theirs", ckpt, tool_parser="llama3_json")
    assert (plain.tool_parser, llama.tool_parser) == ("hermes", "llama3_json") and llama.arch == plain.arch


async def test_promotion_never_crosses_architectures(settings, demo_models):
    """Warm engines are per architecture: a Qwen2 instance after a Llama one gets a new engine; a
    Llama checkpoint after it reuses the warm Llama engine."""
    s = settings.with_overrides(engine="fake", devices=1, device_memory_bytes=1024 * MiB, warm_engines=False)
    models = [demo_models[n] for n in ("demo-small-a", "demo-small-b", "demo-qwen2")]
    assert models[0].arch == models[1].arch != models[2].arch
    async with running_agent(s, models) as (running, bus, state):
        paths = []
        for model in ("demo-small-a", "demo-qwen2", "demo-small-b"):
            assert (await command(bus, s.node, CommandKind.prewarm, model)).ok
            started = await command(bus, s.node, CommandKind.promote, model, instance_id=model)
            assert started.ok, started.reason
            paths.append(started.detail["path"])
            assert (await command(bus, s.node, CommandKind.demote, instance_id=model)).ok
        assert paths == ["new_engine", "new_engine", "warm_engine"]
        engines = running.service.ledgers[0].engines
        assert set(engines) == {models[0].arch, models[2].arch}


@pytest.mark.vllm
@pytest.mark.slow
async def test_the_qwen2_demo_loads_and_generates_in_real_vllm(settings, demo_models):
    from agent_helpers import infer

    s = settings.with_overrides(engine="vllm", devices=1, device_memory_bytes=700 * MiB, kv_cache_bytes=32 * MiB,
                                heartbeat_s=0.5, warm_engines=False)
    async with running_agent(s, [demo_models["demo-qwen2"]]) as (running, bus, state):
        started = await command(bus, s.node, CommandKind.cold_start, "demo-qwen2", instance_id="q", timeout_s=300)
        assert started.ok, started.reason
        chunks = await infer(bus, "q", prompt="def main(", max_tokens=6, timeout_s=120)
        assert not chunks[-1].error and chunks[-1].completion_tokens == 6
        assert "".join(c.text for c in chunks)  # random weights: gibberish, but tokens
