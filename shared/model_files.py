"""Checkpoint files on disk: identity (content hash), size, architecture signature, and reading
safetensors into memory with the hash verified on the same pass.

Used by the model registry (demo builder) and by the GPU agent's prewarm; no network, no engine.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from shared.schemas import ModelInfo

READ_CHUNK_BYTES = 8 << 20
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# config fields that decide tensor shapes: engines with equal values can swap weights in place
ARCH_FIELDS = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "vocab_size", "max_position_embeddings",
               "tie_word_embeddings", "torch_dtype", "rope_theta", "rms_norm_eps")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ChecksumMismatch(ValueError):
    """The checkpoint on disk is not the one registered (a different copy must never be served)."""


def weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    return files


def content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for file in weight_files(path):
        with open(file, "rb") as fh:
            while chunk := fh.read(READ_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def arch_signature(path: Path) -> str:
    """Hash of the shape-deciding config fields and the tokenizer files."""
    config = json.loads((path / "config.json").read_text())
    digest = hashlib.sha256(json.dumps({k: config.get(k) for k in ARCH_FIELDS}, sort_keys=True).encode())
    for name in TOKENIZER_FILES:
        if (path / name).exists():
            digest.update((path / name).read_bytes())
    return digest.hexdigest()[:12]


def checkpoint_info(name: str, path: Path, tp: int = 1) -> ModelInfo:
    path = path.resolve()
    config = json.loads((path / "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads", heads)
    dtype_bytes = DTYPE_BYTES.get(config.get("torch_dtype", "bfloat16"), 2)
    return ModelInfo(
        name=name, path=str(path), tp=tp, content_hash=content_hash(path), arch=arch_signature(path),
        size_bytes=sum(f.stat().st_size for f in weight_files(path)),
        max_model_len=config.get("max_position_embeddings", 2048),
        kv_bytes_per_token=2 * config["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes,
    )


def read_verified(path: Path, expected_hash: str, on_progress=None) -> dict:
    """Read every safetensors file into CPU tensors, hashing the bytes as they are read.

    Raises ChecksumMismatch if the files are not the registered checkpoint. `on_progress(fraction)`
    is called as bytes arrive.
    """
    from safetensors.torch import load as load_safetensors

    files = weight_files(path)
    total = sum(f.stat().st_size for f in files) or 1
    digest, done, blobs = hashlib.sha256(), 0, []
    for file in files:
        parts = []
        with open(file, "rb") as fh:
            while chunk := fh.read(READ_CHUNK_BYTES):
                digest.update(chunk)
                parts.append(chunk)
                done += len(chunk)
                if on_progress:
                    on_progress(done / total)
        blobs.append(b"".join(parts))
    if digest.hexdigest() != expected_hash:
        raise ChecksumMismatch(f"checkpoint at {path} has sha256 {digest.hexdigest()[:12]}, "
                               f"registered {expected_hash[:12]}")
    tensors: dict = {}
    for blob in blobs:
        tensors.update(load_safetensors(blob))
    return tensors
