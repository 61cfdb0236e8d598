"""Loaded networks, owned explicitly: an :class:`EngineStore` keeps one ready engine per
(weights, device) for whoever holds it -- the CLI one per process, the Slicer module's logic and
the browser app one per application, a cohort worker one per worker process. Nothing is cached
at module level."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple


@dataclass
class LoadedEngine:
    """An engine and a description of its weights (for messages and result files)."""

    engine: object  # core.engine.InferenceEngine
    description: str
    source: str  # "starter", "official" or "file"
    path: str


class EngineStore:
    """Engines by (weights source, resolved device), loaded on first use.

    ``echo`` receives messages of the weights' first use (the official weights' license notice);
    ``allow_download`` gates the official weights' download.
    """

    def __init__(self, echo: Callable[[str], None] = print, allow_download: bool = True):
        self.echo = echo
        self.allow_download = allow_download
        self._engines: Dict[Tuple[str, str], LoadedEngine] = {}
        self._lock = threading.Lock()

    def get(self, weights: str = "starter", device: str = "auto") -> LoadedEngine:
        """The engine for ``weights`` on ``device`` (loading and checking the weights once)."""
        from .engine import InferenceEngine, resolve_device
        from .weights import build_model, load_weights

        dev = resolve_device(device)
        key = (str(weights), dev)
        with self._lock:
            if key not in self._engines:
                w = load_weights(weights, echo=self.echo, allow_download=self.allow_download)
                engine = InferenceEngine(build_model(w), dev)
                self._engines[key] = LoadedEngine(engine, w.description, w.source, w.path)
            return self._engines[key]

    def peek(self, weights: str, device: str) -> Optional[LoadedEngine]:
        """The engine if it is loaded already (never loads)."""
        return next(
            (
                e
                for (w, d), e in self._engines.items()
                if w == weights and (d == device or device == "auto")
            ),
            None,
        )

    def clear(self) -> None:
        """Forget every engine (frees their memory once no session holds them)."""
        with self._lock:
            self._engines.clear()

    def __len__(self) -> int:
        return len(self._engines)
