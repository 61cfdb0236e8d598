"""``universeg-slicer web``: the browser annotation app: paint, propagate and save in a web page.

The app is ``UniverSegLogic.web`` (trame-slicer).

Serves one page on 127.0.0.1 by default: a slice view with Slicer's own Paint / Erase / Scissors
and undo, Propagate (UniverSeg through the MRML bridge), the labeled / predicted / corrected slices
of every segment, Save and Download. The page needs the access token printed at start, and only
the page's own origin may talk to the server (SECURITY.md). ``--out`` is checked before the
server starts. Needs ``pip install ".[web]"`` (in a checkout of this repository).
"""

from __future__ import annotations

from ..core.slices import AXIS_AUTO
from ..errors import UsageError
from . import plain
from .propagate import add_device_option


def register(sub) -> None:
    from ..web.uploads import DEFAULT_MAX_IMAGE_MB, DEFAULT_MAX_UPLOAD_MB, DEFAULT_MAX_VOXELS

    p = sub.add_parser(
        "web",
        help="serve the browser annotation app (paint, propagate, save)",
        description=plain(__doc__.splitlines()[0]),
    )
    p.add_argument("--image", help="volume to open (.nrrd, .nii, .nii.gz, .mha)")
    p.add_argument("--labels", help="segmentation to open on it (.seg.nrrd)")
    p.add_argument(
        "--sample",
        action="store_true",
        help="open slicerio's chest CT with 3 painted axial slices of 'right lung' "
        "(instead of --image/--labels)",
    )
    p.add_argument(
        "--out",
        help="where Save writes the .seg.nrrd (checked at start; Download works with or without)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (0: a free one, printed)")
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host other than loopback (the page is then reachable from other "
        "machines: a warning is printed; the access token is required as always)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_MB,
        help=f"largest file the page may upload, MiB ({DEFAULT_MAX_UPLOAD_MB})",
    )
    p.add_argument(
        "--max-image-mb",
        type=float,
        default=DEFAULT_MAX_IMAGE_MB,
        help="largest image the page may open, MiB of voxel data once decompressed (read from "
        f"the file's header before anything is decompressed; {DEFAULT_MAX_IMAGE_MB})",
    )
    p.add_argument(
        "--max-voxels",
        type=int,
        default=DEFAULT_MAX_VOXELS,
        help=f"most voxels an uploaded image may have ({DEFAULT_MAX_VOXELS}: 512x512x2048)",
    )
    p.add_argument(
        "--weights", default="starter", help="starter (default), official, or a weights file"
    )
    add_device_option(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a port number")
    from ..web.uploads import UploadLimits

    UploadLimits.from_options(args.max_upload_mb, args.max_image_mb, args.max_voxels)
    if args.labels and not args.image:
        raise UsageError("--labels needs --image")
    if args.sample and args.image:
        raise UsageError("--sample replaces --image and --labels: give one or the other")
    from ..web.rules import check_host

    check_host(args.host, args.allow_remote)  # before the heavy imports
    if args.out is not None:  # before the server starts: Save must not be the first to fail
        from ..core.io import check_output_path

        check_output_path(args.out, [args.image, args.labels])
        if not args.out.lower().endswith(".seg.nrrd"):
            raise UsageError(f"--out {args.out}: the output must be a .seg.nrrd file")
    import importlib.util

    missing = [m for m in ("trame", "trame_slicer") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f"the browser app needs {missing[-1].replace('_', '-')}: "
            'pip install ".[web]" (in a checkout of this repository)'
        )
    import tempfile

    from ..core.propagator import PropagationOptions
    from ..web.app import serve

    options = PropagationOptions(axis=AXIS_AUTO, weights=args.weights, device=args.device)

    with tempfile.TemporaryDirectory(prefix="universeg-sample-") as tmp:
        image, labels = args.image, args.labels
        if args.sample:
            from ..web.sample import write_sample

            image, labels, _ = write_sample(tmp)
        return serve(
            image=image,
            labels=labels,
            out=args.out,
            host=args.host,
            port=args.port,
            allow_remote=args.allow_remote,
            max_upload_mb=args.max_upload_mb,
            max_image_mb=args.max_image_mb,
            max_voxels=args.max_voxels,
            options=options,
        )
