"""Checkpoint reading: tensors come back equal (every dtype the builder writes, unaligned ones
too, several files), the content hash is the registered identity, and a changed byte is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shared import model_files
from shared.model_files import ChecksumMismatch, content_hash, read_verified


def write_checkpoint(path, files: int = 1) -> dict:
    path.mkdir()
    expected = {}
    for i in range(files):
        tensors = {f"f{i}.odd": torch.arange(3, dtype=torch.bfloat16),  # 6 bytes: what follows is unaligned
                   f"f{i}.w": torch.randn(5, 7, dtype=torch.float32),
                   f"f{i}.ids": torch.arange(4, dtype=torch.int64),
                   f"f{i}.b": torch.randn(300, dtype=torch.bfloat16)}
        save_file(tensors, str(path / f"model-{i}.safetensors"))
        expected.update(tensors)
    return expected


@pytest.mark.parametrize("files", [1, 3])
def test_read_returns_the_tensors_and_checks_the_hash(tmp_path, monkeypatch, files):
    monkeypatch.setattr(model_files, "HASH_BLOCK_BYTES", 256)  # many blocks per file
    expected = write_checkpoint(tmp_path / "m", files)
    progress = []
    got = read_verified(tmp_path / "m", content_hash(tmp_path / "m"), progress.append)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)
    assert progress == sorted(progress) and progress[-1] == 1.0 and len(progress) > files


def test_pinned_reads_fall_back_to_pageable_memory_without_an_accelerator(tmp_path):
    expected = write_checkpoint(tmp_path / "m")
    got = read_verified(tmp_path / "m", content_hash(tmp_path / "m"), pin_memory=True)
    assert all(torch.equal(got[name], tensor) for name, tensor in expected.items())
    assert all(t.is_pinned() == torch.cuda.is_available() for t in got.values())


def test_tensors_at_unaligned_offsets_are_read(tmp_path):
    """safetensors' own writer aligns tensors; another writer may not: a 6-byte tensor first."""
    (tmp_path / "m").mkdir()
    odd, wide = torch.arange(3, dtype=torch.bfloat16), torch.randn(5, dtype=torch.float32)
    header = json.dumps({"odd": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]},
                         "wide": {"dtype": "F32", "shape": [5], "data_offsets": [6, 26]}}).encode()
    header += b" " * (-len(header) % 8)  # data starts 8-aligned, so "wide" starts at 6 mod 8
    raw = len(header).to_bytes(8, "little") + header + odd.view(torch.uint8).numpy().tobytes() \
        + wide.view(torch.uint8).numpy().tobytes()
    (tmp_path / "m" / "model.safetensors").write_bytes(raw)
    got = read_verified(tmp_path / "m", content_hash(tmp_path / "m"))
    assert torch.equal(got["odd"], odd) and torch.equal(got["wide"], wide)


def test_a_changed_byte_is_refused(tmp_path):
    write_checkpoint(tmp_path / "m")
    registered = content_hash(tmp_path / "m")
    file = tmp_path / "m" / "model-0.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 1
    file.write_bytes(bytes(data))
    assert content_hash(tmp_path / "m") != registered
    with pytest.raises(ChecksumMismatch):
        read_verified(tmp_path / "m", registered)


def test_the_hash_depends_on_block_order_and_size(tmp_path, monkeypatch):
    write_checkpoint(tmp_path / "m", files=2)
    whole = content_hash(tmp_path / "m")
    assert content_hash(tmp_path / "m") == whole  # deterministic across thread schedules
    monkeypatch.setattr(model_files, "HASH_BLOCK_BYTES", 128)
    assert content_hash(tmp_path / "m") != whole  # the block size is part of the identity


@pytest.mark.parametrize("native, stored, served", [
    (False, "bfloat16", "float32"), (True, "bfloat16", "bfloat16"), (False, "float16", "float16"),
    (False, None, "float32")])
def test_registration_names_the_dtype_the_hardware_serves_and_counts_sizes_in_it(
        demo_models, monkeypatch, native, stored, served):
    monkeypatch.setattr(model_files, "native_bfloat16", lambda: native)
    assert model_files.serving_dtype({"torch_dtype": stored}) == served
    small = demo_models["demo-small-a"]  # a bfloat16 checkpoint
    info = model_files.checkpoint_info("x", Path(small.path))
    assert info.dtype == ("bfloat16" if native else "float32")
    assert info.size_bytes == model_files.weight_bytes(Path(small.path)) // 2 * (2 if native else 4)
    forced = model_files.checkpoint_info("x", Path(small.path), dtype="bfloat16")
    assert forced.dtype == "bfloat16" and forced.arch != info.arch or native
