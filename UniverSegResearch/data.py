"""Training and evaluation data: fetch labeled volumes, split them, and write 128x128 slice stacks.

Sources (fetched at run time into a cache folder; nothing here is committed):

* ``slicerio`` -- the chest CT + ``Segmentation.seg.nrrd`` bundled with the installed slicerio
  package. It is the demo sample, so it is **never** used for training: it is written only to
  ``eval/`` as the *unseen* case.
* ``totalsegmentator`` -- the sdist of TotalSegmentator 2.18.0, ``tests/reference_files``:
  abdomen CT + labels (task ``total``), CT DICOM series + labels (task ``total``, stored with a
  flipped axis, so it is resampled onto the image through physical space), abdomen MR + labels
  (task ``total_mr``). Labels are that model's outputs, decoded with its class map (parsed as text).
* ``mricron`` -- Debian ``mricron-data``: Colin27 T1 (``ch2``) with the ``aal`` and ``brodmann``
  label maps on the same grid.
* ``nilearn`` -- the nilearn wheel: MNI152 2009 T1 with grey/white matter from its probability maps.
* ``itk_examples`` -- Debian ``insighttoolkit5-examples`` (Apache-2.0): the examples' brain T1 with
  a brain mask (its skull-strip labels), the head, and k-means grey / white matter in the brain.

Split (:func:`split_aal`, :data:`CASES`): validation = the whole TotalSegmentator MR case plus the
held-out AAL regions (every 4th AAL region, both hemispheres; zeroed out of the training AAL map).
Everything else trains. Structures under :data:`MIN_VOXELS` voxels are dropped.

Output (``prepare``), per case and axis: ``train|val/<case>__<axis>.npz`` holding ``image``
(uint8 N x 128 x 128, canonical slice frame, intensities windowed once per volume), ``labels``
(uint16, same canvas, nearest neighbour, contiguous ids), ``names`` (``names[i-1]`` names id i),
``spacing`` (slice/row/col mm) and ``source``; ``manifest.json``; and ``eval/<case>/image.nrrd`` +
``eval/<case>/masks/<structure>.nrrd`` (full-resolution binary masks on the image grid) with
``eval/manifest.json``.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from UniverSegLogic.core.canvas import Canvas, intensity_window, scale_intensity
from UniverSegLogic.core.geometry import SliceFrame, Volume
from UniverSegLogic.core.io import InputError
from UniverSegLogic.sample import slicerio_data_dir

AXES: Tuple[str, ...] = ("axial", "coronal", "sagittal")
#: Structures with fewer voxels than this (on their native grid) are dropped.
MIN_VOXELS = 50
#: Every AAL_HOLDOUT_EVERY-th AAL region (counting from 1, both hemispheres) is held out.
AAL_HOLDOUT_EVERY = 4
#: Evaluation masks must cover at least this many slices along array axis 0.
EVAL_MIN_SLICES = 6
#: At most this many evaluation structures per validation case (the largest ones).
EVAL_MAX_STRUCTURES = 12
#: Probability (of 1) above which MNI152 voxels count as grey or white matter.
TISSUE_THRESHOLD = 0.5

TOTALSEG_VERSION = "2.18.0"
NILEARN_VERSION = "0.14.1"
_TS_ROOT = f"totalsegmentator-{TOTALSEG_VERSION}"
_TS_FILES = {
    "class_map": "totalsegmentator/map_to_binary.py",
    "ct": "tests/reference_files/example_ct_sm.nii.gz",
    "ct_seg": "tests/reference_files/example_seg.nii.gz",
    "dicom": "tests/reference_files/example_ct_dicom/",
    "dicom_seg": "tests/reference_files/example_seg_dicom.nii.gz",
    "mr": "tests/reference_files/example_mr_sm.nii.gz",
    "mr_seg": "tests/reference_files/example_seg_mr.nii.gz",
}
_NILEARN_FILES = {
    "t1": "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_MRICRON_DIR = "usr/share/mricron/templates"
_ITK_DATA_DIR = "usr/share/doc/insighttoolkit5-examples/examples/Data"
_ITK_FILES = {
    "t1": "KmeansTest_T1UCharRaw.nii.gz",
    "kmeans": "KmeansTest_T1KmeansPrelimSegmentation.nii.gz",
    "skullstrip": "KmeansTest_T1RawSkullStrip.nii.gz",
}


class DataError(InputError):
    """Data that cannot be fetched or prepared (offline, missing tool, unexpected content)."""


# --------------------------------------------------------------------------------------------
# Cases and the split
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseSpec:
    """One labeled volume to prepare: its name, where it comes from and what it is used for."""

    name: str
    source: str  # key of the fetcher: slicerio, totalsegmentator, mricron, nilearn
    role: str  # "train", "val" or "unseen" (evaluation only, never in train/ or val/)
    description: str


#: Every case ``prepare`` writes, with its role. The slicerio chest CT is the demo sample: unseen.
CASES: Tuple[CaseSpec, ...] = (
    CaseSpec(
        "ts_ct_abdomen",
        "totalsegmentator",
        "train",
        "TotalSegmentator test abdomen CT (example_ct_sm) + labels of task 'total'",
    ),
    CaseSpec(
        "ts_ct_dicom",
        "totalsegmentator",
        "train",
        "TotalSegmentator test CT DICOM series + labels of task 'total' (--fast)",
    ),
    CaseSpec(
        "ts_mr_abdomen",
        "totalsegmentator",
        "val",
        "TotalSegmentator test abdomen MR (example_mr_sm) + labels of task 'total_mr'",
    ),
    CaseSpec(
        "colin27_aal",
        "mricron",
        "train",
        "Colin27 T1 (ch2) + AAL regions, held-out regions removed",
    ),
    CaseSpec(
        "colin27_aal_heldout", "mricron", "val", "Colin27 T1 (ch2) + the held-out AAL regions only"
    ),
    CaseSpec("colin27_brodmann", "mricron", "train", "Colin27 T1 (ch2) + Brodmann areas"),
    CaseSpec(
        "mni152_gmwm",
        "nilearn",
        "train",
        "MNI152 2009c T1 + grey/white matter (probability >= 50%, white wins ties)",
    ),
    CaseSpec(
        "itk_brain_t1",
        "itk_examples",
        "train",
        "ITK examples' brain T1 (KmeansTest_T1UCharRaw) + brain mask, head, k-means grey and "
        "white matter inside the brain",
    ),
    CaseSpec(
        "slicerio_chest_ct",
        "slicerio",
        "unseen",
        "slicerio's bundled chest CT + Segmentation.seg.nrrd (demo sample; never trained on)",
    ),
)


def case_spec(name: str) -> CaseSpec:
    """The :class:`CaseSpec` called ``name``."""
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(name)


def check_role(spec: CaseSpec, split: str) -> None:
    """Refuse to write ``spec`` into ``split`` (train/val) unless that is its role."""
    if spec.source == "slicerio" and split in ("train", "val"):
        raise DataError(f"{spec.name}: the slicerio demo sample is never used for {split}")
    if spec.role != split:
        raise DataError(f"{spec.name} has role {spec.role!r}, not {split!r}")


def aal_region(name: str) -> str:
    """AAL region of a label name: the name without its hemisphere suffix (``_L``/``_R``)."""
    return re.sub(r"_[LR]$", "", name)


def heldout_aal_ids(names_by_id: Dict[int, str], every: int = AAL_HOLDOUT_EVERY) -> List[int]:
    """AAL label ids held out for validation.

    Regions (names without ``_L``/``_R``) are ordered by their smallest label id; every
    ``every``-th region (the 4th, 8th, ... with the default) is held out with both hemispheres, so
    that no mirror image of a validation structure is trained on.
    """
    first: Dict[str, int] = {}
    for i in sorted(names_by_id):
        first.setdefault(aal_region(names_by_id[i]), i)
    regions = sorted(first, key=first.get)
    held = {r for n, r in enumerate(regions, start=1) if n % every == 0}
    return sorted(i for i, name in names_by_id.items() if aal_region(name) in held)


def split_aal(
    labels: np.ndarray, names_by_id: Dict[int, str], every: int = AAL_HOLDOUT_EVERY
) -> Tuple[Dict[int, str], Dict[int, str], np.ndarray, np.ndarray]:
    """Split an AAL label map into training and held-out parts.

    Returns ``(train_names, val_names, train_labels, val_labels)``: each label array keeps only its
    own ids (the others are zeroed) and each names dict maps its ids to names.
    """
    held = set(heldout_aal_ids(names_by_id, every))
    val_names = {i: n for i, n in names_by_id.items() if i in held}
    train_names = {i: n for i, n in names_by_id.items() if i not in held}
    is_held = np.isin(labels, sorted(held))
    return (train_names, val_names, np.where(is_held, 0, labels), np.where(is_held, labels, 0))


def relabel(
    labels: np.ndarray, names_by_id: Dict[int, str], min_voxels: int = MIN_VOXELS
) -> Tuple[np.ndarray, List[str], List[str]]:
    """Renumber the named structures present with ``>= min_voxels`` voxels as 1..M (uint16).

    Returns ``(labels, names, dropped)``: ``names[i-1]`` names the new id i (in the order of the old
    ids); ``dropped`` names the structures removed for being too small. Ids without a name are an
    error; voxels of dropped or unnamed-but-absent ids become 0.
    """
    labels = np.asarray(labels)
    if labels.size and labels.min() < 0:
        raise DataError("negative label ids")
    counts = np.bincount(labels.reshape(-1).astype(np.int64))
    present = [i for i in np.nonzero(counts)[0].tolist() if i != 0]
    unknown = [i for i in present if i not in names_by_id]
    if unknown:
        raise DataError(f"label ids without a name: {unknown[:10]}")
    lut = np.zeros(len(counts), dtype=np.uint16)
    names: List[str] = []
    dropped: List[str] = []
    for i in present:
        if counts[i] < min_voxels:
            dropped.append(names_by_id[i])
            continue
        names.append(names_by_id[i])
        lut[i] = len(names)
    return lut[labels.astype(np.int64)], names, dropped


# --------------------------------------------------------------------------------------------
# Parsing label names
# --------------------------------------------------------------------------------------------


def parse_class_map(text: str, variable: str = "class_map") -> Dict[str, Dict[int, str]]:
    """Parse TotalSegmentator's ``map_to_binary.py`` text: ``{task: {label id: name}}``.

    The module is never imported or executed: the top-level assignment ``variable = {...}`` is
    found in its syntax tree and evaluated as a literal.
    """
    try:
        tree = ast.parse(text)
    except SyntaxError as exc:
        raise DataError(f"cannot parse the class map: {exc}") from None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == variable for t in node.targets
        ):
            try:
                value = ast.literal_eval(node.value)
            except ValueError as exc:
                raise DataError(f"{variable} is not a literal: {exc}") from None
            if not isinstance(value, dict) or not all(
                isinstance(v, dict)
                and all(isinstance(k, int) and isinstance(n, str) for k, n in v.items())
                for v in value.values()
            ):
                raise DataError(f"{variable} is not a dict of {{int: str}} dicts")
            return {str(task): dict(m) for task, m in value.items()}
    raise DataError(f"no top-level assignment to {variable!r} in the class map")


def parse_aal_names(text: str) -> Dict[int, str]:
    """Parse mricron's ``aal.nii.txt`` (``<id> <name> [<code>]`` per line) into {id: name}."""
    out: Dict[int, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            out[int(parts[0])] = parts[1]
    if not out:
        raise DataError("no AAL label names found")
    return out


def tissue_labels(
    gm: np.ndarray, wm: np.ndarray, threshold: float = TISSUE_THRESHOLD, scale: float = 255.0
) -> np.ndarray:
    """Grey matter = 1, white matter = 2 from probability maps stored as ``p * scale``.

    A voxel is a tissue when its probability is at least ``threshold``; white matter wins ties.
    """
    g = np.asarray(gm, dtype=np.float32) / scale
    w = np.asarray(wm, dtype=np.float32) / scale
    out = np.zeros(g.shape, dtype=np.uint16)
    out[(g >= threshold) & (g > w)] = 1
    out[(w >= threshold) & (w >= g)] = 2
    return out


# --------------------------------------------------------------------------------------------
# Slice stacks on the 128x128 canvas
# --------------------------------------------------------------------------------------------


def volume_to_npz_arrays(
    volume: Volume, labels_kji: np.ndarray, names: Sequence[str], axis: str, source: str = ""
) -> Dict[str, np.ndarray]:
    """The arrays of one ``<case>__<axis>.npz`` file.

    ``labels_kji`` holds ids 0..len(names) on the grid of ``volume``. The image is windowed once
    for the whole volume, viewed in the canonical slice frame of ``axis``, fitted to the canvas
    (physical aspect kept) and stored as uint8 (x255, rounded).
    """
    labels_kji = np.asarray(labels_kji)
    if labels_kji.shape != volume.array.shape:
        raise DataError(f"labels {labels_kji.shape} do not match the image {volume.array.shape}")
    if labels_kji.size and int(labels_kji.max()) > len(names):
        raise DataError(f"label id {int(labels_kji.max())} has no name ({len(names)} names)")
    frame = SliceFrame.of(volume, axis)
    scaled = scale_intensity(volume.array, intensity_window(volume.array))
    image = np.ascontiguousarray(frame.to_frame(scaled))
    canvas = Canvas.for_slices(image.shape[1], image.shape[2], frame.spacing[1], frame.spacing[2])
    with torch.no_grad():
        img = canvas.to_canvas(torch.from_numpy(image), mode="bilinear")[:, 0].numpy()
    return {
        "image": np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8),
        "labels": canvas.label_ids_to_canvas(frame.to_frame(labels_kji)),
        "names": np.array(list(names), dtype=str),
        "spacing": np.array(frame.spacing, dtype=np.float32),
        "source": np.array(source, dtype=str),
    }


