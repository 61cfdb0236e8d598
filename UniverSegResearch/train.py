"""Training UniverSeg v1 for the way this product uses it (``python -m UniverSegResearch train``).

The product propagates k painted slices (1..8) of one structure through a volume: every other
slice between the painted range widened by one typical gap is segmented with the *bracketing*
support of :func:`support.select_support`; slices beyond the structure's end must come out empty.
Training samples exactly these episodes:

* data: prepared slice stacks ``<data>/{train,val}/<case>__<axis>.npz`` (``image`` uint8
  (N,H,W), ``labels`` uint16 (N,H,W) ids, ``names``), all held on the device as uint8/int16
  tensors; every (file, structure) pair with its slice extent [z0, z1] is one task;
* episodes: per step one k (so one support size S = min(k, max_support) keeps tensors
  rectangular); the k labeled slices sit at the evaluation positions
  ``z0 + floor((i + 0.5) * (z1 - z0) / k + 0.5)`` jittered by +-1; targets are drawn from the
  product's target range (labeled range +- one typical gap, at least the extent +- ``gap``) minus
  the labeled slices, so some targets are empty; ~15 % of episodes take their support from a
  same-named structure of another case (matched by relative position), ~25 % are procedurally
  generated 3D blobs on smooth textures (:func:`synthetic_volumes`, on the device);
* one step = one gather of all slices, batched augmentation on the device (task-level affine,
  flips and inversion shared by a target and its support; per-image gamma, contrast, noise and a
  slight affine), soft Dice + BCE on the logits, AdamW with warm-up + cosine over the time
  budget, bf16 autocast on CUDA;
* validation on a fixed, seeded set of val episodes with the product's protocol (k in {2,3,5},
  every slice of the target range, thresholded, Dice per episode over its slices);
* ``--out``: ``checkpoint.pt`` (model + optimizer + position, for ``--resume``), ``last.pt`` and
  ``best.pt`` (plain float32 v1 state dicts), ``log.csv``, ``curve.png``, ``summary.json``.

Only torch and numpy are imported (the GPU machine has no imaging libraries).
"""

from __future__ import annotations

import csv
import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn import functional as F

from UniverSegLogic.core.metrics import dice_from_counts
from UniverSegLogic.core.model import UniverSeg
from UniverSegLogic.core.slices import evaluation_slices, typical_gap
from UniverSegLogic.core.support import select_support
from UniverSegLogic.core.weights import verify_state_dict

CHECKPOINT_FORMAT = "universeg-slicer-train/1"
KIND_OWN, KIND_CROSS, KIND_SYNTHETIC = 0, 1, 2
OUTPUT_FILES = ("checkpoint.pt", "last.pt", "best.pt", "log.csv", "curve.png", "summary.json")


# ----------------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """Everything a training run needs (the CLI fills it from its flags)."""

    data: str
    out: str
    minutes: float = 7.0  #: wall-clock budget of the whole run (load included)
    max_steps: Optional[int] = None  #: stop after this many steps of this run
    resume: Optional[str] = None  #: full checkpoint or plain state dict
    device: str = "auto"
    seed: int = 0
    # episodes
    episodes: int = 16  #: episodes per step
    targets: int = 2  #: target slices per episode (rows = episodes*targets)
    max_k: int = 8  #: labeled slices per episode: 1..max_k
    max_support: int = 8  #: S = min(k, max_support)
    gap: int = 2  #: targets reach at least this far beyond the extent
    jitter: int = 1  #: random shift of each labeled slice
    p_cross: float = 0.15  #: support from a same-named structure of another case
    p_synthetic: float = 0.25  #: procedurally generated task
    min_voxels: int = 60  #: structures with fewer voxels are dropped
    min_slices: int = 3  #: ... or fewer non-empty slices
    min_area: int = 12  #: ... or a smaller largest cross-section (pixels)
    # synthetic bank
    synth_volumes: int = 32
    synth_depth: int = 48
    synth_refresh: int = 200  #: regenerate the bank every this many steps
    # augmentation
    augment: bool = True
    p_task_affine: float = 0.8
    p_invert: float = 0.1
    # optimisation
    lr: float = 2e-4
    min_lr_ratio: float = 0.05
    weight_decay: float = 1e-4
    warmup_steps: int = 200  #: from scratch / plain weights
    resume_warmup_steps: int = 30  #: after a full checkpoint (optimizer state kept)
    grad_clip: float = 1.0
    amp: bool = True  #: bf16 autocast on CUDA
    # validation, logging, checkpoints
    val_structures: int = 24
    val_ks: Tuple[int, ...] = (2, 3, 5)
    val_seed: int = 1234
    val_batch: int = 96
    val_max_targets: Optional[int] = None  #: evenly thinned targets per episode (smoke runs)
    val_every_s: float = 30.0
    val_every: Optional[int] = None  #: steps; overrides val_every_s
    log_every_s: float = 20.0
    checkpoint_every_s: float = 60.0


@dataclass
class FileInfo:
    """One slice stack inside a :class:`SliceStore`."""

    name: str
    case: str
    axis: str
    offset: int
    n: int
    synthetic: bool = False


@dataclass
class Structures:
    """The tasks of a store: one row per (file, label id) with its slice extent."""

    file: np.ndarray
    label: np.ndarray
    z0: np.ndarray
    z1: np.ndarray
    name: np.ndarray  # key into the shared name vocabulary (-1: synthetic, no partners)
    weight: np.ndarray  # sampling weight

    @staticmethod
    def empty() -> Structures:
        z = np.zeros(0, np.int64)
        return Structures(z, z.copy(), z.copy(), z.copy(), z.copy(), np.zeros(0))

    def __len__(self) -> int:
        return len(self.file)

    @property
    def span(self) -> np.ndarray:
        return self.z1 - self.z0

    def concat(self, other: Structures) -> Structures:
        return Structures(
            *(
                np.concatenate([getattr(self, f), getattr(other, f)])
                for f in ("file", "label", "z0", "z1", "name", "weight")
            )
        )


