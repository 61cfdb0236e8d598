"""What the browser app accepts as an upload, in plain Python (no Slicer, no trame): real files of
each type and of real sizes load; files that point at other files, decompression bombs and cut
files are refused in one line before any reader sees them (UniverSegLogic.web.uploads)."""

import gzip
import tracemalloc
import zlib

import numpy as np
import pytest
import SimpleITK as sitk

from UniverSegLogic.core.headers import nifti_header, nrrd_header
from UniverSegLogic.errors import InputError, UsageError
from UniverSegLogic.web.uploads import UploadLimits, check_upload, inflated_size

MB = 2**20
LIMITS = UploadLimits()


def _image_bytes(tmp_path, suffix, shape=(3, 4, 5), compress=False, seed=0):
    """A real file written by SimpleITK (random int16 voxels, so compression cannot hide size)."""
    path = tmp_path / f"img{suffix}"
    voxels = np.random.default_rng(seed).integers(-1024, 2000, size=shape).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(voxels), str(path), compress)
    return path.read_bytes()


def _gzip_zeros(n_mib):
    """A gzip stream of ``n_mib`` MiB of zeros, about 1 KiB per MiB (one member per MiB)."""
    return gzip.compress(bytes(MB), 9) * n_mib


def test_real_files_of_each_type_are_accepted(tmp_path):
    small = UploadLimits(upload_bytes=MB)
    assert check_upload("ct.nrrd", _image_bytes(tmp_path, ".nrrd"), "image", small) == "ct.nrrd"
    assert check_upload("ct.NII.GZ", _image_bytes(tmp_path, ".nii.gz"), "image", small)
    assert check_upload("ct.nii", _image_bytes(tmp_path, ".nii"), "image", small)
    assert check_upload("ct.mha", _image_bytes(tmp_path, ".mha"), "image", small)
    assert check_upload("z.mha", _image_bytes(tmp_path, ".mha", compress=True), "image", small)
    assert check_upload("z.nrrd", _image_bytes(tmp_path, ".nrrd", compress=True), "image", small)
    from UniverSegLogic.web.sample import write_sample

    _, seg, _ = write_sample(tmp_path)
    assert check_upload("s.seg.nrrd", seg.read_bytes(), "segmentation", LIMITS)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_files_of_real_size_are_accepted(tmp_path, suffix):
    # 1.1 MiB of voxels (a .nii.gz of random voxels stays ~1 MiB): far over the 64 KiB that
    # the completeness check used to read, so any valid NIfTI larger than that was refused
    data = _image_bytes(tmp_path, suffix, shape=(64, 96, 96), compress=suffix == ".nrrd")
    assert len(data) > 512 * 1024
    assert check_upload(f"ct{suffix}", data, "image", LIMITS) == f"ct{suffix}"


def test_files_that_point_at_other_files_are_refused(tmp_path):
    header = b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n"
    mha = b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\n"
    nii = bytearray(_image_bytes(tmp_path, ".nii"))
    pair = bytes(nii[:344]) + b"ni1\0" + bytes(nii[348:])  # the header of a .hdr/.img pair
    analyze = bytes(nii[:344]) + b"\0\0\0\0" + bytes(nii[348:])  # Analyze 7.5: always a pair
    cases = {
        "a.nrrd": header + b"data file: /etc/passwd\n\n",
        "b.nrrd": header + b"datafile: ../secret.raw\n\n",
        "c.nrrd": header + b"DATA  FILE: LIST\nx.raw\ny.raw\n\n",
        "d.nrrd": header + b"data file: slice%03d.raw 0 3 1\n\n",
        "e.mha": mha + b"ElementDataFile = /etc/passwd\n",
        "f.mha": mha + b"ElementDataFile = LIST\nx.raw\n",
        "g.mha": mha + b"ElementDataFile = slice%03d.raw 1 4 1\n",
        "h.nii": pair,
        "i.nii": analyze,
        "j.nii.gz": gzip.compress(pair),
    }
    for name, content in cases.items():
        with pytest.raises(InputError, match="refers to a separate data file") as info:
            check_upload(name, content + bytes(64), "image", LIMITS)
        assert str(info.value).startswith(name) and "\n" not in str(info.value)
    seg = header.replace(b"encoding", b"Segment0_ID:=x\nencoding") + b"data file: /etc/passwd\n\n"
    with pytest.raises(InputError, match="refers to a separate data file"):
        check_upload("s.seg.nrrd", seg, "segmentation", LIMITS)
    # detached headers are not even accepted by name
    for name in ("x.nhdr", "x.mhd", "x.hdr", "x.img", "x.raw"):
        with pytest.raises(InputError, match="not a supported image file"):
            check_upload(name, header + b"\n", "image", LIMITS)


def _peak_mib(action):
    tracemalloc.start()
    try:
        action()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / MB


