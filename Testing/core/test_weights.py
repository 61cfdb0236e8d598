"""Weights: verification, safe loading, download to the cache (with a local HTTP server)."""

import collections
import http.server
import io
import os
import pickle
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from UniverSegLogic.core import weights as W
from UniverSegLogic.core.model import UniverSeg


@pytest.fixture()
def good_file(tmp_path):
    torch.manual_seed(3)
    path = tmp_path / "good.pt"
    torch.save(UniverSeg().state_dict(), path)
    return path


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("UNIVERSEG_CACHE", str(d))
    return d


def test_good_file_loads_and_builds(good_file):
    sd = W.load_file(str(good_file))
    m = W.build_model(W.LoadedWeights(sd, "file", str(good_file), "x"))
    assert torch.equal(
        m.out_conv.conv.bias, torch.load(good_file, weights_only=True)["out_conv.conv.bias"]
    )


def test_gpu_saved_file_loads_on_cpu(good_file, tmp_path):
    """A checkpoint whose storages are tagged 'cuda:0' (as saved from a GPU process)."""
    src = zipfile.ZipFile(good_file)
    out = tmp_path / "from_gpu.pt"
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                old = b"X\x03\x00\x00\x00cpu"
                assert old in data
                data = data.replace(old, b"X\x06\x00\x00\x00cuda:0")
            dst.writestr(info, data)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            torch.load(out, weights_only=True)  # what the official loader would do
    sd = W.load_file(str(out))
    assert sd["out_conv.conv.weight"].device.type == "cpu"


