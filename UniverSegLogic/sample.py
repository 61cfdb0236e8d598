"""The labeled sample that ships inside the ``slicerio`` package: a chest CT (128x128x34,
3x3x10 mm) and its 7-segment segmentation. One home for finding it, shared by the demo, the
browser app's ``--sample`` session, the synthetic cohorts and the benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

from .errors import UsageError

#: The segment and the number of painted axial slices the demo and the browser sample start from.
DEFAULT_SEGMENT = "right lung"
DEFAULT_K = 3


def slicerio_data_dir() -> str:
    """The ``data`` folder of the installed slicerio package (raises UsageError without it)."""
    import slicerio

    folder = Path(slicerio.__file__).resolve().parent / "data"
    if not (folder / "CTChest4.nrrd").is_file():
        raise UsageError(f"the sample data is missing from the slicerio package ({folder})")
    return str(folder)


def sample_paths() -> Tuple[Path, Path]:
    """Paths of slicerio's bundled chest CT and its segmentation."""
    data = Path(slicerio_data_dir())
    image, seg = data / "CTChest4.nrrd", data / "Segmentation.seg.nrrd"
    if not seg.is_file():
        raise UsageError(f"the sample data is missing from the slicerio package ({data})")
    return image, seg
