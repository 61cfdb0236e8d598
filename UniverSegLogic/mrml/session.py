"""Propagation sessions kept across runs on Slicer nodes (the annotation loop stays fast).

A :class:`SessionStore` is an explicit object its owner keeps (a
:class:`~UniverSegLogic.mrml.runner.Runner`: the Slicer module's and its effect's, the browser
app's): it holds the loaded engines (an
:class:`~UniverSegLogic.core.engines.EngineStore`) and one
:class:`~UniverSegLogic.core.propagator.Propagator` per (volume node, its voxels and world
geometry, options, support volumes), so the volume is normalized once and every run after a
correction recomputes only what the correction changed. It imports no torch until a session is
built.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import astuple
from typing import Sequence, Tuple

import numpy as np


def image_stamp(volumeNode) -> Tuple:
    """What identifies a volume's content cheaply: node ID, image data and its modification time,
    shape, and world IJK-to-RAS matrix."""
    from .nodes import geometry_of

    image = volumeNode.GetImageData()
    geometry = geometry_of(volumeNode)
    return (
        volumeNode.GetID(),
        id(image),
        int(image.GetMTime()) if image is not None else 0,
        tuple(geometry.array.shape),
        tuple(np.round(geometry.ijk_to_ras, 6).ravel()),
    )


class SessionStore:
    """Engines and :class:`Propagator` sessions for runs on Slicer nodes (see the module
    docstring). ``max_sessions``: sessions kept (least recently used dropped); ``engines``: an
    EngineStore to share (e.g. with code that loads the engine itself, with progress)."""

    def __init__(self, max_sessions: int = 2, engines=None):
        from ..core.engines import EngineStore

        #: the :class:`~UniverSegLogic.core.engines.EngineStore` sessions take engines from
        self.engines = engines if engines is not None else EngineStore()
        self.max_sessions = max(1, int(max_sessions))
        self._sessions: OrderedDict[Tuple, object] = OrderedDict()

    def key(self, volumeNode, options, support_stamps: Sequence[Tuple] = (), fusion=None) -> Tuple:
        """The session key of a run (volume content, options -- weights and device included --,
        support volumes, fusion)."""
        return (
            image_stamp(volumeNode),
            astuple(options),
            tuple(support_stamps),
            id(fusion) if fusion is not None else None,
        )

    def get(self, key: Tuple):
        """The session for ``key``, or None."""
        session = self._sessions.get(key)
        if session is not None:
            self._sessions.move_to_end(key)
        return session

    def put(self, key: Tuple, session) -> None:
        """Keep ``session`` under ``key`` (dropping the least recently used beyond the limit)."""
        self._sessions[key] = session
        self._sessions.move_to_end(key)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)

    def discard_device(self, device: str) -> None:
        """Forget the sessions whose engine runs on ``device`` (e.g. after Apple's GPU failed:
        ``auto`` means the CPU from then on)."""
        for key in [
            k for k, v in self._sessions.items() if getattr(v.engine, "device", "") == device
        ]:
            del self._sessions[key]

    def clear(self) -> None:
        """Forget every session and engine."""
        self._sessions.clear()
        self.engines.clear()

    def __len__(self) -> int:
        return len(self._sessions)


def support_stamp(volumeNode, segmentationNode) -> Tuple:
    """Identity of a support pair's content for :meth:`SessionStore.key`."""
    seg = segmentationNode.GetSegmentation()
    return (image_stamp(volumeNode), segmentationNode.GetID(), int(seg.GetMTime()))


def session_for(store: SessionStore, key: Tuple, volume, options, supports, fusion=None):
    """A :class:`Propagator` for a run: the store's session under ``key``, or one built from
    ``volume()`` and ``supports()`` with an engine from the store's engines, then kept."""
    from ..core.propagator import Propagator

    session = store.get(key)
    if session is None:
        session = Propagator(
            volume(), options, engines=store.engines, fusion=fusion, support_volumes=supports()
        )
        store.put(key, session)
    return session
