"""Training data of the learned fusion (:mod:`UniverSegLogic.core.fusion_net`), from the
training volumes only.

An *episode* is one training structure along one array axis, painted on ``k`` slices (the
evaluation's positions, :func:`~UniverSegLogic.core.slices.evaluation_slices`, each moved by up to
a quarter of the gap; or, one time in four, ``k`` random slices of its extent, as an annotator
following suggestions paints them). For a few *centre* targets of the episode (inside the painted
range and up to :data:`BEYOND_GAPS` typical gaps beyond it) and their neighbours, the starter
network's logits are computed exactly as a propagation computes them (the same
:class:`~UniverSegLogic.core.propagator.Propagator` image stack and canvas, support = the two
bracketing painted slices); Fill between slices runs on the painting. Each centre then becomes one
*sample*: the fusion net's inputs (:func:`~UniverSegLogic.core.fusion_net.build_inputs`, the same
code the propagation runs) and the truth on the canvas, cropped to :data:`CROP` pixels around the
structure, stored as uint8.

Everything is seeded: the same seed, cases and weights give the same samples, byte for byte.
Nothing from the validation cases or the unseen chest CT is used here.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

#: Crop of the canvas stored per sample (pixels).
CROP = 96
#: Centre targets beyond the painted range: up to this many typical gaps past the end.
BEYOND_GAPS = 1.5
#: Painted slices per episode are drawn from these.
KS = (2, 3, 4, 5, 6, 8)
#: Structures spanning fewer slices than this along an axis are skipped there.
MIN_SLICES = 5
#: Centre targets per episode: inside the painted range / beyond it.
CENTRES_INSIDE = 5
CENTRES_BEYOND = 3
#: Episodes per structure, where not ``per_structure`` (none at present).
EPISODES_PER_STRUCTURE: Dict[str, int] = {}
#: Channels stored signed ([-1, 1] -> 0..254); the others unsigned ([0, 1] -> 0..255).
SIGNED = ("model", "model_nb", "base", "dist", "fbs_dist")

Log = Optional[Callable[[str], None]]


# ------------------------------------------------------------------------------ cases


@dataclass
class TrainingCase:
    """A training volume and its structures (boolean KJI masks on its grid)."""

    name: str
    image: object  # geometry.Volume
    masks: Dict[str, np.ndarray]
    source: str
    licence: str


#: Training sources of the fusion: data module source -> (cases used, licence note).
FUSION_SOURCES: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "totalsegmentator": (
        ("ts_ct_abdomen", "ts_ct_dicom"),
        "TotalSegmentator 2.18.0 sdist, Apache-2.0; images/labels CC BY 4.0 (attribution)",
    ),
    "nilearn": (("mni152_gmwm",), "MNI152 2009 templates, MNI permissive notice"),
    "mricron_brodmann": (
        ("colin27_brodmann",),
        "Debian mricron-data (main): debian/copyright gives BSD-3-clause (C. Rorden) for the "
        "package; Colin27 MNI permissive notice",
    ),
    "mricron_aal": (
        ("colin27_aal",),
        "Debian mricron-data: AAL atlas; upstream AAL terms not stated in the package",
    ),
    "itk_examples": (
        ("itk_brain_t1",),
        "Debian insighttoolkit5-examples, Apache-2.0 (ITK examples data)",
    ),
}
DEFAULT_SOURCES = ("totalsegmentator", "nilearn", "mricron_brodmann", "itk_examples")


def load_training_cases(cache: str, sources: Sequence[str] = DEFAULT_SOURCES) -> List[TrainingCase]:
    """The training cases of ``sources`` (see :data:`FUSION_SOURCES`), fetched into ``cache``
    (an existing download cache is reused). Validation and unseen cases are never returned."""
    from . import data

    out: List[TrainingCase] = []
    for src in sources:
        if src not in FUSION_SOURCES:
            raise ValueError(f"unknown fusion source {src!r} (use {', '.join(FUSION_SOURCES)})")
        names, licence = FUSION_SOURCES[src]
        fetch, load = data.SOURCES[src.split("_")[0] if src.startswith("mricron") else src]
        cases = load(fetch(cache))
        for c in cases:
            if c.spec.name not in names:
                continue
            if c.spec.role != "train":
                raise ValueError(f"{c.spec.name} is not a training case ({c.spec.role})")
            out.append(TrainingCase(c.spec.name, c.volume, c.structure_masks(), c.source, licence))
    return out


# ------------------------------------------------------------------------------ episodes


def _rng(seed: int, *parts: object) -> np.random.Generator:
    h = hashlib.blake2b(repr((seed,) + parts).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(h, "little"))


def painted_slices(z0: int, z1: int, k: int, rng: np.random.Generator) -> List[int]:
    """``k`` painted slices over ``[z0, z1]``: the evaluation's positions moved by up to a quarter
    gap (3 times in 4), or ``k`` random distinct slices of the extent."""
    from UniverSegLogic.core.slices import evaluation_slices

    n = z1 - z0 + 1
    k = max(1, min(k, n))
    if rng.random() < 0.25:
        return sorted(int(z) for z in rng.choice(np.arange(z0, z1 + 1), k, replace=False))
    base = evaluation_slices(z0, z1, k)
    jitter = max(0, int((n / k) // 4))
    out = {int(np.clip(z + rng.integers(-jitter, jitter + 1), z0, z1)) for z in base}
    return sorted(out)


def centre_targets(
    labeled: Sequence[int], n: int, ends_painted: Tuple[bool, bool], rng: np.random.Generator
) -> List[int]:
    """Up to :data:`CENTRES_INSIDE` targets between the painted slices and
    :data:`CENTRES_BEYOND` beyond them (within :data:`BEYOND_GAPS` typical gaps, nearer ones
    more often)."""
    from UniverSegLogic.core.slices import extrapolation_slices

    lab = sorted(labeled)
    inside = [t for t in range(lab[0] + 1, lab[-1]) if t not in set(lab)]
    ext = extrapolation_slices(lab, n, BEYOND_GAPS)
    beyond = []
    if ends_painted[0]:
        beyond += [t for t in range(max(0, lab[0] - ext), lab[0])]
    if ends_painted[1]:
        beyond += [t for t in range(lab[-1] + 1, min(n, lab[-1] + ext + 1))]
    out = []
    if inside:
        out += list(rng.choice(inside, min(CENTRES_INSIDE, len(inside)), replace=False))
    if beyond:
        d = np.array([min(abs(t - lab[0]), abs(t - lab[-1])) for t in beyond], np.float64)
        p = 1.0 / d
        p /= p.sum()
        out += list(rng.choice(beyond, min(CENTRES_BEYOND, len(beyond)), replace=False, p=p))
    return sorted(int(t) for t in out)


def network_logits(session, mask_stack: np.ndarray, labeled: Sequence[int], targets, engine):
    """{t: native logit} of ``targets``, as the propagation computes them (support: the two
    bracketing painted slices; targets sharing a support set run as one batch)."""
    from UniverSegLogic.core.support import select_support

    stack = session.stack
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for t in sorted(targets):
        groups.setdefault(select_support(t, labeled, session.options.support_size), []).append(t)
    out = {}
    for subset, ts in groups.items():
        s_img = stack.canvas_images(subset)
        s_lab = stack.canvas_masks(mask_stack, subset)
        for b in range(0, len(ts), session.batch_size):
            chunk = ts[b : b + session.batch_size]
            native = stack.canvas.from_canvas(
                engine.logits(stack.canvas_images(chunk), s_img, s_lab)
            ).numpy()
            for t, lg in zip(chunk, native):
                out[t] = np.ascontiguousarray(lg, dtype=np.float32)
    return out


def quantize(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) float inputs -> uint8 (signed channels of :data:`SIGNED` map [-1, 1] to
    0..254, the others [0, 1] to 0..255)."""
    from UniverSegLogic.core.fusion_net import MAP_CHANNELS

    out = np.empty(x.shape, np.uint8)
    for c, name in enumerate(MAP_CHANNELS):
        v = x[:, c]
        if name in SIGNED:
            out[:, c] = np.rint((np.clip(v, -1, 1) + 1.0) * 127.0).astype(np.uint8)
        else:
            out[:, c] = np.rint(np.clip(v, 0, 1) * 255.0).astype(np.uint8)
    return out


