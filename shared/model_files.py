"""Checkpoint files on disk: identity (content hash), size, architecture signature, and reading
safetensors into memory with the hash verified on the same pass.

The content hash is a sha256 over the sha256 of each 64 MiB block of the weight files (in file
order), so blocks are read and hashed on all cores at once (a single sequential sha256 bounded a
prewarm read to one core's hashing speed).
Tensors are views of one read buffer per file (pinned for CUDA copies when asked), not copies.
Used by the model registry (demo builder, `models add`) and by the GPU agent's prewarm; no network, no engine.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from shared.schemas import ModelInfo

HASH_BLOCK_BYTES = 64 << 20
HASH_THREADS = min(16, os.cpu_count() or 1)  # reads and hashlib release the GIL on large blocks
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# config fields that decide tensor shapes: engines with equal values can serve each other's modules
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


def content_hash(path: Path, on_progress=None) -> str:
    """`on_progress(bytes)` is called with each block's size as the block is hashed (in file order)."""
    with ExitStack() as open_files, ThreadPoolExecutor(HASH_THREADS) as pool:
        blocks = _submit_blocks(pool, open_files, [(file, None) for file in weight_files(path)])
        for block in blocks:
            if on_progress:
                on_progress(block.result()[1])
        return _combined(block.result()[0] for block in blocks)


def _combined(block_digests) -> str:
    return hashlib.sha256(b"".join(block_digests)).hexdigest()


def arch_signature(path: Path, **overrides) -> str:
    """Hash of the shape-deciding config fields, the engine overrides given (not None) and the tokenizer files."""
    config = json.loads((path / "config.json").read_text())
    fields = {k: config.get(k) for k in ARCH_FIELDS} | {k: v for k, v in overrides.items() if v is not None}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for name in TOKENIZER_FILES:
        if (path / name).exists():
            digest.update((path / name).read_bytes())
    return digest.hexdigest()[:12]


def native_bfloat16() -> bool:
    """Whether this machine computes in bfloat16 natively (a CUDA GPU, or a CPU with AVX-512 BF16 or
    AMX); elsewhere (AVX2 CPUs) bfloat16 is emulated and about 2-4x slower than float32."""
    import torch

    if torch.cuda.is_available():
        return True
    cpu = torch.cpu
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, probe, lambda: False)() for probe in probes)


def serving_dtype(config: dict) -> str:
    """The dtype engines run a checkpoint in when registration names none: the checkpoint's own, except
    bfloat16 on a machine that only emulates it, which runs in float32."""
    stored = config.get("torch_dtype") or "bfloat16"
    return "float32" if stored == "bfloat16" and not native_bfloat16() else stored


def checkpoint_info(name: str, path: Path, tp: int = 1, max_model_len: int | None = None, dtype: str | None = None,
                    on_progress=None) -> ModelInfo:
    """The registry entry of the checkpoint at `path`; `max_model_len` and `dtype` override the config's
    (engines differ then: they enter the architecture signature). Without `dtype` the entry names the
    dtype this machine's hardware serves best (`serving_dtype`); `size_bytes` counts the weights in the
    dtype they are served in, which is what a copy takes on a device. `on_progress` as in `content_hash`."""
    path = path.resolve()
    config = json.loads((path / "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads", heads)
    served = dtype or serving_dtype(config)
    stored_bytes = DTYPE_BYTES.get(config.get("torch_dtype") or "bfloat16", 2)
    return ModelInfo(
        name=name, path=str(path), tp=tp, content_hash=content_hash(path, on_progress),
        arch=arch_signature(path, max_model_len=max_model_len, dtype=served),
        size_bytes=weight_bytes(path) // stored_bytes * DTYPE_BYTES[served],
        max_model_len=max_model_len or config.get("max_position_embeddings", 2048),
        kv_bytes_per_token=2 * config["num_hidden_layers"] * kv_heads * head_dim * DTYPE_BYTES[served], dtype=served,
    )


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(path))


def read_verified(path: Path, expected_hash: str, on_progress=None, pin_memory: bool = False) -> dict:
    """Read every safetensors file into CPU tensors; each block is read and hashed by a worker thread.

    Raises ChecksumMismatch if the files are not the registered checkpoint. `on_progress(fraction)`
    is called as blocks arrive. `pin_memory`: page-locked buffers, for fast asynchronous GPU copies.
    """
    files = weight_files(path)
    total = sum(f.stat().st_size for f in files) or 1
    buffers = [_read_buffer(f.stat().st_size, pin_memory) for f in files]
    done = 0
    with ExitStack() as open_files, ThreadPoolExecutor(HASH_THREADS) as pool:
        blocks = _submit_blocks(pool, open_files, list(zip(files, buffers)))
        for block in blocks:
            done += block.result()[1]
            if on_progress:
                on_progress(done / total)
        got = _combined(block.result()[0] for block in blocks)
    if got != expected_hash:
        raise ChecksumMismatch(f"checkpoint at {path} has hash {got[:12]}, registered {expected_hash[:12]}")
    tensors: dict = {}
    for buffer in buffers:
        tensors.update(_tensors_in(buffer))
    return tensors


def _submit_blocks(pool: ThreadPoolExecutor, open_files: ExitStack, targets: list) -> list:
    """Submit a read and sha256 of each HASH_BLOCK_BYTES block of every (file, buffer) in `targets`,
    in order: into the buffer (a uint8 tensor of the file's size), or with no buffer into scratch
    memory that is dropped once hashed. Each future gives (digest, bytes)."""
    blocks = []
    for file, buffer in targets:
        fd = os.open(file, os.O_RDONLY)
        open_files.callback(os.close, fd)
        size = file.stat().st_size
        view = memoryview(buffer.numpy()) if buffer is not None else None
        for start in range(0, size, HASH_BLOCK_BYTES):
            length = min(HASH_BLOCK_BYTES, size - start)
            into = view[start:start + length] if view is not None else None
            blocks.append(pool.submit(_read_block, fd, file, start, length, into))
    return blocks


def _read_block(fd: int, file: Path, offset: int, length: int, into: memoryview | None) -> tuple[bytes, int]:
    block = memoryview(bytearray(length)) if into is None else into
    got = 0
    while got < length:
        n = os.preadv(fd, [block[got:]], offset + got)
        if not n:
            raise ChecksumMismatch(f"{file} shrank while it was read")
        got += n
    return hashlib.sha256(block).digest(), got


def _read_buffer(size: int, pin_memory: bool):
    """A uint8 tensor to read a file into: page-locked if asked and possible (without an accelerator,
    or when the driver cannot lock that much, pageable memory still works, only slower to copy)."""
    import torch

    if pin_memory:
        try:
            return torch.empty(size, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:
            pass
    return torch.empty(size, dtype=torch.uint8)


def _tensors_in(buffer) -> dict:
    """The tensors of one safetensors file held in `buffer` (uint8), as views where aligned."""
    import torch

    dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
    header_len = int.from_bytes(buffer[:8].numpy().tobytes(), "little")
    header = json.loads(buffer[8:8 + header_len].numpy().tobytes())
    base = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        dtype = dtypes[entry["dtype"]]
        raw = buffer[base + begin:base + end]
        if (base + begin) % dtype.itemsize:
            raw = raw.clone()  # a view must start on a multiple of the element size
        tensors[name] = raw.view(dtype).view(entry["shape"])
    return tensors
