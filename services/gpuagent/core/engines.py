"""Which idle engines the registry asks of a device (device prewarming), pure and without I/O.

One idle engine per architecture served on one device, sized by its smallest model; an idle engine
of an architecture that no registered model has any more is stale; the idle engine of the
architecture most models share is dropped last. The ledger books what fits; the shell warms and
drops on the device workers.
"""

from __future__ import annotations

from collections import Counter
from typing import Collection, Iterable

from services.gpuagent.core.ledger import DeviceLedger
from shared.schemas import ModelInfo


def engine_models(models: Iterable[ModelInfo]) -> list[ModelInfo]:
    """Per architecture of a tensor-parallel-1 model, the model that sizes its engine (the smallest);
    smaller first, the order engines are warmed in."""
    by_arch: dict[str, ModelInfo] = {}
    for info in sorted(models, key=lambda m: (m.size_bytes, m.name), reverse=True):
        if info.tp == 1:
            by_arch[info.arch] = info
    return sorted(by_arch.values(), key=lambda m: m.size_bytes)


def stale_engines(ledger: DeviceLedger, archs: Collection[str]) -> list[str]:
    """The device's idle engines whose architecture is not in `archs` (those registered)."""
    return [arch for arch in ledger.engines
            if arch not in archs and not (ledger.instance and ledger.instance.arch == arch)]


def kept_arch(models: Iterable[ModelInfo]) -> str:
    """The architecture whose idle engine a device drops last: the one most tensor-parallel-1 models
    share (ties: the first in name order); "" with none."""
    counts = Counter(m.arch for m in models if m.tp == 1)
    return max(sorted(counts), key=counts.__getitem__, default="")