def dequantize(q):
    """Inverse of :func:`quantize` for a torch uint8 tensor (N, C, H, W) -> float32."""
    import torch

    from UniverSegLogic.core.fusion_net import MAP_CHANNELS

    x = q.float()
    signed = torch.tensor([n in SIGNED for n in MAP_CHANNELS])
    scale = torch.where(signed, torch.tensor(1 / 127.0), torch.tensor(1 / 255.0))
    shift = torch.where(signed, torch.tensor(-1.0), torch.tensor(0.0))
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def crop_box(roi: np.ndarray, size: int, crop: int, rng: np.random.Generator) -> Tuple[int, int]:
    """Top-left corner of a ``crop`` x ``crop`` window of a ``size`` canvas around the region of
    interest (its centre, moved at random by up to a quarter crop)."""
    if crop >= size:
        return 0, 0
    rows, cols = np.flatnonzero(roi.any(1)), np.flatnonzero(roi.any(0))
    if len(rows):
        cy, cx = (rows[0] + rows[-1]) / 2.0, (cols[0] + cols[-1]) / 2.0
    else:
        cy = cx = size / 2.0
    j = crop // 4
    top = int(np.clip(round(cy - crop / 2 + rng.integers(-j, j + 1)), 0, size - crop))
    left = int(np.clip(round(cx - crop / 2 + rng.integers(-j, j + 1)), 0, size - crop))
    return top, left