# ----------------------------------------------------------------------------- data on device
class SliceStore:
    """All slices of one split as device tensors, plus the structure table.

    ``images`` (N,H,W) uint8 and ``labels`` (N,H,W) int16; a synthetic tail of ``spare``
    slices can be (re)filled by :meth:`set_synthetic`.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        files: List[FileInfo],
        structures: Structures,
        device: str,
        spare: int = 0,
    ):
        self.device = device
        h, w = images.shape[1:]
        self.real_slices = images.shape[0]
        total = self.real_slices + spare
        self.images = torch.zeros((total, h, w), dtype=torch.uint8, device=device)
        self.labels = torch.zeros((total, h, w), dtype=torch.int16, device=device)
        if self.real_slices:
            self.images[: self.real_slices] = torch.from_numpy(images).to(device)
            self.labels[: self.real_slices] = torch.from_numpy(labels).to(device)
        self.real_files = list(files)
        self.real_structures = structures
        self.files = list(files)
        self.structures = structures
        self.spare = spare
        self.names: Dict[str, int] = {}
        self.partners: List[np.ndarray] = []

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def set_synthetic(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        min_voxels: int,
        min_slices: int,
        min_area: int,
        weight: float = 1.0,
    ) -> int:
        """Put (E,D,H,W) synthetic volumes into the tail; returns the number of structures."""
        e, d = images.shape[:2]
        if e * d > self.spare:
            raise ValueError("synthetic bank larger than the reserved tail")
        start = self.real_slices
        self.images[start : start + e * d] = images.reshape(e * d, *images.shape[2:])
        self.labels[start : start + e * d] = labels.reshape(e * d, *labels.shape[2:])
        n_ids = int(labels.max().item()) if labels.numel() else 0
        files = list(self.real_files)
        rows: List[Tuple[int, int, int, int]] = []
        if n_ids > 0:
            areas = torch.stack([(labels == j).sum(dim=(2, 3)) for j in range(1, n_ids + 1)], 1)
            areas = areas.cpu().numpy()  # (E, ids, D)
        for v in range(e):
            files.append(FileInfo(f"synthetic-{v}", f"synthetic-{v}", "z", start + v * d, d, True))
            for j in range(n_ids):
                a = areas[v, j]
                if _keep(a, min_voxels, min_slices, min_area):
                    nz = np.flatnonzero(a)
                    rows.append((len(files) - 1, j + 1, int(nz[0]), int(nz[-1])))
        syn = _structures_from_rows(rows, [-1] * len(rows), [weight] * len(rows))
        self.files = files
        self.structures = self.real_structures.concat(syn)
        return len(rows)


def _keep(area: np.ndarray, min_voxels: int, min_slices: int, min_area: int) -> bool:
    return (
        area.sum() >= min_voxels and np.count_nonzero(area) >= min_slices and area.max() >= min_area
    )


def _structures_from_rows(
    rows: Sequence[Tuple[int, int, int, int]], names: Sequence[int], weights: Sequence[float]
) -> Structures:
    if not rows:
        return Structures.empty()
    arr = np.asarray(rows, dtype=np.int64)
    return Structures(
        arr[:, 0],
        arr[:, 1],
        arr[:, 2],
        arr[:, 3],
        np.asarray(names, np.int64),
        np.asarray(weights, np.float64),
    )


def _case_axis(stem: str) -> Tuple[str, str]:
    if "__" in stem:
        case, axis = stem.rsplit("__", 1)
        return case, axis
    return stem, ""


def load_split(
    folder: str,
    device: str,
    spare: int = 0,
    min_voxels: int = 60,
    min_slices: int = 3,
    min_area: int = 12,
    names: Optional[Dict[str, int]] = None,
) -> SliceStore:
    """Load every ``*.npz`` of ``folder`` into one :class:`SliceStore` on ``device``.

    Structures are weighted 1/sqrt(structures in their file) so that atlases with a hundred
    labels do not drown the rest. ``names`` (name -> key) is extended in place when given.
    """
    paths = sorted(Path(folder).glob("*.npz"))
    vocab: Dict[str, int] = names if names is not None else {}
    images, labels, files = [], [], []
    rows: List[Tuple[int, int, int, int]] = []
    row_names: List[int] = []
    row_weights: List[float] = []
    offset = 0
    shape = None
    for path in paths:
        with np.load(path, allow_pickle=False) as z:
            img = np.asarray(z["image"])
            lab = np.asarray(z["labels"])
            label_names = [str(s) for s in np.asarray(z["names"]).reshape(-1)]
        if img.ndim != 3 or img.shape != lab.shape or img.dtype != np.uint8:
            raise ValueError(f"{path}: expected image uint8 (N,H,W) and labels of the same shape")
        if shape is None:
            shape = img.shape[1:]
        elif img.shape[1:] != shape:
            raise ValueError(f"{path}: slices are {img.shape[1:]}, other files {shape}")
        if lab.max(initial=0) > np.iinfo(np.int16).max:
            raise ValueError(f"{path}: label ids above 32767 are not supported")
        lab16 = lab.astype(np.int16)
        n = img.shape[0]
        n_ids = int(lab.max(initial=0))
        case, axis = _case_axis(path.stem)
        files.append(FileInfo(path.stem, case, axis, offset, n))
        file_rows = []
        if n_ids > 0:
            flat = (
                np.arange(n, dtype=np.int64)[:, None] * (n_ids + 1)
                + lab.reshape(n, -1).astype(np.int64)
            ).ravel()
            areas = np.bincount(flat, minlength=n * (n_ids + 1)).reshape(n, n_ids + 1)
            for lid in range(1, n_ids + 1):
                a = areas[:, lid]
                if not _keep(a, min_voxels, min_slices, min_area):
                    continue
                nz = np.flatnonzero(a)
                name = label_names[lid - 1] if lid - 1 < len(label_names) else f"label {lid}"
                key = vocab.setdefault(name.strip().lower(), len(vocab))
                file_rows.append(((len(files) - 1, lid, int(nz[0]), int(nz[-1])), key))
        for r, key in file_rows:
            rows.append(r)
            row_names.append(key)
            row_weights.append(1.0 / math.sqrt(len(file_rows)))
        images.append(img)
        labels.append(lab16)
        offset += n
    if not files:
        raise FileNotFoundError(f"no .npz slice stacks in {folder}")
    store = SliceStore(
        np.concatenate(images),
        np.concatenate(labels),
        files,
        _structures_from_rows(rows, row_names, row_weights),
        device,
        spare,
    )
    store.names = vocab
    store.partners = _partners(store.structures, files)
    return store


def _partners(st: Structures, files: List[FileInfo]) -> List[np.ndarray]:
    """For each structure: same-named structures of *other cases* sliced along the same axis."""
    groups: Dict[Tuple[int, str], List[int]] = {}
    for i in range(len(st)):
        groups.setdefault((int(st.name[i]), files[st.file[i]].axis), []).append(i)
    out = []
    for i in range(len(st)):
        case = files[st.file[i]].case
        group = groups[(int(st.name[i]), files[st.file[i]].axis)]
        out.append(np.asarray([j for j in group if files[st.file[j]].case != case], np.int64))
    return out


# ----------------------------------------------------------------------------- synthetic tasks
def synthetic_volumes(
    count: int, depth: int, size: int, generator: torch.Generator, device: str, max_blobs: int = 3
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random smooth 3D blobs over random smooth textures: (E,D,H,W) uint8 image, int16 labels.

    Each blob is a deformed, tilted ellipsoid (so its cross-sections shrink towards its ends) with
    its own texture and intensity offset; later blobs overwrite earlier ones.
    """
    e, d, h = count, depth, size
    dev = torch.device(device)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=dev)

    def noise(dz: int, dxy: int) -> torch.Tensor:
        lo = rand(e, 1, max(2, dz), max(2, dxy), max(2, dxy))
        return F.interpolate(lo, size=(d, h, h), mode="trilinear", align_corners=False)[:, 0]

    def per_volume(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * rand(e)).view(e, 1, 1, 1)

    tex = (
        per_volume(0.2, 1.0) * noise(d // 8, 6)
        + per_volume(0.0, 0.6) * noise(d // 4, 16)
        + per_volume(0.0, 0.3) * noise(d // 2, 32)
    )
    lo_, hi_ = tex.amin(dim=(1, 2, 3), keepdim=True), tex.amax(dim=(1, 2, 3), keepdim=True)
    img = (tex - lo_) / (hi_ - lo_ + 1e-6) * per_volume(0.3, 0.8) + per_volume(0.0, 0.3)
    labels = torch.zeros((e, d, h, h), dtype=torch.int16, device=dev)
    zz = torch.arange(d, device=dev, dtype=torch.float32).view(1, d, 1, 1)
    yy = torch.arange(h, device=dev, dtype=torch.float32).view(1, 1, h, 1)
    xx = torch.arange(h, device=dev, dtype=torch.float32).view(1, 1, 1, h)
    n_blobs = torch.randint(1, max_blobs + 1, (e,), generator=generator, device=dev)
    for j in range(max_blobs):
        cz = per_volume(0.15, 0.85) * d
        rz = per_volume(2.5, max(3.0, 0.45 * d))
        cy, cx = per_volume(0.25, 0.75) * h, per_volume(0.25, 0.75) * h
        ry, rx = per_volume(0.05, 0.3) * h, per_volume(0.05, 0.3) * h
        ty, tx = per_volume(-0.15, 0.15) * h, per_volume(-0.15, 0.15) * h  # tilt along z
        ang = per_volume(0.0, math.pi)
        rel = (zz - cz) / rz
        dy, dx = yy - cy - ty * rel, xx - cx - tx * rel
        u = dy * torch.cos(ang) + dx * torch.sin(ang)
        v = -dy * torch.sin(ang) + dx * torch.cos(ang)
        dist = torch.sqrt(rel**2 + (u / ry) ** 2 + (v / rx) ** 2)
        dist = dist + per_volume(0.0, 0.35) * (2 * noise(d // 4, 10) - 1)
        inside = (dist < 1) & (j < n_blobs).view(e, 1, 1, 1)
        labels[inside] = j + 1
        sign = torch.where(rand(e) < 0.5, -1.0, 1.0).view(e, 1, 1, 1)
        offset = sign * per_volume(0.08, 0.5)
        blob_tex = per_volume(0.0, 0.4) * (noise(d // 3, 20) - 0.5)
        img = torch.where(inside, img + offset + blob_tex, img)
    img = F.avg_pool3d(
        img.unsqueeze(1), (1, 3, 3), stride=1, padding=(0, 1, 1), count_include_pad=False
    )[:, 0]
    img = img + per_volume(0.0, 0.05) * torch.randn(img.shape, generator=generator, device=dev)
    lo_, hi_ = img.amin(dim=(1, 2, 3), keepdim=True), img.amax(dim=(1, 2, 3), keepdim=True)
    img = (img - lo_) / (hi_ - lo_ + 1e-6)
    return (img * 255).round().clamp(0, 255).to(torch.uint8), labels


# ----------------------------------------------------------------------------- episodes
def labeled_positions(z0: int, z1: int, k: int) -> np.ndarray:
    """The evaluation's k labeled slices over the extent [z0, z1]."""
    return np.asarray(evaluation_slices(z0, z1, k), dtype=np.int64)


def jittered_positions(
    z0: int, z1: int, k: int, jitter: int, rng: np.random.Generator
) -> np.ndarray:
    """Evaluation positions shifted by up to +-jitter (kept distinct and inside the extent)."""
    base = labeled_positions(z0, z1, k)
    if jitter <= 0:
        return base
    moved = np.clip(base + rng.integers(-jitter, jitter + 1, size=len(base)), z0, z1)
    moved = np.unique(moved)
    return moved if len(moved) == len(base) else base


def target_range(labeled: np.ndarray, z0: int, z1: int, n: int, gap: int) -> Tuple[int, int]:
    """Slices the product predicts (labeled range +- one typical gap), widened to the extent
    +- ``gap``, clipped to the volume."""
    ext = int(np.ceil(typical_gap(labeled, n)))
    lo = max(0, min(int(labeled[0]) - ext, z0 - gap))
    hi = min(n - 1, max(int(labeled[-1]) + ext, z1 + gap))
    return lo, hi


@dataclass
class EpisodeBatch:
    """One training step's rows: row r is target ``idx[r,0]`` with support ``idx[r,1:]``.

    Indices are global slice indices into the store; ``ids`` the label id that makes each slice
    binary. Per episode: the kind, the target structure, the support structure and the labeled
    slices (global indices, in the support structure's file).
    """

    k: int
    support_size: int
    idx: np.ndarray  # (B, S+1) int64
    ids: np.ndarray  # (B, S+1) int64
    episode: np.ndarray  # (B,) episode of each row
    kind: np.ndarray  # (E,)
    target_structure: np.ndarray  # (E,)
    support_structure: np.ndarray  # (E,)
    labeled: List[np.ndarray] = field(default_factory=list)


class EpisodeSampler:
    """Samples :class:`EpisodeBatch` es from a store with the product's protocol."""

    def __init__(self, store: SliceStore, cfg: TrainConfig, rng: np.random.Generator):
        self.store = store
        self.cfg = cfg
        self.rng = rng
        self.refresh()

    def refresh(self) -> None:
        """Recompute the candidate tables (after the synthetic bank changed)."""
        st = self.store.structures
        files = self.store.files
        self.is_syn = np.asarray([files[f].synthetic for f in st.file], dtype=bool)
        n_real = len(self.store.real_structures)
        partner_span = np.full(len(st), -1, np.int64)
        for i in range(min(n_real, len(self.store.partners))):
            p = self.store.partners[i]
            if len(p):
                partner_span[i] = st.span[p].max()
        self.partner_span = partner_span

    def _choose(self, mask: np.ndarray, count: int) -> np.ndarray:
        cand = np.flatnonzero(mask)
        w = self.store.structures.weight[cand]
        return cand[self.rng.choice(len(cand), size=count, p=w / w.sum())]

    def sample(self) -> EpisodeBatch:
        cfg, rng, st = self.cfg, self.rng, self.store.structures
        span = st.span
        if len(st) == 0:
            raise ValueError("no usable structure in the training data")
        k = int(rng.integers(1, cfg.max_k + 1))
        k = min(k, int(span.max()) if span.max() > 0 else 1)
        k = max(k, 1)
        s = min(k, cfg.max_support)
        ok = span >= k
        real_ok, syn_ok = ok & ~self.is_syn, ok & self.is_syn
        cross_ok = real_ok & (self.partner_span >= k)
        e = cfg.episodes
        u = rng.random(e)
        kind = np.full(e, KIND_OWN)
        if syn_ok.any():
            kind[u < cfg.p_synthetic] = KIND_SYNTHETIC
        if cross_ok.any():
            kind[(u >= cfg.p_synthetic) & (u < cfg.p_synthetic + cfg.p_cross)] = KIND_CROSS
        if not real_ok.any():
            kind[kind != KIND_SYNTHETIC] = KIND_SYNTHETIC
        tstruct = np.zeros(e, np.int64)
        for kd, mask in ((KIND_OWN, real_ok), (KIND_CROSS, cross_ok), (KIND_SYNTHETIC, syn_ok)):
            sel = kind == kd
            if sel.any():
                tstruct[sel] = self._choose(mask, int(sel.sum()))
        sstruct = tstruct.copy()
        rows_idx, rows_ids, rows_ep, labeled_all = [], [], [], []
        files = self.store.files
        t_count = cfg.targets
        for ep in range(e):
            a = int(tstruct[ep])
            fa = files[st.file[a]]
            z0, z1 = int(st.z0[a]), int(st.z1[a])
            if kind[ep] == KIND_CROSS:
                partners = self.store.partners[a]
                partners = partners[span[partners] >= k]
                b = int(partners[rng.integers(len(partners))])
                sstruct[ep] = b
                fb = files[st.file[b]]
                zb0, zb1 = int(st.z0[b]), int(st.z1[b])
                lab = jittered_positions(zb0, zb1, k, cfg.jitter, rng)
                ts = rng.integers(z0, z1 + 1, size=t_count)
                for t in ts:
                    rel = (t - z0) / max(z1 - z0, 1)
                    tb = zb0 + int(round(rel * (zb1 - zb0)))
                    sup = select_support(tb, lab, s)
                    rows_idx.append([fa.offset + int(t)] + [fb.offset + q for q in sup])
                    rows_ids.append([int(st.label[a])] + [int(st.label[b])] * s)
                    rows_ep.append(ep)
                labeled_all.append(fb.offset + lab)
                continue
            lab = jittered_positions(z0, z1, k, cfg.jitter, rng)
            lo, hi = target_range(lab, z0, z1, fa.n, cfg.gap)
            cand = np.setdiff1d(np.arange(lo, hi + 1), lab)
            ts = rng.choice(cand, size=t_count, replace=len(cand) < t_count)
            for t in ts:
                sup = select_support(int(t), lab, s)
                rows_idx.append([fa.offset + int(t)] + [fa.offset + q for q in sup])
                rows_ids.append([int(st.label[a])] * (s + 1))
                rows_ep.append(ep)
            labeled_all.append(fa.offset + lab)
        return EpisodeBatch(
            k,
            s,
            np.asarray(rows_idx, np.int64),
            np.asarray(rows_ids, np.int64),
            np.asarray(rows_ep, np.int64),
            kind,
            tstruct,
            sstruct,
            labeled_all,
        )


def gather(
    store: SliceStore, idx: np.ndarray, ids: np.ndarray
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B,n) slice indices and label ids -> float images in [0,1] and binary labels (B,n,H,W)."""
    dev = store.images.device
    idx_t = torch.from_numpy(idx).to(dev, non_blocking=True)
    ids_t = torch.from_numpy(ids.astype(np.int16)).to(dev, non_blocking=True)
    images = store.images[idx_t].float().div_(255.0)
    labels = (store.labels[idx_t] == ids_t[..., None, None]).float()
    return images, labels


# ----------------------------------------------------------------------------- augmentation
def _affine(
    angle: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, flip: torch.Tensor
) -> torch.Tensor:
    """(N,) rotation, (N,) scale, (N,2) shift, (N,2) +-1 flips -> (N,3,3) homogeneous maps
    from output to input coordinates (``affine_grid`` convention)."""
    c, s = torch.cos(angle), torch.sin(angle)
    m = torch.zeros(angle.shape[0], 3, 3, device=angle.device)
    m[:, 0, 0], m[:, 0, 1] = c * flip[:, 0] / scale, -s * flip[:, 1] / scale
    m[:, 1, 0], m[:, 1, 1] = s * flip[:, 0] / scale, c * flip[:, 1] / scale
    m[:, :2, 2] = shift
    m[:, 2, 2] = 1
    return m


def augment(
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batched augmentation of (B,n,H,W) rows; slice 0 is the target, the rest its support.

    Task level (shared by the row): affine (rotation, scale, shift), flips, inversion.
    Image level (per slice): a slight affine, gamma, contrast/brightness, Gaussian noise.
    Labels are resampled bilinearly and thresholded at 0.5.
    """
    b, n, h, w = images.shape
    dev = images.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=dev)

    # task level
    inv = (rand(b) < cfg.p_invert).view(b, 1, 1, 1)
    images = torch.where(inv, 1.0 - images, images)
    on = (rand(b) < cfg.p_task_affine).float()
    big_rot = rand(b) < 0.25
    angle = torch.where(big_rot, (rand(b) * 2 - 1) * math.pi, (rand(b) * 2 - 1) * math.radians(20))
    scale = torch.exp((rand(b) * 2 - 1) * math.log(1.25))
    shift = (rand(b, 2) * 2 - 1) * 0.1
    flip = torch.where(rand(b, 2) < 0.25, -1.0, 1.0)
    task = _affine(
        angle * on,
        1 + (scale - 1) * on,
        shift * on[:, None],
        torch.where(on[:, None] > 0, flip, torch.ones_like(flip)),
    )
    # image level
    m = b * n
    on_i = (rand(m) < 0.5).float()
    small = _affine(
        (rand(m) * 2 - 1) * math.radians(5) * on_i,
        1 + (rand(m) * 2 - 1) * 0.05 * on_i,
        (rand(m, 2) * 2 - 1) * 0.02 * on_i[:, None],
        torch.ones(m, 2, device=dev),
    )
    full = task.repeat_interleave(n, dim=0) @ small
    grid = F.affine_grid(full[:, :2], [m, 2, h, w], align_corners=False)
    both = torch.stack([images.reshape(m, h, w), labels.reshape(m, h, w)], 1)
    both = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x, y = both[:, 0], (both[:, 1] > 0.5).float()
    # intensity, per image
    one = torch.ones(m, device=dev)
    gamma = torch.where(rand(m) < 0.5, torch.exp((rand(m) * 2 - 1) * 0.4), one)
    x = x.clamp_min(1e-6) ** gamma.view(m, 1, 1)
    mean = x.mean(dim=(1, 2), keepdim=True)
    con = torch.where(rand(m) < 0.5, 0.75 + 0.5 * rand(m), torch.ones(m, device=dev)).view(m, 1, 1)
    bri = torch.where(rand(m) < 0.5, (rand(m) * 2 - 1) * 0.08, torch.zeros(m, device=dev))
    x = (x - mean) * con + mean + bri.view(m, 1, 1)
    sigma = torch.where(rand(m) < 0.3, rand(m) * 0.04, torch.zeros(m, device=dev)).view(m, 1, 1)
    x = x + sigma * torch.randn(x.shape, generator=generator, device=dev)
    return x.clamp(0, 1).view(b, n, h, w), y.view(b, n, h, w)


# ----------------------------------------------------------------------------- loss
def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice (per slice, smoothed by 1 so empty targets count) + BCE, on (B,1,H,W) logits."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce + (1 - dice).mean()


def _forward(model: UniverSeg, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model(images[:, :1], images[:, 1:].unsqueeze(2), labels[:, 1:].unsqueeze(2))


# ----------------------------------------------------------------------------- validation
class Validator:
    """A fixed (seeded) set of validation episodes run with the product's protocol."""

    def __init__(self, store: SliceStore, cfg: TrainConfig):
        self.store = store
        rng = np.random.default_rng(cfg.val_seed)
        st = store.structures
        need = max(cfg.val_ks)
        cand = np.flatnonzero(st.span >= need)
        count = min(cfg.val_structures, len(cand))
        if count == 0:
            raise ValueError(f"no validation structure is long enough for k={need}")
        w = st.weight[cand]
        chosen = np.sort(rng.choice(cand, size=count, replace=False, p=w / w.sum()))
        groups: Dict[int, Tuple[list, list, list]] = {}
        self.episode_k: List[int] = []
        for a in chosen:
            f = store.files[st.file[a]]
            z0, z1 = int(st.z0[a]), int(st.z1[a])
            for k in cfg.val_ks:
                ep = len(self.episode_k)
                self.episode_k.append(k)
                lab = labeled_positions(z0, z1, k)
                lo, hi = target_range(lab, z0, z1, f.n, cfg.gap)
                s = min(k, cfg.max_support)
                g = groups.setdefault(s, ([], [], []))
                painted = set(lab.tolist())
                ts = [t for t in range(lo, hi + 1) if t not in painted]
                if cfg.val_max_targets and len(ts) > cfg.val_max_targets:
                    pick = np.linspace(0, len(ts) - 1, cfg.val_max_targets).round().astype(int)
                    ts = [ts[i] for i in pick]
                for t in ts:
                    sup = select_support(t, lab, s)
                    g[0].append([f.offset + t] + [f.offset + q for q in sup])
                    g[1].append([int(st.label[a])] * (s + 1))
                    g[2].append(ep)
        self.groups = {
            s: (np.asarray(i, np.int64), np.asarray(d, np.int64), np.asarray(e))
            for s, (i, d, e) in sorted(groups.items())
        }
        self.rows = sum(len(v[0]) for v in self.groups.values())
        self.batch = cfg.val_batch
        self.amp = cfg.amp

    @torch.no_grad()
    def evaluate(self, model: UniverSeg) -> Dict[str, float]:
        """Mean Dice over episodes (logit > 0; empty vs empty = 1), overall and per k."""
        dev = self.store.images.device
        n_ep = len(self.episode_k)
        acc = torch.zeros(3, n_ep, dtype=torch.float64, device=dev)
        was_training = model.training
        model.eval()
        for idx, ids, eps in self.groups.values():
            for i in range(0, len(idx), self.batch):
                images, labels = gather(
                    self.store, idx[i : i + self.batch], ids[i : i + self.batch]
                )
                with _autocast(dev, self.amp):
                    logits = _forward(model, images, labels)
                pred = (logits.float() > 0).flatten(1).double()
                truth = labels[:, 0].flatten(1).double()
                ep_t = torch.from_numpy(eps[i : i + self.batch]).to(dev)
                acc[0].index_add_(0, ep_t, (pred * truth).sum(1))
                acc[1].index_add_(0, ep_t, pred.sum(1))
                acc[2].index_add_(0, ep_t, truth.sum(1))
        model.train(was_training)
        inter, ps, ts = acc.cpu().numpy()
        dice = np.atleast_1d(dice_from_counts(inter, ps, ts))
        ks = np.asarray(self.episode_k)
        out = {"val_dice": float(dice.mean())}
        for k in sorted(set(self.episode_k)):
            out[f"val_dice_k{k}"] = float(dice[ks == k].mean())
        return out


def _autocast(device: torch.device, amp: bool):
    dev = torch.device(device)
    return torch.autocast(
        device_type=dev.type, dtype=torch.bfloat16, enabled=bool(amp and dev.type == "cuda")
    )


# ----------------------------------------------------------------------------- checkpoints
def cpu_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The model's v1 state dict as float32 CPU tensors (official key names only)."""
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


def _atomic_save(obj, path: Path) -> None:
    from UniverSegLogic.core.atomic import write_with

    write_with(str(path), lambda tmp: torch.save(obj, tmp))


def _atomic_text(text: str, path: Path) -> None:
    from UniverSegLogic.core.atomic import write_text

    write_text(str(path), text)


@dataclass
class ResumeState:
    """What ``--resume`` brought: weights, optionally optimizer and position."""

    state_dict: Dict[str, torch.Tensor]
    optimizer: Optional[dict] = None
    step: int = 0
    seconds: float = 0.0
    best_val: Optional[float] = None
    sessions: int = 0
    full: bool = False


def load_resume(path: str) -> ResumeState:
    """Read a full training checkpoint or a plain v1 state dict (``weights_only=True``)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--resume: no such file: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return ResumeState(
            verify_state_dict(obj["model"], origin=path),
            obj.get("optimizer"),
            int(obj.get("step", 0)),
            float(obj.get("seconds", 0.0)),
            obj.get("best_val"),
            int(obj.get("sessions", 0)),
            True,
        )
    return ResumeState(verify_state_dict(obj, origin=path))


# ----------------------------------------------------------------------------- logging
class TrainLog:
    """``log.csv`` (step, seconds, loss, val_dice, lr; appended across sessions) + ``curve.png``."""

    COLUMNS = ("step", "seconds", "loss", "val_dice", "lr")

    def __init__(self, out: Path):
        self.path = out / "log.csv"
        self.rows: List[Dict[str, float]] = []
        if self.path.is_file():
            with open(self.path, newline="") as fh:
                for r in csv.DictReader(fh):
                    self.rows.append({c: _num(r.get(c, "")) for c in self.COLUMNS})
        else:
            with open(self.path, "w", newline="") as fh:
                csv.writer(fh).writerow(self.COLUMNS)

    def add(
        self, step: int, seconds: float, loss: float, val_dice: Optional[float], lr: float
    ) -> None:
        row = {
            "step": step,
            "seconds": seconds,
            "loss": loss,
            "val_dice": float("nan") if val_dice is None else val_dice,
            "lr": lr,
        }
        self.rows.append(row)
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerow(
                [
                    step,
                    f"{seconds:.1f}",
                    _fmt(loss),
                    "" if val_dice is None else f"{val_dice:.4f}",
                    f"{lr:.3e}",
                ]
            )

    def plot(self, path: Path) -> None:
        steps = np.asarray([r["step"] for r in self.rows], float)
        loss = np.asarray([r["loss"] for r in self.rows], float)
        val = np.asarray([r["val_dice"] for r in self.rows], float)
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except Exception:  # noqa: BLE001 - no matplotlib on the GPU machine: plot log.csv later
            return
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
        ok = np.isfinite(loss)
        ax[0].plot(steps[ok], loss[ok])
        ax[0].set(xlabel="step", ylabel="train loss (Dice + BCE)")
        ok = np.isfinite(val)
        ax[1].plot(steps[ok], val[ok], marker="o")
        ax[1].set(xlabel="step", ylabel="val Dice (product protocol)")
        fig.tight_layout()
        from UniverSegLogic.core.atomic import write_with

        write_with(str(path), lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
        plt.close(fig)


def _num(s: str) -> float:
    try:
        return float(s)
    except (TypeError, ValueError):
        return float("nan")


def _fmt(x: float) -> str:
    return "" if not math.isfinite(x) else f"{x:.5f}"


def lr_at(cfg: TrainConfig, step_in_run: int, progress: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine to ``min_lr_ratio`` as progress -> 1."""
    warm = min(1.0, (step_in_run + 1) / max(1, warmup))
    p = min(max(progress, 0.0), 1.0)
    cos = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return cfg.lr * warm * cos


# ----------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    """Summary of a run."""

    steps: int  # total steps (including resumed ones)
    run_steps: int  # steps of this run
    seconds: float  # training seconds of this run
    steps_per_s: float
    final_loss: float
    best_val: Optional[float]
    last_val: Optional[float]
    out: str
    history: List[Dict[str, float]] = field(default_factory=list)


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> cuda when available, else cpu."""
    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but no CUDA device is available")
    return device


class _StopFlag:
    """SIGTERM/SIGINT end the run cleanly (final validation and checkpoint)."""

    def __init__(self):
        self.stop = False
        self._old = {}

    def __enter__(self):
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread
            pass
        return self

    def _handle(self, signum, frame):  # noqa: ARG002
        self.stop = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: TrainConfig, echo: Callable[[str], None] = print) -> TrainResult:
    """Run one training session; see the module docstring."""
    t_start = time.time()
    deadline = t_start + cfg.minutes * 60.0
    device = resolve_device(cfg.device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed + 1)

    data = Path(cfg.data)
    spare = cfg.synth_volumes * cfg.synth_depth if cfg.p_synthetic > 0 else 0
    store = load_split(
        str(data / "train"), device, spare, cfg.min_voxels, cfg.min_slices, cfg.min_area
    )
    validator = None
    if (data / "val").is_dir() and any((data / "val").glob("*.npz")):
        val_store = load_split(
            str(data / "val"),
            device,
            0,
            cfg.min_voxels,
            cfg.min_slices,
            cfg.min_area,
            names=dict(store.names),
        )
        validator = Validator(val_store, cfg)
    if spare:
        store.set_synthetic(
            *synthetic_volumes(cfg.synth_volumes, cfg.synth_depth, store.size, gen, device),
            cfg.min_voxels,
            cfg.min_slices,
            cfg.min_area,
        )
    sampler = EpisodeSampler(store, cfg, rng)
    echo(
        f"data: {len(store.real_files)} train stacks, {store.real_slices} slices, "
        f"{len(store.real_structures)} structures"
        + (
            f"; val: {len(validator.store.files)} stacks, {len(validator.episode_k)} episodes, "
            f"{validator.rows} target slices"
            if validator
            else "; no validation data"
        )
        + f"; device {device}"
        + (f" ({torch.cuda.get_device_name()})" if cuda else "")
    )

    model = UniverSeg().to(device)
    opt_kwargs = {"fused": True} if cuda else {}
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **opt_kwargs
    )
    step0, seconds0, sessions = 0, 0.0, 0
    warmup = cfg.warmup_steps
    if cfg.resume:
        rs = load_resume(cfg.resume)
        model.load_state_dict(rs.state_dict)
        if rs.full and rs.optimizer is not None:
            opt.load_state_dict(rs.optimizer)
            warmup = cfg.resume_warmup_steps
        step0, seconds0, sessions = rs.step, rs.seconds, rs.sessions
        echo(
            f"resumed from {cfg.resume}: "
            + (f"full checkpoint at step {rs.step}" if rs.full else "weights only")
        )
    model.train()

    log = TrainLog(out)
    best_val: Optional[float] = None
    best_state: Optional[Dict[str, torch.Tensor]] = None
    last_val: Optional[float] = None
    history: List[Dict[str, float]] = []

    last_val_step = -1
    val_seconds = 0.0

    def run_val(step: int) -> Optional[Dict[str, float]]:
        nonlocal best_val, best_state, last_val, last_val_step
        if validator is None:
            return None
        nonlocal val_seconds
        t0 = time.time()
        res = validator.evaluate(model)
        val_seconds += time.time() - t0
        last_val, last_val_step = res["val_dice"], step
        if best_val is None or last_val > best_val:
            best_val, best_state = last_val, cpu_state_dict(model)
            _atomic_save(best_state, out / "best.pt")
        return res

    def save_checkpoint(step: int, seconds: float) -> None:
        _atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "model": cpu_state_dict(model),
                "optimizer": _to_cpu(opt.state_dict()),
                "step": step,
                "seconds": seconds,
                "best_val": best_val,
                "sessions": sessions + 1,
                "config": _plain(asdict(cfg)),
            },
            out / "checkpoint.pt",
        )
        _atomic_save(cpu_state_dict(model), out / "last.pt")

    step = step0
    t_loop = time.time()
    val0 = run_val(step)
    if val0:
        echo(f"step {step}: initial " + _val_text(val0))
    log.add(step, seconds0, float("nan"), None if val0 is None else val0["val_dice"], 0.0)
    last_log = last_val_t = last_ckpt = time.time()
    log_steps, loss_sum = 0, torch.zeros((), device=device)
    sample_s = 0.0  # CPU time spent sampling episodes since the last log line
    val_steps = 0
    lr = 0.0
    final_loss = float("nan")
    run_steps = 0
    with _StopFlag() as flag:
        while not flag.stop:
            now = time.time()
            if now >= deadline or (cfg.max_steps is not None and run_steps >= cfg.max_steps):
                break
            progress = (now - t_loop) / max(deadline - t_loop, 1e-6)
            if cfg.max_steps:
                progress = max(progress, run_steps / cfg.max_steps)
            lr = lr_at(cfg, run_steps, progress, warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            if spare and run_steps and run_steps % cfg.synth_refresh == 0:
                store.set_synthetic(
                    *synthetic_volumes(cfg.synth_volumes, cfg.synth_depth, store.size, gen, device),
                    cfg.min_voxels,
                    cfg.min_slices,
                    cfg.min_area,
                )
                sampler.refresh()
            t_cpu = time.perf_counter()
            batch = sampler.sample()
            sample_s += time.perf_counter() - t_cpu
            images, labels = gather(store, batch.idx, batch.ids)
            if cfg.augment:
                images, labels = augment(images, labels, cfg, gen)
            with _autocast(device, cfg.amp):
                logits = _forward(model, images, labels)
            loss = dice_bce_loss(logits, labels[:, :1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            run_steps += 1
            log_steps += 1
            val_steps += 1
            loss_sum += loss.detach()
            now = time.time()
            due_val = (
                val_steps >= cfg.val_every if cfg.val_every else now - last_val_t >= cfg.val_every_s
            )
            due_log = now - last_log >= cfg.log_every_s or due_val
            if due_log:
                mean_loss = float((loss_sum / log_steps).item())
                now = time.time()
                rate = log_steps / max(now - last_log, 1e-9)
                final_loss = mean_loss
                vres = None
                if due_val:
                    vres = run_val(step)
                    last_val_t, val_steps = time.time(), 0
                seconds = seconds0 + time.time() - t_loop
                log.add(step, seconds, mean_loss, None if vres is None else vres["val_dice"], lr)
                history.append(
                    {"step": step, "loss": mean_loss, "lr": lr, "steps_per_s": rate, **(vres or {})}
                )
                echo(
                    f"step {step} | {rate:.1f} steps/s (sampler {1e3 * sample_s / log_steps:.1f} "
                    f"ms/step) | loss {mean_loss:.4f} | lr {lr:.2e} | "
                    f"{time.time() - t_start:.0f} s" + (" | " + _val_text(vres) if vres else "")
                )
                sample_s = 0.0
                loss_sum.zero_()
                log_steps = 0
                last_log = time.time()
            if time.time() - last_ckpt >= cfg.checkpoint_every_s:
                save_checkpoint(step, seconds0 + time.time() - t_loop)
                last_ckpt = time.time()
    train_seconds = time.time() - t_loop
    pure_seconds = max(train_seconds - val_seconds, 1e-9)  # before the final validation
    if log_steps:
        final_loss = float((loss_sum / log_steps).item())
    vres = run_val(step) if run_steps and last_val_step != step else None
    seconds = seconds0 + train_seconds
    if vres is not None or log_steps:
        log.add(step, seconds, final_loss, None if vres is None else vres["val_dice"], lr)
        history.append({"step": step, "loss": final_loss, "lr": lr, **(vres or {})})
        if vres:
            echo(f"step {step}: final " + _val_text(vres))
    save_checkpoint(step, seconds)
    if best_state is None:  # no validation data: the last weights are the best we know
        _atomic_save(cpu_state_dict(model), out / "best.pt")
    log.plot(out / "curve.png")
    rate = run_steps / pure_seconds
    result = TrainResult(
        step, run_steps, train_seconds, rate, final_loss, best_val, last_val, str(out), history
    )
    summary = {k: v for k, v in asdict(result).items() if k != "history"}
    summary.update(
        {
            "config": _plain(asdict(cfg)),
            "device": device,
            "device_name": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__,
            "total_seconds": seconds,
            "peak_gpu_memory_gib": (torch.cuda.max_memory_allocated() / 2**30 if cuda else None),
            "last_history": history[-1] if history else None,
        }
    )
    _atomic_text(json.dumps(summary, indent=2), out / "summary.json")
    echo(
        f"done: {run_steps} steps in {train_seconds:.0f} s ({rate:.1f} steps/s without "
        f"validation, which took {val_seconds:.0f} s), step {step}, "
        f"best val Dice {best_val if best_val is None else round(best_val, 4)}; wrote {out}"
    )
    return result


def _val_text(res: Dict[str, float]) -> str:
    parts = [f"val Dice {res['val_dice']:.4f}"]
    parts += [f"{k[9:]} {v:.3f}" for k, v in res.items() if k.startswith("val_dice_k")]
    return " ".join(parts)


def _plain(obj):
    """Config as plain JSON-able / weights_only-loadable values."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- test data
def write_synthetic_split(
    folder: str,
    cases: int = 3,
    axes: Sequence[str] = ("axial",),
    slices: int = 24,
    size: int = 32,
    seed: int = 0,
) -> List[str]:
    """Small prepared-format ``.npz`` stacks (for tests and smoke runs): per case, a bright
    ellipsoid "organ" and a darker "lesion" blob, both named consistently across cases."""
    rng = np.random.default_rng(seed)
    Path(folder).mkdir(parents=True, exist_ok=True)
    written = []
    zz, yy, xx = np.meshgrid(np.arange(slices), np.arange(size), np.arange(size), indexing="ij")
    for c in range(cases):
        for axis in axes:
            img = rng.normal(60, 10, (slices, size, size))
            lab = np.zeros((slices, size, size), np.uint16)
            for lid, (val, rz, rxy) in enumerate(((200, 0.35, 0.3), (110, 0.25, 0.2)), start=1):
                cz = slices * rng.uniform(0.4, 0.6)
                cy, cx = size * rng.uniform(0.35, 0.65, 2)
                d = (
                    ((zz - cz) / (rz * slices)) ** 2
                    + ((yy - cy) / (rxy * size)) ** 2
                    + ((xx - cx) / (rxy * size)) ** 2
                )
                lab[d < 1] = lid
                img[d < 1] = val + rng.normal(0, 10, int((d < 1).sum()))
            path = Path(folder) / f"case{c}__{axis}.npz"
            np.savez_compressed(
                path,
                image=np.clip(img, 0, 255).astype(np.uint8),
                labels=lab,
                names=np.array(["organ", "lesion"]),
                spacing=np.ones(3, np.float32),
                source=np.array("synthetic"),
            )
            written.append(str(path))
    return written