def test_decompression_bombs_are_refused_from_the_header_without_inflating_them():
    stream = _gzip_zeros(1024)  # 1 GiB of zeros in about 1 MiB
    assert len(stream) < 2 * MB
    bombs = {
        "bomb.nrrd": b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 1024 1024 1024\n"
        b"encoding: gzip\n\n" + stream,
        "bomb.mha": b"NDims = 3\nDimSize = 2048 1024 1024\nElementType = MET_UCHAR\n"
        b"CompressedData = True\nElementDataFile = LOCAL\n" + zlib.compress(bytes(MB)),
    }
    nii = bytearray(nifti_header_bytes(2048, 2048, 2048))
    bombs["bomb.nii.gz"] = gzip.compress(bytes(nii)) + stream
    for name, content in bombs.items():
        errors = []

        def refuse(name=name, content=content, errors=errors):
            with pytest.raises(InputError, match="would expand to") as info:
                check_upload(name, content, "image", LIMITS)
            errors.append(str(info.value))

        assert _peak_mib(refuse) < 8, f"{name} was inflated"
        assert "(--max-image-mb, --max-voxels)" in errors[0] and "\n" not in errors[0]
    # the limit is the user's: a 64 MiB image under a 32 MiB limit, by bytes or by voxels
    header = b"NRRD0004\ntype: short\ndimension: 3\nsizes: 256 256 512\nencoding: gzip\n\n"
    content = header + _gzip_zeros(64)
    assert check_upload("ok.nrrd", content, "image", LIMITS)
    for limits in (UploadLimits(image_bytes=32 * MB), UploadLimits(voxels=256 * 256 * 256)):
        with pytest.raises(InputError, match=r"would expand to 64 MiB \(256x256x512 voxels\)"):
            check_upload("ok.nrrd", content, "image", limits)
    with pytest.raises(UsageError, match="--max-voxels must be positive"):
        UploadLimits.from_options(max_voxels=0)


def nifti_header_bytes(*shape):
    """A single-file NIfTI-1 header (int16 voxels of ``shape``), as bytes."""
    image = sitk.GetImageFromArray(np.zeros((2, 2, 2), np.int16))
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "h.nii"
        sitk.WriteImage(image, str(path))
        head = bytearray(path.read_bytes()[:352])
    head[40:56] = np.array([len(shape), *shape] + [1] * (7 - len(shape)), "<i2").tobytes()
    return bytes(head)


def test_a_small_header_cannot_make_the_check_inflate_more_than_it_declares():
    # 64x64x64 bytes declared, 1 GiB of compressed zeros sent: the check stops at 256 KiB
    header = b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 64 64 64\nencoding: gzip\n\n"
    content = header + _gzip_zeros(1024)
    peak = _peak_mib(lambda: check_upload("small.nrrd", content, "image", LIMITS))
    assert peak < 8
    assert inflated_size(memoryview(_gzip_zeros(3)), 10 * MB) == 3 * MB  # members add up
    assert inflated_size(memoryview(_gzip_zeros(3)), 5) == 5


def test_cut_and_malformed_files_get_one_clear_line(tmp_path):
    nrrd = _image_bytes(tmp_path, ".nrrd")
    nii = _image_bytes(tmp_path, ".nii", shape=(64, 96, 96))
    niigz = _image_bytes(tmp_path, ".nii.gz", shape=(64, 96, 96))
    zn = _image_bytes(tmp_path, ".nrrd", shape=(64, 96, 96), compress=True)
    mha = _image_bytes(tmp_path, ".mha", shape=(64, 96, 96))
    small = UploadLimits(upload_bytes=MB)
    cases = [
        (("big.nrrd", nrrd, "image", UploadLimits(upload_bytes=100)), "big.nrrd is .* limited to"),
        (("big.nrrd", None, "image", small, 2 * MB), "limited to 1.0 MiB"),  # the browser's claim
        (("e.nrrd", b"", "image", small), "e.nrrd is empty"),
        (("notes.txt", b"hello", "image", small), "not a supported image file"),
        (("fake.nrrd", b"hello world", "image", small), "not a usable .nrrd file: it does not"),
        (("fake.nii.gz", gzip.compress(b"x" * 400), "image", small), "not a usable .nii.gz"),
        (("fake.nii.gz", b"\x1f\x8bnot gzip", "image", small), "not a usable .nii.gz file"),
        (("cut.nii", nii[: len(nii) // 2], "image", LIMITS), r"not a complete \.nii file \("),
        (("cut.nii.gz", niigz[: len(niigz) // 2], "image", LIMITS), "not a complete .nii.gz"),
        (("cut.nrrd", zn[:-1000], "image", LIMITS), "not a complete .nrrd file"),
        (("cut.mha", mha[:-10], "image", LIMITS), "not a complete .mha file"),
        (("ct.nrrd", nrrd, "segmentation", small), "not a supported segmentation file"),
        (("ct.seg.nrrd", nrrd, "segmentation", small), "without segment fields"),
        (("../x.seg.nrrd", nrrd, "segmentation", small), "not a plain file name"),
        (
            (
                "b.nrrd",
                b"NRRD0004\ntype: block\ndimension: 1\nsizes: 1\nencoding: raw\n\n",
                "image",
                small,
            ),
            "voxel type .block.",
        ),
        (("h.nrrd", b"NRRD0004\ntype: uchar\n", "image", small), "has no end"),
    ]
    for args, message in cases:
        with pytest.raises(InputError, match=message) as info:
            check_upload(*args)
        assert "\n" not in str(info.value)
    with pytest.raises(UsageError):
        check_upload("ct.nrrd", nrrd, "mesh", small)


def test_headers_say_shape_and_size():
    facts = nrrd_header(b"NRRD0005\n# c\ntype: short\ndimension: 3\nsizes: 2 3 4\nencoding: gz\n\n")
    assert (facts.shape, facts.voxels, facts.nbytes, facts.encoding) == ((2, 3, 4), 24, 48, "gzip")
    assert facts.external is None
    nii = nifti_header(nifti_header_bytes(5, 6, 7))
    assert (nii.shape, nii.nbytes, nii.data_offset, nii.external) == ((5, 6, 7), 420, 352, None)