def episode_samples(
    session,
    truth: np.ndarray,
    labeled: Sequence[int],
    centres: Sequence[int],
    logits: Dict[int, np.ndarray],
    fbs: Optional[np.ndarray],
    fusion,
    rng: np.random.Generator,
    crop: int = CROP,
) -> Dict[str, np.ndarray]:
    """The samples of one episode: ``x`` (N, maps, crop, crop) uint8, ``s`` (N, scalars)
    float32, ``y`` (N, crop, crop) uint8 (the truth on the canvas x255), ``t`` targets."""
    import torch

    from UniverSegLogic.core.fill_between import labeled_only
    from UniverSegLogic.core.fusion_net import MAP_CHANNELS, build_inputs
    from UniverSegLogic.core.prior import ShapePrior

    painted = labeled_only(truth, labeled, 0)
    prior = ShapePrior(painted, labeled, session.frame.spacing, fbs)
    canvas = session.stack.canvas
    xs, ss, ys = [], [], []
    for t in centres:
        region, feats = prior.features(t, logits[t], logits)
        rule = fusion.inside_rule(fbs is not None) if region == "inside" else fusion.outside
        base = rule.logit(feats)
        x = build_inputs(prior, {t: (region, feats, base)}, canvas, session.stack.canvas_images)
        y = canvas.mask_to_canvas(torch.from_numpy(truth[t : t + 1].astype(np.float32)))
        x, y = x[0].numpy(), y[0, 0].numpy()
        m = len(MAP_CHANNELS)
        roi = (y > 0.5) | (x[MAP_CHANNELS.index("base")] > -2 / 12)
        roi |= x[MAP_CHANNELS.index("label_lo")] > 0.5
        roi |= x[MAP_CHANNELS.index("label_hi")] > 0.5
        top, left = crop_box(roi, canvas.size, crop, rng)
        win = (slice(top, top + crop), slice(left, left + crop))
        xs.append(x[:m][(slice(None),) + win])
        ss.append(x[m:, 0, 0])
        ys.append(np.rint(y[win] * 255.0).astype(np.uint8))
    if not xs:
        return {}
    return {
        "x": quantize(np.stack(xs)),
        "s": np.stack(ss).astype(np.float32),
        "y": np.stack(ys),
        "t": np.array(centres, np.int64),
    }


