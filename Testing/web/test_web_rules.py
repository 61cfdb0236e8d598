"""Rules of the browser app in plain Python (no Slicer, no trame): file names from the page, the
access token and which requests may reach the server, host binding, window/level presets, the
status wording. (What an upload may contain: test_web_uploads.py.)"""

import os

import numpy as np
import pytest

from UniverSegLogic.errors import InputError, UsageError
from UniverSegLogic.mrml.record import SliceStatus
from UniverSegLogic.web import rules


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


def test_requests_must_come_from_the_served_origin():
    hosts = rules.served_hosts("127.0.0.1", 8123)
    assert {"127.0.0.1:8123", "localhost:8123", "[::1]:8123"} <= hosts
    own = {"Host": "127.0.0.1:8123"}
    assert rules.request_refusal(own, hosts) is None  # a non-browser client: no Origin
    assert rules.request_refusal({**own, "Origin": "http://127.0.0.1:8123"}, hosts) is None
    assert rules.request_refusal({**own, "Sec-Fetch-Site": "same-origin"}, hosts) is None
    assert rules.request_refusal({**own, "Sec-Fetch-Site": "none"}, hosts) is None
    refused = [
        {"Host": "evil.example:8123"},  # DNS rebinding: another name for 127.0.0.1
        {"Host": "127.0.0.1:9999"},
        {},
        {**own, "Origin": "http://127.0.0.1:9999"},  # another port: same site, not same origin
        {**own, "Origin": "null"},
        {**own, "Origin": "http://localhost:8123"},
        {**own, "Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors"},
        {**own, "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Dest": "iframe"},
    ]
    for headers in refused:
        assert rules.request_refusal(headers, hosts), headers
    # a top-level navigation (a link) is no foreign request: the page still needs the token
    link = {**own, "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    assert rules.request_refusal({**link, "Sec-Fetch-Dest": "document"}, hosts) is None
    # --allow-remote: any name (the machine's names are not known), the Origin still checked
    assert rules.served_hosts("0.0.0.0", 8123) is None
    remote = {"Host": "scanner-pc:8123", "Origin": "http://scanner-pc:8123"}
    assert rules.request_refusal(remote, None) is None
    assert rules.request_refusal({**remote, "Origin": "http://evil.example"}, None)


def test_ct_opens_with_a_soft_tissue_window_and_mr_with_auto():
    rng = np.random.default_rng(0)
    ct = rng.integers(-1024, 1500, size=(20, 64, 64)).astype(np.int16)
    assert rules.default_window_preset(ct) == rules.CT_DEFAULT_PRESET == "CT abdomen"
    assert rules.default_window_preset(ct.astype(np.float32) - 0.5) == "CT abdomen"
    mr = rng.integers(0, 2500, size=(20, 64, 64)).astype(np.uint16)
    assert rules.default_window_preset(mr) == "Auto"
    assert rules.default_window_preset(rng.normal(0, 1, (8, 8, 8))) == "Auto"  # z-scored MR
    assert rules.default_window_preset(mr, modality="CT") == "CT abdomen"
    assert rules.default_window_preset(ct, modality="MR") == "Auto"
    assert rules.default_window_preset(np.zeros((0,))) == "Auto"
    assert rules.CT_DEFAULT_PRESET in rules.WINDOW_PRESETS


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
