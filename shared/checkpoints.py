"""Validation of a Hugging Face-format checkpoint directory before it is registered: a config whose
architecture the installed vLLM serves (text generation), a tokenizer, safetensors weights with
readable headers, and overrides that fit the config. Every problem is reported at once, naming the
file or field; then the registry entry (hashed). Reads files only (no engine, no network, no registry).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import struct
from functools import lru_cache
from pathlib import Path

from shared.model_files import DTYPE_BYTES, checkpoint_info
from shared.schemas import ModelInfo

REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads")  # the memory maths needs them
TOKENIZERS = ("tokenizer.json", "tokenizer.model", "vocab.json")  # fast, sentencepiece, or BPE vocab + merges
REGISTRY_TABLE = "_TEXT_GENERATION_MODELS"
TOOL_PARSER_TABLE = "_TOOL_PARSERS_TO_REGISTER"
DEFAULT_TOOL_PARSER = ModelInfo.model_fields["tool_parser"].default


class CheckpointError(ValueError):
    def __init__(self, path: Path, problems: list[str]):
        super().__init__(f"{path} is not a checkpoint this stack can serve:\n  " + "\n  ".join(problems))
        self.problems = problems


@lru_cache(maxsize=None)
def _vllm_table(module: str, table: str) -> frozenset[str] | None:
    """The keys of the literal dict `table` in the installed vLLM's `module` (a path under the package;
    None: vLLM is not installed here). Read from the source: importing vLLM takes ~30 s."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        return None
    source = Path(spec.origin).parent / module
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == table for t in node.targets):
            return frozenset(k.value for k in node.value.keys if isinstance(k, ast.Constant))
    raise RuntimeError(f"{table} not found in {source}: vLLM changed")


def vllm_architectures() -> frozenset[str] | None:
    """The text-generation architectures of the installed vLLM's model registry."""
    return _vllm_table("model_executor/models/registry.py", REGISTRY_TABLE)


def vllm_tool_parsers() -> frozenset[str] | None:
    """The tool-call parsers the installed vLLM registers (its --tool-call-parser names)."""
    return _vllm_table("tool_parsers/__init__.py", TOOL_PARSER_TABLE)


def validate(path: Path, tp: int = 1, max_model_len: int | None = None, dtype: str | None = None,
             tool_parser: str = DEFAULT_TOOL_PARSER) -> dict:
    """The checkpoint's config; raises CheckpointError listing every problem found."""
    if not path.is_dir():
        raise CheckpointError(path, ["not a directory"])
    problems: list[str] = []
    config = _config(path, problems)
    if config is not None:
        problems += _config_problems(config, max_model_len)
    if not any((path / name).is_file() for name in TOKENIZERS):
        problems.append(f"no tokenizer: none of {', '.join(TOKENIZERS)}")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        problems.append("no *.safetensors weight files (.bin / .pt checkpoints are not supported: convert them)")
    problems += [problem for file in weights if (problem := _safetensors_problem(file))]
    if tp < 1:
        problems.append(f"--tp {tp}: must be >= 1")
    if dtype is not None and dtype not in DTYPE_BYTES:
        problems.append(f"--dtype {dtype}: must be one of {', '.join(DTYPE_BYTES)}")
    parsers = vllm_tool_parsers()
    if parsers is not None and tool_parser not in parsers:
        problems.append(f"--tool-parser {tool_parser}: not one of the installed vLLM's ({', '.join(sorted(parsers))})")
    if problems:
        raise CheckpointError(path, problems)
    return config


def registry_entry(name: str, path: Path, tp: int = 1, max_model_len: int | None = None, dtype: str | None = None,
                   on_progress=None, tool_parser: str = DEFAULT_TOOL_PARSER) -> ModelInfo:
    """Validate the directory, then hash its weights (`on_progress(bytes)` per block hashed)."""
    validate(path, tp, max_model_len, dtype, tool_parser)
    info = checkpoint_info(name, path, tp, max_model_len, dtype, on_progress)
    return info.model_copy(update={"tool_parser": tool_parser})


def _config(path: Path, problems: list[str]) -> dict | None:
    file = path / "config.json"
    if not file.is_file():
        problems.append("no config.json")
        return None
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        problems.append(f"config.json is not JSON: {exc}")
        return None
    if not isinstance(config, dict):
        problems.append("config.json is not a JSON object")
        return None
    return config


def _config_problems(config: dict, max_model_len: int | None) -> list[str]:
    problems = []
    archs = config.get("architectures")
    supported = vllm_architectures()
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        problems.append("config.json: `architectures` must be a non-empty list of class names")
    elif supported is not None and not supported.intersection(archs):
        problems.append(f"config.json: architecture {', '.join(archs)} is not one the installed vLLM serves for text "
                        f"generation (its {len(supported)}: vllm.model_executor.models.registry.{REGISTRY_TABLE})")
    problems += [f"config.json: `{name}` missing or not a positive integer" for name in REQUIRED_FIELDS
                 if not (isinstance(config.get(name), int) and config[name] > 0)]
    positions = config.get("max_position_embeddings")
    if max_model_len is not None and (max_model_len < 1 or (isinstance(positions, int) and max_model_len > positions)):
        problems.append(f"--max-model-len {max_model_len}: must be 1..max_position_embeddings ({positions})")
    return problems


def _safetensors_problem(file: Path) -> str | None:
    """A safetensors file starts with an 8-byte header length and a JSON header that fits the file."""
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if 8 + length > size:
                return f"{file.name}: not a safetensors file, or truncated (a {length}-byte header in a {size}-byte file)"
            header = json.loads(f.read(length))
    except (struct.error, ValueError, UnicodeDecodeError):
        return f"{file.name}: not a safetensors file"
    tensors = [v for k, v in header.items() if k != "__metadata__"] if isinstance(header, dict) else []
    end = max((t.get("data_offsets", [0, 0])[1] for t in tensors if isinstance(t, dict)), default=0)
    if not tensors or 8 + length + end > size:
        return f"{file.name}: {'no tensors' if not tensors else 'truncated'}"
    return None