def build_samples(
    cases: Sequence[TrainingCase],
    engine,
    out_dir: str,
    seed: int = 0,
    per_structure: int = 3,
    log: Log = None,
    weights: str = "starter",
) -> List[str]:
    """Write one ``.npz`` of samples per (case, axis) into ``out_dir`` (skipping those already
    there: resumable); returns the paths. ``engine`` runs ``weights``; the logistic rule the net
    corrects is the one calibrated for them (:func:`~UniverSegLogic.core.prior.fusion_for`)."""
    from UniverSegLogic.core.fill_between import fill_between_slices, labeled_only
    from UniverSegLogic.core.prior import fusion_for
    from UniverSegLogic.core.propagator import PropagationOptions, Propagator
    from UniverSegLogic.core.slices import slice_extent

    fusion = fusion_for(weights)[0]
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for c in cases:
        for axis in (0, 1, 2):
            path = os.path.join(out_dir, f"{c.name}__a{axis}.npz")
            paths.append(path)
            if os.path.exists(path):
                continue
            t0 = time.perf_counter()
            opts = PropagationOptions(axis=axis, use_prior=False, fusion_model="logistic")
            session = Propagator(c.image, opts, engine=engine)
            frame = session.frame
            parts: Dict[str, List[np.ndarray]] = {"x": [], "s": [], "y": [], "t": []}
            meta = []
            for name in sorted(c.masks):
                truth = np.ascontiguousarray(frame.to_frame(np.asarray(c.masks[name], bool)))
                ext = slice_extent(truth, 0)
                if ext is None or ext[1] - ext[0] + 1 < MIN_SLICES:
                    continue
                for r in range(EPISODES_PER_STRUCTURE.get(c.name, per_structure)):
                    rng = _rng(seed, c.name, axis, name, r)
                    k = int(rng.choice(KS))
                    labeled = painted_slices(ext[0], ext[1], k, rng)
                    n = truth.shape[0]
                    ends = (bool(truth[labeled[0]].any()), bool(truth[labeled[-1]].any()))
                    centres = centre_targets(labeled, n, ends, rng)
                    if not centres:
                        continue
                    lab = set(labeled)
                    need = {
                        u for t in centres for u in (t - 1, t, t + 1) if 0 <= u < n and u not in lab
                    }
                    painted = labeled_only(truth, labeled, 0)
                    logits = network_logits(session, painted, labeled, need, engine)
                    fbs = np.ascontiguousarray(
                        fill_between_slices(painted, labeled, 0, frame.spacing)
                    )
                    smp = episode_samples(
                        session, truth, labeled, centres, logits, fbs, fusion, rng
                    )
                    for key in parts:
                        parts[key].append(smp[key])
                    meta.append(
                        {"structure": name, "rep": r, "k": k, "labeled": labeled, "n": len(centres)}
                    )
            if not meta:
                continue
            arrays = {key: np.concatenate(v) for key, v in parts.items()}
            tmp = path + ".partial.npz"
            np.savez_compressed(
                tmp,
                **arrays,
                meta=np.array(json.dumps({"case": c.name, "axis": axis, "episodes": meta})),
                source=np.array(c.source),
                licence=np.array(c.licence),
            )
            os.replace(tmp, path)
            if log:
                log(
                    f"{c.name} axis {axis}: {len(meta)} episodes, {len(arrays['t'])} samples, "
                    f"{time.perf_counter() - t0:.0f} s"
                )
    return paths


def load_samples(paths: Sequence[str]) -> Dict[str, np.ndarray]:
    """Concatenate sample files (in the given order); ``case`` names each sample's case."""
    parts: Dict[str, List[np.ndarray]] = {"x": [], "s": [], "y": [], "case": []}
    for p in paths:
        if not os.path.exists(p):
            continue
        z = np.load(p)
        for k in ("x", "s", "y"):
            parts[k].append(z[k])
        case = json.loads(str(z["meta"]))["case"]
        parts["case"].append(np.array([case] * len(z["y"])))
    return {k: np.concatenate(v) for k, v in parts.items()}


def case_balanced_weights(cases: np.ndarray) -> np.ndarray:
    """Sampling weight of each sample: every case gets a share proportional to the square root
    of its sample count (a large case does not drown the small ones, a small one is not
    repeated until it is learned by heart)."""
    names, inverse, counts = np.unique(cases, return_inverse=True, return_counts=True)
    share = np.sqrt(counts) / np.sqrt(counts).sum()
    return (share / counts)[inverse]