def test_missing_empty_corrupt_truncated(tmp_path, good_file):
    with pytest.raises(W.WeightsError, match="not found"):
        W.load_file(str(tmp_path / "nope.pt"))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(W.WeightsError, match="empty"):
        W.load_file(str(empty))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(5000))
    with pytest.raises(W.WeightsError, match="corrupt or truncated"):
        W.load_file(str(junk))
    half = tmp_path / "half.pt"
    half.write_bytes(good_file.read_bytes()[: good_file.stat().st_size // 2])
    with pytest.raises(W.WeightsError, match="corrupt or truncated"):
        W.load_file(str(half))


def test_wrong_architecture(tmp_path):
    sd = UniverSeg().state_dict()
    missing = dict(sd)
    missing.pop("dec_blocks.1.cross.cross_conv.bias")
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(W.WeightsError, match="wrong architecture"):
        W.load_file(str(tmp_path / "missing.pt"))
    shaped = dict(sd)
    shaped["out_conv.conv.weight"] = torch.zeros(2, 64, 1, 1)
    torch.save(shaped, tmp_path / "shape.pt")
    with pytest.raises(W.WeightsError, match="shape"):
        W.load_file(str(tmp_path / "shape.pt"))
    nan = dict(sd)
    nan["out_conv.conv.bias"] = torch.tensor([float("nan")])
    torch.save(nan, tmp_path / "nan.pt")
    with pytest.raises(W.WeightsError, match="NaN"):
        W.load_file(str(tmp_path / "nan.pt"))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(W.WeightsError, match="not a UniverSeg state dict"):
        W.load_file(str(tmp_path / "list.pt"))


class _Payload:
    """Unpickling this would run code: weights_only loading must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": _Payload()}, path, pickle_module=pickle)
    with pytest.raises(W.WeightsError, match="refused|Python objects"):
        W.load_file(str(path))


def test_sha256_pin(good_file):
    digest = W.sha256_of(str(good_file))
    assert W.load_file(str(good_file), sha256=digest)
    with pytest.raises(W.WeightsError, match="sha256"):
        W.load_file(str(good_file), sha256="0" * 64)


class _Server:
    def __init__(self, body: bytes, declared_length=None):
        body_ = body
        length = declared_length if declared_length is not None else len(body)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(body_)

            def log_message(self, *a):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/w.pt"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_official_download_is_cached_atomically(good_file, cache, monkeypatch):
    msgs = []
    with _Server(good_file.read_bytes()) as srv:
        monkeypatch.setenv("UNIVERSEG_OFFICIAL_URL", srv.url)
        lw = W.load_weights("official", echo=msgs.append)
    assert lw.source == "official" and Path(lw.path).parent == cache
    assert any("OpenRAIL" in m for m in msgs), "license notice before the first download"
    assert [p.name for p in cache.iterdir() if p.name.startswith(".partial")] == []
    # second use: from the cache, no notice, no server
    monkeypatch.setenv("UNIVERSEG_OFFICIAL_URL", "http://127.0.0.1:9/unreachable")
    msgs.clear()
    assert W.load_weights("official", echo=msgs.append).path == lw.path
    assert msgs == []


def test_failed_downloads_leave_nothing(good_file, cache, monkeypatch):
    body = good_file.read_bytes()
    with _Server(body[:1000], declared_length=len(body)) as srv:  # connection cut short
        monkeypatch.setenv("UNIVERSEG_OFFICIAL_URL", srv.url)
        with pytest.raises(W.WeightsError):
            W.load_weights("official", echo=lambda m: None)
    with _Server(b"<html>not weights</html>") as srv:
        monkeypatch.setenv("UNIVERSEG_OFFICIAL_URL", srv.url)
        with pytest.raises(W.WeightsError, match="corrupt|truncated"):
            W.load_weights("official", echo=lambda m: None)
    assert not (cache / W.OFFICIAL_FILENAME).exists()
    assert [p for p in cache.iterdir() if p.name.startswith(".partial")] == []


def test_offline_is_a_clear_error(cache, monkeypatch):
    monkeypatch.setenv("UNIVERSEG_OFFICIAL_URL", "http://127.0.0.1:9/closed-port")
    with pytest.raises(W.WeightsError, match="offline"):
        W.load_weights("official", echo=lambda m: None)
    with pytest.raises(W.WeightsError, match="downloading is disabled"):
        W.load_weights("official", echo=lambda m: None, allow_download=False)


def test_download_sha256_mismatch(good_file, cache):
    with _Server(good_file.read_bytes()) as srv:
        with pytest.raises(W.WeightsError, match="sha256"):
            W.download(srv.url, cache / "x.pt", sha256="f" * 64)
    assert not (cache / "x.pt").exists()


def test_license_notice_once(cache):
    shown = []
    assert W.show_license_notice_once(shown.append)
    assert not W.show_license_notice_once(shown.append)
    assert len(shown) == 1 and "research" in shown[0]


# ------------------------------------------------------------------ archives checked before inflating


class _Storage:
    """Stands for a storage in a hand-written pickle (never allocated)."""


class _Tensor:
    def __init__(self, numel):
        self.numel = numel

    def __reduce__(self):
        args = (_Storage(), 0, (self.numel,), (1,), False, collections.OrderedDict())
        return (torch._utils._rebuild_tensor_v2, args)


class _Pickler(pickle.Pickler):
    """Writes the data.pkl torch.save would write for {"x": a float32 tensor of ``numel``}."""

    def __init__(self, fh, numel):
        super().__init__(fh, protocol=2)
        self.numel = numel

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, "0", "cpu", self.numel)
        return None


def make_zip_bomb(path, inflated):
    """A real PyTorch archive of one float32 tensor of ``inflated`` bytes of zeros, deflated
    (about 1000:1): torch.load would allocate and inflate all of it."""
    pkl = io.BytesIO()
    _Pickler(pkl, inflated // 4).dump({"x": _Tensor(inflated // 4)})
    small = io.BytesIO()
    torch.save({"x": torch.zeros(1)}, small)
    small.seek(0)
    with zipfile.ZipFile(small) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            name = "bomb/" + info.filename.split("/", 1)[1]
            if name.endswith("/data.pkl"):
                dst.writestr(name, pkl.getvalue())
            elif "/data/" not in name:
                dst.writestr(name, src.read(info))
        entry = zipfile.ZipInfo("bomb/data/0")
        entry.compress_type = zipfile.ZIP_DEFLATED
        zeros = bytes(1 << 20)
        with dst.open(entry, "w", force_zip64=True) as fh:
            for _ in range(inflated >> 20):
                fh.write(zeros)


_LOAD_AND_MEASURE = """
import resource, sys
def status(key):
    with open("/proc/self/status") as fh:
        return int(next(x for x in fh if x.startswith(key)).split()[1]) * 1024
from UniverSegLogic.core import weights as W
base = status("VmHWM")
# bound this process: at most 512 MiB more data than it has now (the bomb needs 1 GiB)
resource.setrlimit(resource.RLIMIT_DATA, (status("VmData") + (512 << 20), resource.RLIM_INFINITY))
try:
    W.load_file(sys.argv[1])
    print("loaded")
except W.WeightsError as exc:
    print(exc)
print(status("VmHWM") - base)
"""


def test_a_zip_bomb_is_refused_before_it_is_inflated(tmp_path):
    """A 1 MB weights file whose storage inflates to 1 GiB: refused from the zip directory, in a
    process whose peak memory does not grow (today's torch.load would allocate the 1 GiB)."""
    bomb = tmp_path / "bomb.pt"
    make_zip_bomb(bomb, 1 << 30)
    assert bomb.stat().st_size < 2 * 1024 * 1024
    p = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_MEASURE, str(bomb)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    message, grown = p.stdout.strip().splitlines()
    assert "before inflating it" in message and "1073742" in message, message
    assert int(grown) < 32 * 1024 * 1024, f"peak memory grew by {int(grown) >> 20} MiB"


def test_archive_bounds_allow_every_v1_precision_and_refuse_the_rest(tmp_path):
    sd = UniverSeg().state_dict()
    for dtype in (torch.float16, torch.float32, torch.float64):
        path = tmp_path / f"{str(dtype).split('.')[-1]}.pt"
        torch.save({k: v.to(dtype) for k, v in sd.items()}, path)
        assert W.load_file(str(path))["out_conv.conv.bias"].dtype == torch.float32
    many = tmp_path / "many.pt"
    torch.save({f"t{i}": torch.zeros(1) for i in range(W.MAX_ARCHIVE_ENTRIES)}, many)
    with pytest.raises(W.WeightsError, match="zip entries, more than"):
        W.load_file(str(many))
    twice = tmp_path / "twice.pt"
    with zipfile.ZipFile(tmp_path / "float32.pt") as src, zipfile.ZipFile(twice, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        with pytest.warns(UserWarning, match="Duplicate name"):
            dst.writestr(src.infolist()[0].filename, b"second copy")
    with pytest.raises(W.WeightsError, match="two zip entries are named"):
        W.load_file(str(twice))


def test_the_fusion_calibration_follows_the_weights_content(tmp_path, good_file):
    """A byte-identical copy of the starter weights, given by path, gets the starter calibration;
    other weights get the hand-set defaults and a note."""
    from UniverSegLogic.core.prior import FusionParams, fusion_for

    starter, note = fusion_for("starter")
    assert note is None
    copy = tmp_path / "my_weights.pt"
    shutil.copyfile(W.starter_path(), copy)
    fusion, note = fusion_for(str(copy))
    assert note is None and fusion == starter
    fusion, note = fusion_for(str(good_file))
    assert note and "hand-set defaults" in note and fusion == FusionParams()
