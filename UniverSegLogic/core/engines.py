"""Loaded networks, owned explicitly: an :class:`EngineStore` keeps one ready engine per
(weights, device) for whoever holds it -- the CLI one per process, the Slicer module one for the
module and its Segment Editor effect, the browser app one per server, a cohort worker one per
worker process. Nothing is cached at module level, and importing this module imports no torch."""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from ..errors import Cancelled

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]


#: Environment defaults PyTorch reads once, when it is first imported (a caller's own values
#: win): unsupported Apple-GPU operations run on the CPU instead of failing; OpenMP threads wait
#: for work asleep instead of spinning -- on a shared CPU (Slicer, other processes) a spinning
#: thread burns the core its partner needs: 16 targets at S=2 took 6.29 s with a busy process
#: beside and 2.08 s without it spinning, 2.12 s and 1.37 s asleep (same run, 2-core AMD EPYC).
TORCH_ENVIRONMENT = {"PYTORCH_ENABLE_MPS_FALLBACK": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def torch_environment() -> bool:
    """Set :data:`TORCH_ENVIRONMENT` (where not set) if torch is not imported yet; True if it
    was in time. Call it before the first ``import torch`` of a process."""
    if "torch" in sys.modules:
        return False
    for key, value in TORCH_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    return True


@dataclass
class LoadedEngine:
    """An engine and a description of its weights (for messages and result files)."""

    engine: object  # core.engine.InferenceEngine
    description: str
    source: str  # "starter", "official" or "file"
    path: str


class EngineStore:
    """Engines by (weights source, resolved device, requested precision), loaded on first use.

    ``echo`` receives messages of the weights' first use (the official weights' license notice);
    ``allow_download`` gates the official weights' download. After Apple's GPU failed once
    (:attr:`mps_failed`, set by the caller that saw the failure), ``auto`` means the CPU.
    """

    def __init__(self, echo: Callable[[str], None] = print, allow_download: bool = True):
        self.echo = echo
        self.allow_download = allow_download
        self.mps_failed = False
        self._engines: Dict[Tuple[str, str, str], LoadedEngine] = {}
        self._lock = threading.Lock()

    def device_for(self, requested: str) -> str:
        """The device ``requested`` resolves to now (imports torch)."""
        import torch

        from .device import choose_device, torch_backends

        backends = torch_backends(torch)
        if self.mps_failed and (requested or "auto").lower() == "auto":
            backends["mps"] = False
        return choose_device(requested, **backends)

    def get(
        self,
        weights: str = "starter",
        device: str = "auto",
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
        *,
        precision: str = "auto",
    ) -> LoadedEngine:
        """The engine for ``weights`` on ``device`` computing in ``precision`` (``auto``: the
        machine's rule, :func:`~UniverSegLogic.core.engine.resolve_precision`), loading and
        checking the weights once.

        ``progress(0.0, message)`` is told each slow step of a first load (import PyTorch, read
        the weights, move the model to the device); ``cancel()`` is checked between them
        (:class:`~UniverSegLogic.errors.Cancelled`)."""

        def step(message: str) -> None:
            if cancel is not None and cancel():
                raise Cancelled("cancelled while loading the model")
            if progress is not None:
                progress(0.0, message)

        if "torch" not in sys.modules:
            torch_environment()
            step("Loading PyTorch (first run only)...")
        dev = self.device_for(device)
        key = (str(weights), dev, str(precision))
        with self._lock:
            if key not in self._engines:
                from .engine import InferenceEngine
                from .weights import build_model, load_weights

                step("Reading the weights...")
                w = load_weights(weights, echo=self.echo, allow_download=self.allow_download)
                step(f"Loading the model on {dev}...")
                engine = InferenceEngine(build_model(w, "cpu"), dev, precision=precision)
                step("Model ready")
                self._engines[key] = LoadedEngine(engine, w.description, w.source, w.path)
            return self._engines[key]

    def clear(self) -> None:
        """Forget every engine (frees their memory, GPU memory too, once no session holds them)."""
        with self._lock:
            self._engines.clear()

    def __len__(self) -> int:
        return len(self._engines)
