"""Rules of the browser app in plain Python (no Slicer, no trame): uploads, file names from the
page, the access token, host binding, window/level presets, the status wording."""

import gzip
import os

import numpy as np
import pytest
import SimpleITK as sitk

from UniverSegLogic.errors import InputError, UsageError
from UniverSegLogic.mrml.record import SliceStatus
from UniverSegLogic.web import rules

MB = 2**20


def _nrrd_bytes(tmp_path, suffix=".nrrd"):
    path = tmp_path / f"img{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16)), str(path))
    return path.read_bytes()


@pytest.mark.parametrize(
    "name", ["../evil.nrrd", "a/b.nrrd", "a\\b.nrrd", "..", ".", ".hidden.nrrd", "x\x00.nrrd", ""]
)
def test_page_file_names_never_become_paths(tmp_path, name):
    with pytest.raises(InputError):
        rules.safe_path(tmp_path, name)


def test_plain_names_stay_in_the_folder_and_symlinks_out_are_refused(tmp_path):
    assert rules.safe_path(tmp_path, "CT chest 4.nrrd") == (tmp_path / "CT chest 4.nrrd").resolve()
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "uploads"
    folder.mkdir()
    os.symlink(outside / "x.nrrd", folder / "link.nrrd")
    with pytest.raises(InputError, match="leave the upload folder"):
        rules.safe_path(folder, "link.nrrd")


def test_real_files_of_each_type_are_accepted(tmp_path):
    nrrd = _nrrd_bytes(tmp_path)
    assert rules.check_upload("ct.nrrd", nrrd, "image", MB) == "ct.nrrd"
    assert rules.check_upload("ct.NII.GZ", _nrrd_bytes(tmp_path, ".nii.gz"), "image", MB)
    assert rules.check_upload("ct.nii", _nrrd_bytes(tmp_path, ".nii"), "image", MB)
    assert rules.check_upload("ct.mha", _nrrd_bytes(tmp_path, ".mha"), "image", MB)
    from UniverSegLogic.web.sample import write_sample

    _, seg, _ = write_sample(tmp_path)
    assert rules.check_upload("s.seg.nrrd", seg.read_bytes(), "segmentation", 8 * MB)


def test_bad_uploads_get_one_clear_line(tmp_path):
    nrrd = _nrrd_bytes(tmp_path)
    nii, niigz = _nrrd_bytes(tmp_path, ".nii"), _nrrd_bytes(tmp_path, ".nii.gz")
    cases = [
        (("big.nrrd", nrrd, "image", 100), "big.nrrd is .* uploads are limited to"),
        (("big.nrrd", None, "image", MB, 2 * MB), "limited to 1.0 MiB"),  # the browser's claim
        (("e.nrrd", b"", "image", MB), "e.nrrd is empty"),
        (("notes.txt", b"hello", "image", MB), "not a supported image file"),
        (("fake.nrrd", b"hello world", "image", MB), "is not a complete .nrrd file"),
        (("fake.nii.gz", gzip.compress(b"x" * 400), "image", MB), "is not a complete .nii.gz file"),
        (("fake.nii.gz", b"\x1f\x8bnot gzip", "image", MB), "is not a complete .nii.gz file"),
        (("cut.nii", nii[: len(nii) // 2], "image", MB), "is not a complete .nii file"),
        (("cut.nii.gz", niigz[:-5], "image", MB), "is not a complete .nii.gz file"),
        (("ct.nrrd", nrrd, "segmentation", MB), "not a supported segmentation file"),
        (("ct.seg.nrrd", nrrd, "segmentation", MB), "without segment fields"),
        (("../x.seg.nrrd", nrrd, "segmentation", MB), "not a plain file name"),
    ]
    for args, message in cases:
        with pytest.raises(InputError, match=message):
            rules.check_upload(*args)
    with pytest.raises(UsageError):
        rules.check_upload("ct.nrrd", nrrd, "mesh", MB)


def test_download_names_are_plain():
    assert rules.download_name("lungs.seg.nrrd") == "lungs.seg.nrrd"
    assert rules.download_name("../../etc/passwd") == "_.._etc_passwd.seg.nrrd"
    assert rules.download_name("") == "segmentation.seg.nrrd"
    assert "/" not in rules.download_name("a/b\\c")


def test_token_is_random_and_compared_exactly():
    a, b = rules.new_token(), rules.new_token()
    assert a != b and len(a) >= 32
    assert rules.token_matches(a, a)
    assert not rules.token_matches(a, b)
    assert not rules.token_matches(a, None)
    assert not rules.token_matches(a, a[:-1])


def test_only_loopback_without_the_explicit_flag():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert rules.check_host(host, False) is None
    for host in ("0.0.0.0", "192.168.1.5", "example.org", "::"):
        with pytest.raises(UsageError, match="--allow-remote"):
            rules.check_host(host, False)
        assert "WARNING" in rules.check_host(host, True)


def test_window_presets():
    assert rules.window_level("CT lung") == (1400.0, -500.0)
    values = np.arange(101, dtype=float)
    window, level = rules.window_level("MR auto (1-99%)", values)
    assert (window, level) == pytest.approx((98.0, 50.0))
    assert rules.window_level("MR full range", values) == pytest.approx((100.0, 50.0))
    with pytest.raises(UsageError, match="needs an image"):
        rules.window_level("MR full range")
    with pytest.raises(UsageError, match="unknown window preset"):
        rules.window_level("PET")


def _status(**kw):
    base = dict(
        segment_id="s1",
        name="right lung",
        axis=0,
        axis_name="axial",
        n_slices=8,
        labeled=[1, 4, 6],
        predicted=[2, 3, 5],
        edited=[],
        empty_labeled=[],
    )
    base.update(kw)
    return SliceStatus(**base)


def test_status_wording_is_stable():
    assert rules.status_line(_status()) == "right lung: 3 labeled, 3 predicted"
    assert rules.status_line(_status(predicted=[])) == "right lung: 3 labeled"
    line = rules.status_line(
        _status(labeled=[1, 3, 4, 6, 7], edited=[3], empty_labeled=[7], predicted=[2, 5])
    )
    assert line == "right lung: 5 labeled, 1 corrected, 1 empty, 2 predicted"
    assert rules.status_line(_status(labeled=[], predicted=[], note="x")) == (
        "right lung: 0 labeled [x]"
    )


def test_slice_kinds_follow_the_status():
    kinds = rules.slice_kinds(
        _status(labeled=[1, 3, 4, 7], edited=[3], empty_labeled=[7], predicted=[2, 5])
    )
    assert kinds == ["", "labeled", "predicted", "corrected", "labeled", "predicted", "", "empty"]