def canvas_inner(volume: Volume, axis: str) -> Tuple[int, int]:
    """Rows and columns that a slice of ``volume`` along ``axis`` fills on the canvas."""
    frame = SliceFrame.of(volume, axis)
    shape = frame.to_frame(np.empty(volume.array.shape, dtype=bool)).shape
    return Canvas.for_slices(shape[1], shape[2], frame.spacing[1], frame.spacing[2]).inner


# --------------------------------------------------------------------------------------------
# Fetching (cached)
# --------------------------------------------------------------------------------------------


def _run(cmd: List[str], what: str, cwd: Optional[str] = None, timeout: int = 900) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise DataError(f"cannot {what}: {cmd[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise DataError(f"cannot {what}: timed out after {timeout} s (offline?)") from None
    if proc.returncode != 0:
        err = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        marked = [ln for ln in err if ln.startswith(("ERROR", "E:"))]
        lines = marked or err or [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
        reason = lines[0] if marked else (lines[-1] if lines else f"exit code {proc.returncode}")
        raise DataError(f"cannot {what} (offline?): {reason}")


def _pip_download(spec: str, pattern: str, cache: str, sdist: bool) -> str:
    found = sorted(glob.glob(os.path.join(cache, pattern)))
    if found:
        return found[-1]
    os.makedirs(cache, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
        cache,
        spec,
    ]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    _run(cmd, f"download {spec}")
    found = sorted(glob.glob(os.path.join(cache, pattern)))
    if not found:
        raise DataError(f"pip download of {spec} left no {pattern} in {cache}")
    return found[-1]


def _extract_members(archive: str, root: str, members: Iterable[str], dest: str) -> None:
    """Copy ``root/member`` files (a member ending in / is a folder) out of a tar.gz or zip."""
    wanted = [f"{root}/{m}" if root else m for m in members]

    def keep(name: str) -> bool:
        return any(name == w or (w.endswith("/") and name.startswith(w)) for w in wanted)

    def target(name: str) -> str:
        rel = name[len(root) + 1 :] if root else name
        path = os.path.normpath(os.path.join(dest, rel))
        if not path.startswith(os.path.normpath(dest) + os.sep):
            raise DataError(f"unsafe path in {archive}: {name}")
        return path

    tmp = tempfile.mkdtemp(prefix=".partial-", dir=os.path.dirname(os.path.abspath(dest)))
    try:
        written = 0
        if archive.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    if not info.is_dir() and keep(info.filename):
                        path = target(info.filename).replace(os.path.normpath(dest), tmp, 1)
                        os.makedirs(os.path.dirname(path), exist_ok=True)
                        with z.open(info) as src, open(path, "wb") as out:
                            shutil.copyfileobj(src, out)
                        written += 1
        else:
            with tarfile.open(archive, "r:*") as t:
                for info in t:
                    if info.isfile() and keep(info.name):
                        path = target(info.name).replace(os.path.normpath(dest), tmp, 1)
                        os.makedirs(os.path.dirname(path), exist_ok=True)
                        with t.extractfile(info) as src, open(path, "wb") as out:
                            shutil.copyfileobj(src, out)
                        written += 1
        missing = [
            w
            for w in wanted
            if not w.endswith("/")
            and not os.path.exists(target(w).replace(os.path.normpath(dest), tmp, 1))
        ]
        if missing or not written:
            raise DataError(
                f"{os.path.basename(archive)} lacks {', '.join(missing) or 'the files'}"
            )
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def fetch_totalsegmentator(cache: str) -> str:
    """Folder holding the used TotalSegmentator sdist files (downloaded once into ``cache``)."""
    dest = os.path.join(cache, f"totalsegmentator-{TOTALSEG_VERSION}")
    if not os.path.exists(os.path.join(dest, _TS_FILES["mr_seg"])):
        sdist = _pip_download(
            f"totalsegmentator=={TOTALSEG_VERSION}",
            f"totalsegmentator-{TOTALSEG_VERSION}.tar.gz",
            cache,
            sdist=True,
        )
        _extract_members(sdist, _TS_ROOT, _TS_FILES.values(), dest)
    return dest


def fetch_nilearn(cache: str) -> str:
    """Folder holding the MNI152 files of the nilearn wheel (downloaded once into ``cache``)."""
    dest = os.path.join(cache, f"nilearn-{NILEARN_VERSION}")
    if not os.path.exists(os.path.join(dest, _NILEARN_FILES["wm"])):
        wheel = _pip_download(
            f"nilearn=={NILEARN_VERSION}", f"nilearn-{NILEARN_VERSION}-*.whl", cache, sdist=False
        )
        _extract_members(wheel, "", _NILEARN_FILES.values(), dest)
    return dest


def _fetch_deb(package: str, cache: str, dest_name: str, check: str) -> str:
    """``cache/dest_name``: the Debian package ``package`` unpacked (``apt-get download`` +
    ``dpkg -x``, once; a .deb already in ``cache`` is reused); ``check`` (a path inside it) must
    exist afterwards."""
    dest = os.path.join(cache, dest_name)
    if os.path.exists(os.path.join(dest, check)):
        return dest
    os.makedirs(cache, exist_ok=True)
    debs = sorted(glob.glob(os.path.join(cache, f"{package}_*.deb")))
    if not debs:
        tmp = tempfile.mkdtemp(prefix=f"{package}-")
        try:
            try:
                _run(["apt-get", "download", package], f"download {package}", cwd=tmp)
            except DataError:
                _run(["apt-get", "update"], "update the apt package lists")
                _run(["apt-get", "download", package], f"download {package}", cwd=tmp)
            got = glob.glob(os.path.join(tmp, f"{package}_*.deb"))
            if not got:
                raise DataError(f"apt-get download {package} left no .deb file")
            shutil.move(got[0], os.path.join(cache, os.path.basename(got[0])))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        debs = sorted(glob.glob(os.path.join(cache, f"{package}_*.deb")))
    tmp = tempfile.mkdtemp(prefix=".partial-", dir=cache)
    try:
        _run(["dpkg", "-x", debs[-1], tmp], f"unpack {os.path.basename(debs[-1])}")
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.exists(os.path.join(dest, check)):
        raise DataError(f"{os.path.basename(debs[-1])} has no {check}")
    return dest


def fetch_mricron(cache: str) -> str:
    """Folder of mricron-data's templates (``apt-get download`` + ``dpkg -x``, once)."""
    dest = _fetch_deb(
        "mricron-data", cache, "mricron-data", os.path.join(_MRICRON_DIR, "aal.nii.txt")
    )
    return os.path.join(dest, _MRICRON_DIR)


def fetch_itk_examples(cache: str) -> str:
    """Folder of the ITK examples' data files (Debian ``insighttoolkit5-examples``, once)."""
    dest = _fetch_deb(
        "insighttoolkit5-examples",
        cache,
        "insighttoolkit5-examples",
        os.path.join(_ITK_DATA_DIR, _ITK_FILES["t1"]),
    )
    return os.path.join(dest, _ITK_DATA_DIR)


# --------------------------------------------------------------------------------------------
# Loading cases
# --------------------------------------------------------------------------------------------


@dataclass
class LabeledCase:
    """A case to write: image, contiguous label ids on its grid, the reference SimpleITK image."""

    spec: CaseSpec
    volume: Volume
    labels: np.ndarray  # uint16 KJI, ids 1..len(names)
    names: List[str]
    reference: object  # SimpleITK image the volume was read from (geometry for eval/)
    source: str  # where the files came from, for the npz ``source`` field
    dropped: List[str] = field(default_factory=list)
    masks: Optional[Dict[str, np.ndarray]] = None  # overlapping segments (else from ``labels``)

    def structure_masks(self) -> Dict[str, np.ndarray]:
        """Boolean KJI mask of every structure, by name."""
        if self.masks is not None:
            return self.masks
        return {n: self.labels == i for i, n in enumerate(self.names, start=1)}


def _read_sitk(path: str):
    import SimpleITK as sitk

    try:
        return sitk.ReadImage(path)
    except RuntimeError as exc:
        raise DataError(f"cannot read {path}: {str(exc).strip().splitlines()[-1]}") from None


def _volume(image) -> Volume:
    import SimpleITK as sitk

    from UniverSegLogic.core.io import ijk_to_ras_from_sitk

    return Volume(sitk.GetArrayFromImage(image), ijk_to_ras_from_sitk(image))


def labels_on_grid(labels, reference) -> np.ndarray:
    """KJI label ids of SimpleITK image ``labels`` on the grid of ``reference`` (physical space,
    nearest neighbour; a copy when the grids already agree)."""
    import SimpleITK as sitk

    same = (
        labels.GetSize() == reference.GetSize()
        and np.allclose(labels.GetSpacing(), reference.GetSpacing(), atol=1e-5)
        and np.allclose(labels.GetOrigin(), reference.GetOrigin(), atol=1e-4)
        and np.allclose(labels.GetDirection(), reference.GetDirection(), atol=1e-5)
    )
    if not same:
        labels = sitk.Resample(
            labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID()
        )
    return sitk.GetArrayFromImage(labels).astype(np.int64)


def _make_case(
    name: str, image, raw_labels: np.ndarray, names_by_id: Dict[int, str], source: str
) -> LabeledCase:
    labels, names, dropped = relabel(raw_labels, names_by_id)
    return LabeledCase(case_spec(name), _volume(image), labels, names, image, source, dropped)


def load_totalsegmentator(folder: str) -> List[LabeledCase]:
    """The three TotalSegmentator test cases (two CT for training, the MR for validation)."""
    import SimpleITK as sitk

    with open(os.path.join(folder, _TS_FILES["class_map"]), encoding="utf-8") as f:
        class_map = parse_class_map(f.read())
    for task in ("total", "total_mr"):
        if task not in class_map:
            raise DataError(f"the class map has no task {task!r}")
    src = f"TotalSegmentator {TOTALSEG_VERSION} sdist (Apache-2.0; data CC BY 4.0): "
    ct = _read_sitk(os.path.join(folder, _TS_FILES["ct"]))
    mr = _read_sitk(os.path.join(folder, _TS_FILES["mr"]))
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(os.path.join(folder, _TS_FILES["dicom"]))
    if not files:
        raise DataError(f"no DICOM series in {folder}/{_TS_FILES['dicom']}")
    reader.SetFileNames(files)
    dicom = reader.Execute()
    return [
        _make_case(
            "ts_ct_abdomen",
            ct,
            labels_on_grid(_read_sitk(os.path.join(folder, _TS_FILES["ct_seg"])), ct),
            class_map["total"],
            src + _TS_FILES["ct"] + " + " + _TS_FILES["ct_seg"],
        ),
        _make_case(
            "ts_ct_dicom",
            dicom,
            labels_on_grid(_read_sitk(os.path.join(folder, _TS_FILES["dicom_seg"])), dicom),
            class_map["total"],
            src + _TS_FILES["dicom"] + " + " + _TS_FILES["dicom_seg"],
        ),
        _make_case(
            "ts_mr_abdomen",
            mr,
            labels_on_grid(_read_sitk(os.path.join(folder, _TS_FILES["mr_seg"])), mr),
            class_map["total_mr"],
            src + _TS_FILES["mr"] + " + " + _TS_FILES["mr_seg"],
        ),
    ]


def load_mricron(templates: str) -> List[LabeledCase]:
    """Colin27 (ch2) with AAL (train part and held-out part) and Brodmann labels."""
    t1 = _read_sitk(os.path.join(templates, "ch2.nii.gz"))
    with open(os.path.join(templates, "aal.nii.txt"), encoding="utf-8") as f:
        aal_names = parse_aal_names(f.read())
    aal = labels_on_grid(_read_sitk(os.path.join(templates, "aal.nii.gz")), t1)
    brodmann = labels_on_grid(_read_sitk(os.path.join(templates, "brodmann.nii.gz")), t1)
    train_names, val_names, train_aal, val_aal = split_aal(aal, aal_names)
    ba_names = {int(i): f"Brodmann_area_{int(i)}" for i in np.unique(brodmann) if i != 0}
    src = "Debian mricron-data: templates/ch2.nii.gz + "
    return [
        _make_case(
            "colin27_aal", t1, train_aal, train_names, src + "aal.nii.gz (training regions)"
        ),
        _make_case(
            "colin27_aal_heldout", t1, val_aal, val_names, src + "aal.nii.gz (held-out regions)"
        ),
        _make_case("colin27_brodmann", t1, brodmann, ba_names, src + "brodmann.nii.gz"),
    ]


def load_nilearn(folder: str) -> List[LabeledCase]:
    """MNI152 2009c T1 with grey (1) and white (2) matter labels."""
    t1 = _read_sitk(os.path.join(folder, _NILEARN_FILES["t1"]))
    gm = labels_on_grid(_read_sitk(os.path.join(folder, _NILEARN_FILES["gm"])), t1)
    wm = labels_on_grid(_read_sitk(os.path.join(folder, _NILEARN_FILES["wm"])), t1)
    return [
        _make_case(
            "mni152_gmwm",
            t1,
            tissue_labels(gm, wm),
            {1: "grey_matter", 2: "white_matter"},
            f"nilearn {NILEARN_VERSION} wheel: MNI152 2009c T1 + GM/WM probability maps",
        )
    ]


def load_itk_examples(folder: str) -> List[LabeledCase]:
    """The ITK examples' brain T1 (128x128x62) with four structures from its label files: the
    brain (skull-strip labels), the head (k-means class other than the background class 1), and
    grey / white matter (k-means classes 5 / 6 inside the brain). Structures overlap (the head
    holds the brain), so each keeps its own mask; the npz label map holds grey matter, white
    matter, the rest of the brain and the rest of the head."""
    t1 = _read_sitk(os.path.join(folder, _ITK_FILES["t1"]))
    kmeans = labels_on_grid(_read_sitk(os.path.join(folder, _ITK_FILES["kmeans"])), t1)
    strip = labels_on_grid(_read_sitk(os.path.join(folder, _ITK_FILES["skullstrip"])), t1)
    brain = np.isin(strip, (5, 6))
    head = (kmeans != 1) & (kmeans != 0) | brain
    grey, white = brain & (kmeans == 5), brain & (kmeans == 6)
    labels = np.zeros(brain.shape, np.uint16)
    labels[head] = 4
    labels[brain] = 3
    labels[grey] = 1
    labels[white] = 2
    names = ["grey_matter", "white_matter", "brain_other", "head_other"]
    return [
        LabeledCase(
            case_spec("itk_brain_t1"),
            _volume(t1),
            labels,
            names,
            t1,
            "Debian insighttoolkit5-examples (Apache-2.0): examples/Data/"
            + " + ".join(_ITK_FILES.values()),
            masks={"brain": brain, "head": head, "grey_matter": grey, "white_matter": white},
        )
    ]


def load_slicerio(folder: str) -> List[LabeledCase]:
    """slicerio's chest CT with its 7 segments (the unseen demo sample; evaluation only)."""
    from UniverSegLogic.core.io import read_segmentation

    path = os.path.join(folder, "CTChest4.nrrd")
    image = _read_sitk(path)
    volume = _volume(image)
    seg = read_segmentation(os.path.join(folder, "Segmentation.seg.nrrd"), volume)
    labels = np.zeros(volume.array.shape, dtype=np.uint16)
    for i, s in enumerate(seg.segments, start=1):  # segments may overlap: keep each one's mask
        labels[s.mask & (labels == 0)] = i
    return [
        LabeledCase(
            case_spec("slicerio_chest_ct"),
            volume,
            labels,
            seg.names(),
            image,
            "slicerio package data: CTChest4.nrrd + Segmentation.seg.nrrd (MIT)",
            masks={s.name: np.asarray(s.mask, dtype=bool) for s in seg.segments},
        )
    ]


#: source name -> (fetch into cache -> folder, load folder -> cases)
SOURCES: Dict[str, Tuple[Callable[[str], str], Callable[[str], List[LabeledCase]]]] = {
    "slicerio": (lambda cache: slicerio_data_dir(), load_slicerio),
    "totalsegmentator": (fetch_totalsegmentator, load_totalsegmentator),
    "mricron": (fetch_mricron, load_mricron),
    "nilearn": (fetch_nilearn, load_nilearn),
    "itk_examples": (fetch_itk_examples, load_itk_examples),
}


# --------------------------------------------------------------------------------------------
# Evaluation masks
# --------------------------------------------------------------------------------------------


def slices_spanned(mask: np.ndarray) -> int:
    """Number of slices along array axis 0 that hold part of ``mask``."""
    return int(np.count_nonzero(np.asarray(mask).reshape(mask.shape[0], -1).any(axis=1)))


def choose_eval_structures(
    masks: Dict[str, np.ndarray],
    min_slices: int = EVAL_MIN_SLICES,
    limit: Optional[int] = EVAL_MAX_STRUCTURES,
) -> List[str]:
    """Names of the structures to evaluate: those spanning ``>= min_slices`` slices along axis 0,
    the ``limit`` largest (ties by name), in decreasing size."""
    ok = [
        (int(np.count_nonzero(m)), n) for n, m in masks.items() if slices_spanned(m) >= min_slices
    ]
    ok.sort(key=lambda t: (-t[0], t[1]))
    return [n for _, n in (ok if limit is None else ok[:limit])]


def safe_filename(name: str) -> str:
    """A file name for structure ``name`` (letters, digits, ``._-``; others become ``_``)."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return out or "structure"


def _write_nrrd(array: np.ndarray, reference, path: str) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.CopyInformation(reference)
    sitk.WriteImage(img, path, True)


def write_eval_case(
    case: LabeledCase,
    folder: str,
    structures: Optional[Sequence[str]] = None,
    limit: Optional[int] = EVAL_MAX_STRUCTURES,
) -> Dict[str, object]:
    """Write ``folder/<case>/image.nrrd`` and its masks; return the case's eval manifest entry."""
    import SimpleITK as sitk

    masks = case.structure_masks()
    chosen = (
        list(structures) if structures is not None else choose_eval_structures(masks, limit=limit)
    )
    root = os.path.join(folder, case.spec.name)
    os.makedirs(os.path.join(root, "masks"), exist_ok=True)
    sitk.WriteImage(case.reference, os.path.join(root, "image.nrrd"), True)
    entries, used = [], set()
    for name in chosen:
        fname = safe_filename(name)
        while fname in used:
            fname += "_"
        used.add(fname)
        rel = f"{case.spec.name}/masks/{fname}.nrrd"
        mask = masks[name]
        _write_nrrd(mask.astype(np.uint8), case.reference, os.path.join(folder, rel))
        entries.append(
            {
                "name": name,
                "mask": rel,
                "voxels": int(np.count_nonzero(mask)),
                "slices_axis0": slices_spanned(mask),
            }
        )
    return {
        "case": case.spec.name,
        "role": case.spec.role,
        "source": case.source,
        "image": f"{case.spec.name}/image.nrrd",
        "shape_kji": list(case.volume.array.shape),
        "spacing_kji": [round(float(s), 6) for s in case.volume.spacing_kji],
        "structures": entries,
    }


# --------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------


@dataclass
class FileRow:
    """One written npz file, for the manifest and the summary table."""

    file: str
    case: str
    axis: str
    split: str
    slices: int
    inner: Tuple[int, int]
    structures: List[str]
    source: str
    bytes: int


def write_case_npz(case: LabeledCase, split: str, out: str) -> List[FileRow]:
    """Write ``out/<split>/<case>__<axis>.npz`` for every axis; refuse a case of another role."""
    check_role(case.spec, split)
    folder = os.path.join(out, split)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for axis in AXES:
        arrays = volume_to_npz_arrays(case.volume, case.labels, case.names, axis, case.source)
        rel = f"{split}/{case.spec.name}__{axis}.npz"
        path = os.path.join(out, rel)
        np.savez_compressed(path, **arrays)
        rows.append(
            FileRow(
                rel,
                case.spec.name,
                axis,
                split,
                int(arrays["image"].shape[0]),
                canvas_inner(case.volume, axis),
                list(case.names),
                case.source,
                os.path.getsize(path),
            )
        )
    return rows


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


@dataclass
class Summary:
    """What ``prepare`` wrote."""

    out: str
    files: List[FileRow]
    eval_cases: List[Dict[str, object]]
    heldout_aal: List[str]
    total_bytes: int
    dropped: Dict[str, List[str]]

    def table(self) -> str:
        """A plain-text table: one row per case, then totals."""
        lines = [f"{'case':<22} {'split':<6} {'structs':>7} {'slices ax/co/sa':>16} {'MB':>6}"]
        cases: Dict[str, List[FileRow]] = {}
        for r in self.files:
            cases.setdefault(r.case, []).append(r)
        for name, rows in cases.items():
            sl = "/".join(str(r.slices) for r in rows)
            mb = sum(r.bytes for r in rows) / 1e6
            lines.append(
                f"{name:<22} {rows[0].split:<6} {len(rows[0].structures):>7} {sl:>16} {mb:>6.2f}"
            )
        for e in self.eval_cases:
            mb = _folder_bytes(os.path.join(self.out, "eval", str(e["case"]))) / 1e6
            lines.append(
                f"{'eval/' + str(e['case']):<22} {str(e['role']):<6} "
                f"{len(e['structures']):>7} {'':>16} {mb:>6.2f}"
            )
        n_train = sum(len(r[0].structures) for r in cases.values() if r[0].split == "train")
        n_val = sum(len(r[0].structures) for r in cases.values() if r[0].split == "val")
        lines.append(
            f"train structures: {n_train}, val structures: {n_val}, "
            f"eval structures: {sum(len(e['structures']) for e in self.eval_cases)}, "
            f"total size: {self.total_bytes / 1e6:.1f} MB in {self.out}"
        )
        return "\n".join(lines)


def source_versions(cache: str, sources: Sequence[str]) -> Dict[str, str]:
    """Which release of each source was used (for the manifest)."""
    out = {}
    for s in sources:
        if s == "totalsegmentator":
            out[s] = f"totalsegmentator=={TOTALSEG_VERSION} (sdist)"
        elif s == "nilearn":
            out[s] = f"nilearn=={NILEARN_VERSION} (wheel)"
        elif s in ("mricron", "itk_examples"):
            package = {"mricron": "mricron-data", "itk_examples": "insighttoolkit5-examples"}[s]
            debs = sorted(glob.glob(os.path.join(cache, f"{package}_*.deb")))
            out[s] = os.path.basename(debs[-1]) if debs else f"{package} (unpacked earlier)"
        elif s == "slicerio":
            from importlib import metadata

            try:
                out[s] = f"slicerio=={metadata.version('slicerio')}"
            except metadata.PackageNotFoundError:
                out[s] = "slicerio"
    return out


def _check_out(out: str) -> None:
    if os.path.exists(out) and (
        not os.path.isdir(out)
        or (os.listdir(out) and not os.path.exists(os.path.join(out, "manifest.json")))
    ):
        raise DataError(f"{out} exists and is not a prepared-data folder: refusing to replace it")


def prepare(
    out: str,
    cache: str,
    sources: Sequence[str] = tuple(SOURCES),
    log: Callable[[str], None] = print,
) -> Summary:
    """Fetch ``sources`` into ``cache``; (re)write the prepared-data folder ``out`` atomically."""
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise DataError(f"unknown sources: {', '.join(unknown)}")
    out = os.path.abspath(out)
    _check_out(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    os.makedirs(cache, exist_ok=True)
    folders = {}
    for s in sources:  # fetch everything first, so that an offline run fails early
        log(f"fetching {s} ...")
        folders[s] = SOURCES[s][0](cache)
    tmp = tempfile.mkdtemp(prefix=".partial-", dir=parent)
    try:
        files: List[FileRow] = []
        eval_cases: List[Dict[str, object]] = []
        dropped: Dict[str, List[str]] = {}
        heldout: List[str] = []
        for s in sources:
            for case in SOURCES[s][1](folders[s]):
                log(f"  {case.spec.name}: {len(case.names)} structures")
                if case.dropped:
                    dropped[case.spec.name] = case.dropped
                if case.spec.name == "colin27_aal_heldout":
                    heldout = list(case.names)
                if case.spec.role in ("train", "val"):
                    files += write_case_npz(case, case.spec.role, tmp)
                if case.spec.role in ("val", "unseen"):
                    limit = None if case.spec.role == "unseen" else EVAL_MAX_STRUCTURES
                    chosen = choose_eval_structures(case.structure_masks(), EVAL_MIN_SLICES, limit)
                    eval_cases.append(write_eval_case(case, os.path.join(tmp, "eval"), chosen))
        manifest = {
            "format": "UniverSeg-Slicer prepared data v1",
            "canvas": 128,
            "axes": list(AXES),
            "min_voxels": MIN_VOXELS,
            "rules": {
                "val_cases": [c.name for c in CASES if c.role == "val"],
                "unseen_cases": [c.name for c in CASES if c.role == "unseen"],
                "aal_heldout_rule": f"AAL regions (names without _L/_R) ordered by smallest label "
                f"id; every {AAL_HOLDOUT_EVERY}th region (both hemispheres) is "
                f"held out: zeroed in train, only these in val",
                "aal_heldout": heldout,
                "slicerio_chest_ct": "demo sample: never in train/ or val/, only in eval/",
                "eval": f"val structures spanning >= {EVAL_MIN_SLICES} slices along array axis 0, "
                f"the {EVAL_MAX_STRUCTURES} largest per validation case (no cap for the "
                f"unseen case)",
            },
            "versions": source_versions(cache, sources),
            "cases": [
                {"case": c.name, "source": c.source, "role": c.role, "description": c.description}
                for c in CASES
                if c.source in sources
            ],
            "dropped_small_structures": dropped,
            "files": [
                {
                    "file": r.file,
                    "case": r.case,
                    "axis": r.axis,
                    "split": r.split,
                    "slices": r.slices,
                    "canvas_inner": list(r.inner),
                    "structures": r.structures,
                    "source": r.source,
                }
                for r in files
            ],
        }
        if eval_cases:
            with open(os.path.join(tmp, "eval", "manifest.json"), "w", encoding="utf-8") as f:
                json.dump({"cases": eval_cases}, f, indent=1)
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        old = None
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.replace(out, os.path.join(old, "prepared"))
        os.replace(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return Summary(out, files, eval_cases, heldout, _folder_bytes(out), dropped)
