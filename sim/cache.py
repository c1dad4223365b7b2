"""On-disk cache of slow, pure set-up results (the learning days' load windows): one .npz per key
under the config's `cache_dir`, named by a hash of everything the result depends on (the trace
files excepted: delete the folder when they change). No cache_dir: always computed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np


def cached(cache_dir: str | None, key: dict, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not cache_dir:
        return compute()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{key.get('what', 'result')}-{digest}.npz"
    if path.exists():
        with np.load(path) as stored:
            return {name: stored[name] for name in stored.files}
    arrays = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)  # concurrent runs never read a half-written file
    return arrays
