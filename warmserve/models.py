"""Demo models: tiny checkpoints of two architectures (Llama, Qwen2) built locally (no download) and registered.

`warmserve models build-demo` trains a byte-level BPE tokenizer on text shipped with Python,
writes random-weight models in safetensors (Llama at two sizes, one Qwen2: their output is
gibberish), hashes them and registers them in Redis; `warmserve models list` prints the registry.
The model maths lives in `model_files`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from shared import registry
from shared.bus import Bus
from shared.credentials import redact
from shared.model_files import checkpoint_info
from shared.schemas import ModelInfo
from shared.settings import CONNECTION, Settings, add_arguments, load_settings
from shared.state import State


@dataclass(frozen=True)
class DemoSpec:
    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    seed: int
    arch: str = "llama"  # a key of ARCHITECTURES
    kv_heads: int = 0  # grouped-query attention (0: one per attention head)


VOCAB_SIZE = 4096
MAX_POSITIONS = 2048
# two ~30M Llama models (one architecture: promotion can swap weights), one ~150M Llama, one ~20M Qwen2
DEMO_MODELS = (
    DemoSpec("demo-small-a", hidden=512, layers=8, heads=8, intermediate=1536, seed=1),
    DemoSpec("demo-small-b", hidden=512, layers=8, heads=8, intermediate=1536, seed=2),
    DemoSpec("demo-large", hidden=1024, layers=10, heads=16, intermediate=2816, seed=3),
    DemoSpec("demo-qwen2", hidden=512, layers=6, heads=8, intermediate=1536, seed=4, arch="qwen2", kv_heads=2),
)
# per architecture: its config's own fields, and whether q/k/v projections carry a bias
ARCHITECTURES = {
    "llama": ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_theta": 10000.0,
               "rms_norm_eps": 1e-5}, False),
    "qwen2": ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_theta": 1000000.0,
               "rms_norm_eps": 1e-6, "use_sliding_window": False}, True),
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _training_text() -> list[str]:
    """Text that ships with every Python install: the standard library's own sources."""
    root = Path(json.__file__).parent.parent
    files = sorted(root.glob("*.py"))[:200]
    return [f.read_text(errors="ignore") for f in files]


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_training_text(), trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "model_max_length": MAX_POSITIONS, "chat_template": CHAT_TEMPLATE,
        "add_bos_token": True,
    }, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))


def build_model(spec: DemoSpec, out: Path, tokenizer_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file

    own, qkv_bias = ARCHITECTURES[spec.arch]
    kv_heads = spec.kv_heads or spec.heads
    config = {
        **own, "hidden_size": spec.hidden, "intermediate_size": spec.intermediate, "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads, "num_key_value_heads": kv_heads, "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": MAX_POSITIONS, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2,
    }
    gen = torch.Generator().manual_seed(spec.seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    h, f, kv = spec.hidden, spec.intermediate, spec.hidden // spec.heads * kv_heads
    tensors = {"model.embed_tokens.weight": rand(VOCAB_SIZE, h), "lm_head.weight": rand(VOCAB_SIZE, h),
               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        for proj, rows in (("q_proj", h), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
            tensors[p + f"self_attn.{proj}.weight"] = rand(rows, h)
            if qkv_bias and proj != "o_proj":
                tensors[p + f"self_attn.{proj}.bias"] = rand(rows)
        tensors[p + "mlp.gate_proj.weight"] = rand(f, h)
        tensors[p + "mlp.up_proj.weight"] = rand(f, h)
        tensors[p + "mlp.down_proj.weight"] = rand(h, f)
        tensors[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).write_bytes((tokenizer_dir / name).read_bytes())


def build_demo(models_dir: Path, log=print) -> list[ModelInfo]:
    """Build (or reuse, when present and intact) every demo model; return their registry entries."""
    tokenizer_dir = models_dir / "_tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():
        log(f"training tokenizer -> {tokenizer_dir}")
        build_tokenizer(tokenizer_dir)
    infos = []
    for spec in DEMO_MODELS:
        path = models_dir / spec.name
        if not (path / "model.safetensors").exists():
            log(f"building {spec.name} -> {path}")
            build_model(spec, path, tokenizer_dir)
        info = checkpoint_info(spec.name, path)
        log(f"  {info.name}: {info.size_bytes / 1e6:.1f} MB, {info.size_bytes // 2 / 1e6:.1f}M params, "
            f"arch {info.arch}, sha256 {info.content_hash[:12]}")
        infos.append(info)
    return infos


async def register(settings: Settings, infos: list[ModelInfo]) -> None:
    state = await State.connect(settings)
    bus = await Bus.connect(settings, "warmserve-models")
    try:
        await bus.ensure_event_stream()
        for info in infos:
            await registry.register(state, bus, info)
    finally:
        await bus.close()
        await state.close()


async def list_models(settings: Settings) -> list[ModelInfo]:
    state = await State.connect(settings)
    try:
        return sorted((await state.models()).values(), key=lambda m: m.name)
    finally:
        await state.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="warmserve models")
    parser.add_argument("action", choices=["build-demo", "list"])
    parser.add_argument("--no-register", action="store_true", help="build only; do not touch Redis")
    parser.add_argument("--json", action="store_true")
    add_arguments(parser, (*CONNECTION, "models_dir"))
    args = parser.parse_args(argv)
    settings = load_settings(vars(args))
    if args.action == "build-demo":
        infos = build_demo(Path(settings.models_dir).resolve(), log=lambda s: print(s, file=sys.stderr))
        if not args.no_register:
            asyncio.run(register(settings, infos))
            print(f"registered {len(infos)} models in {redact(settings.redis_url)}", file=sys.stderr)
        return 0
    models = asyncio.run(list_models(settings))
    if args.json:
        print(json.dumps([m.model_dump() for m in models], indent=1))
    else:
        print(f"{'model':<16} {'size MB':>8} {'tp':>3} {'arch':<14} {'sha256':<14} path")
        for m in models:
            print(f"{m.name:<16} {m.size_bytes / 1e6:>8.1f} {m.tp:>3} {m.arch:<14} {m.content_hash[:12]:<14} {m.path}")
    return 0
