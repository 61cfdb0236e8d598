"""A disk copy of a Propagator's network logits, for evaluations that are run again and again.

A :class:`~UniverSegLogic.core.propagator.Propagator` keys every network logit by content (the
target slice, the support slices with a fingerprint of their labels, the external support and the
flips). :func:`install` puts a disk store under a session's in-memory logit cache, in a folder
named after the image's voxels and geometry, the engine's weights and the slicing axis, so a later
evaluation of the same case (another strategy, another fusion rule) finds each (target, support)
logit it has seen before instead of running the network. The stored arrays are the float32 logits
themselves, so results are identical to a run without the store.

Developer tool only (the evaluation's ``--logit-cache``); never shipped.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np


def _digest(*parts) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(str(p.shape).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()


class DiskLogits:
    """The session's logit cache (an LRU: get/put/trim/clear) backed by ``folder`` on disk."""

    def __init__(self, folder: str, inner):
        self.folder = folder
        self.inner = inner
        self.disk_hits = 0
        os.makedirs(folder, exist_ok=True)

    def _path(self, key) -> str:
        d = _digest(key)
        return os.path.join(self.folder, d[:2], d + ".npy")

    def get(self, key):
        value = self.inner.get(key)
        if value is not None:
            return value
        path = self._path(key)
        if os.path.exists(path):
            try:
                value = np.load(path)
            except (OSError, ValueError):
                return None
            self.inner.put(key, value)
            self.disk_hits += 1
        return value

    def put(self, key, value) -> None:
        self.inner.put(key, value)
        path = self._path(key)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp.npy"
            np.save(tmp, np.ascontiguousarray(value, dtype=np.float32))
            os.replace(tmp, path)

    def __getattr__(self, name):  # trim, clear, bytes, used_this_call, __len__ ...
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        if name in ("folder", "inner", "disk_hits"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def __len__(self) -> int:
        return len(self.inner)


def session_folder(root: str, session, weights_tag: str) -> str:
    """The store's folder for a session: image voxels + geometry, weights, axis, the engine's
    precision and the layout of the cached logits (the canvas' inner part since the propagator
    caches logits on the canvas; the earlier stores held native slices)."""
    image = session.image
    tag = _digest(
        np.asarray(image.array, dtype=np.float32),
        np.round(np.asarray(image.ijk_to_ras, dtype=np.float64), 6),
        str(weights_tag),
        int(session.axis),
        "canvas-inner",
        str(getattr(session.engine, "precision", "fp32")),
    )
    return os.path.join(root, tag)


def install(session, root: str, weights_tag: str) -> DiskLogits:
    """Back ``session``'s logit cache with a disk store under ``root``; ``weights_tag`` names
    the network's weights (e.g. their content hash). Returns the store."""
    store = DiskLogits(session_folder(root, session, weights_tag), session._logits)
    session._logits = store
    return store


def session_factory(root: str, weights: str, axis: int, engine, options=None, fusion=None):
    """``factory(case)`` -> a Propagator of ``case.image`` (as the evaluation makes it) whose
    logits are kept under ``root``; ``weights``: the weights source the engine was loaded from."""
    from UniverSegLogic.core.weights import load_weights

    from .calibrate import weights_key
    from .evaluate import make_session

    tag = weights_key(load_weights(weights).path)

    def factory(case):
        session = make_session(case.image, axis, engine, options, fusion)
        install(session, root, tag)
        return session

    return factory
