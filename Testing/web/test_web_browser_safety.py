"""The browser app is safe to leave running and never loses work: real headless Chromium
(Playwright), the app as its own process on a free loopback port, a real second HTTP server on
another loopback port for the hostile page, a raw websocket client.

Each test starts its own server with the sample chest CT and 3 painted slices of "right lung"
(the access tests share one: they change nothing). Waits are on page text, trame state or the
server's output, never fixed sleeps.
"""

import gzip
import json
import os
import re
import urllib.error
import urllib.request

import pytest
from web_browser_tools import (
    CHROMIUM,
    SecondSite,
    choose_effect,
    console_noise,
    paint_stroke,
    start_server,
    text,
    wait_state,
    wait_text,
    wslink_session,
)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from UniverSegLogic.web.sample import write_sample

    folder = tmp_path_factory.mktemp("web-safety")
    image, seg, labeled = write_sample(folder)
    return folder, image, seg, labeled


def _serve(sample, folder, *extra):
    _, image, seg, _ = sample
    out = folder / "result.seg.nrrd"
    srv = start_server(
        ["--image", str(image), "--labels", str(seg), "--out", str(out), *extra], folder
    )
    srv.out = out
    return srv


@pytest.fixture(scope="module")
def shared_server(sample, tmp_path_factory):
    srv = _serve(sample, tmp_path_factory.mktemp("shared"))
    yield srv
    srv.stop()


@pytest.fixture()
def server(sample, tmp_path):
    srv = _serve(sample, tmp_path)
    yield srv
    srv.stop()


class Browser:
    """One Chromium with one page on the app; console messages and page errors collected."""

    def __init__(self, playwright):
        self.browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        self.context = self.browser.new_context(viewport={"width": 1280, "height": 800})
        self.console, self.errors = [], []
        self.page = self.new_page()

    def new_page(self):
        page = self.context.new_page()
        page.on("console", lambda m: self.console.append((m.type, m.text)))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        return page

    def open_app(self, server):
        self.page.goto(server.url)
        wait_text(self.page, "#status", r"^right lung: 3 labeled$")
        return self.page


@pytest.fixture()
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = Browser(p)
        try:
            yield b
        finally:
            b.browser.close()


# ---------------------------------------------------------------------------------------------
# 1. a page on another port cannot ride the user's access

HOSTILE_PAGE = """<!doctype html><html><body><div id="result">running</div><script>
const app = "127.0.0.1:APP_PORT", found = {};
function report(key, value) {
  found[key] = value;
  if (Object.keys(found).length === 2)
    document.getElementById("result").textContent = JSON.stringify(found);
}
// a request to this page's own server: the browser attaches every cookie of 127.0.0.1
fetch("/probe", {credentials: "include"}).then(() => report("probe", "sent"));
// the app's websocket, as the page of the finding opened it
const ws = new WebSocket("ws://" + app + "/ws");
ws.onopen = () => { report("websocket", "open"); ws.close(); };
ws.onerror = () => report("websocket", "refused");
</script></body></html>"""


def test_a_page_on_another_port_gets_no_token_and_no_socket(shared_server, browser):
    server = shared_server
    page = browser.open_app(server)  # the user opened the app once in this browser
    site = SecondSite({"/evil.html": HOSTILE_PAGE.replace("APP_PORT", str(server.port))})
    try:
        hostile = browser.new_page()
        hostile.goto(f"http://127.0.0.1:{site.port}/evil.html")
        result = json.loads(wait_text(hostile, "#result", r"^\{.*websocket.*\}$", 30))
    finally:
        site.close()
    # the other server saw no token: no cookie, no referrer, nothing in any header or path
    assert {"/evil.html", "/probe"} <= {path for path, _ in site.requests}
    for path, headers in site.requests:
        assert server.token not in path + json.dumps(headers), (path, headers)
        assert "Cookie" not in headers, headers
    assert browser.context.cookies() == []  # the app set none: nothing to send elsewhere
    # the app refused the websocket for its foreign Origin, and said so
    assert result["websocket"] == "refused"
    server.wait_for(rf"refused GET /ws: Origin 'http://127\.0\.0\.1:{site.port}'", 30)
    # the user's page is untouched and nothing was saved
    assert text(page, "#status") == "right lung: 3 labeled"
    assert not server.out.exists()


def test_raw_clients_need_the_served_origin_and_the_token(shared_server):
    server = shared_server
    app = f"127.0.0.1:{server.port}"
    ws = f"ws://{app}/ws"
    own = f"http://{app}"
    # a foreign Origin is refused at the handshake, even with the token (in the URL too)
    assert wslink_session(f"{ws}?token={server.token}", "http://127.0.0.1:1", server.token) == 403
    assert wslink_session(ws, "http://evil.example", server.token) == 403
    # another name for this machine (DNS rebinding) is refused
    assert (
        wslink_session(
            ws,
            f"http://evil.example:{server.port}",
            server.token,
            host=f"evil.example:{server.port}",
        )
        == 403
    )
    # the right Origin without the token (or with wslink's default secret) gets nothing
    for secret in (None, "wslink-secret", server.token[:-1]):
        hello, state = wslink_session(ws, own, secret)
        assert hello["error"]["message"] == "Authentication failed"
        assert state["error"]["message"].startswith("Unauthorized")
    # the positive control: the page's own origin with the token reads the state
    hello, state = wslink_session(ws, own, server.token)
    assert "error" not in hello and "status_lines" in json.dumps(state["result"])

    # HTTP: the page needs the token; no response sets a cookie; the token never leaks as a
    # referrer; the page is redirected once to hand trame's client the websocket and the token
    def get(path, **headers):
        request = urllib.request.Request(f"{own}{path}", headers=headers)
        opener = urllib.request.build_opener(NoRedirect)
        try:
            with opener.open(request, timeout=10) as response:
                return response.status, response.headers
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers

    for bare in ("/index.html", "/", "/./index.html", "/index.html/", "/%69ndex.html"):
        assert get(bare)[0] == 403, bare
    assert get("/index.html?token=wrong")[0] == 403
    status, headers = get(f"/index.html?token={server.token}")
    assert status == 302 and "Set-Cookie" not in headers
    assert f"secret={server.token}" in headers["Location"]
    assert "sessionURL=ws%3A%2F%2FUSE_HOST%2Fws" in headers["Location"]
    assert headers["Referrer-Policy"] == "no-referrer" and headers["X-Frame-Options"] == "DENY"
    page = f"/index.html?token={server.token}&secret={server.token}"
    status, headers = get(page)
    assert status == 200 and "Set-Cookie" not in headers
    assert get(page, Host=f"evil.example:{server.port}")[0] == 403
    assert get(page, Origin="http://127.0.0.1:1")[0] == 403
    assert (
        get("/vue.global.js", **{"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors"})[0]
        == 403
    )
    assert get("/vue.global.js", **{"Sec-Fetch-Site": "same-origin"})[0] == 200


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


# ---------------------------------------------------------------------------------------------
# 2. uploads: self-contained, bounded, any valid size; the fields never keep a refused name


def test_uploads_refuse_side_files_and_bombs_and_load_real_nifti(server, browser, sample, tmp_path):
    import SimpleITK as sitk

    page = browser.open_app(server)
    secret = tmp_path / "private.raw"
    secret.write_bytes(bytes(range(256)) * 4)
    os.chmod(secret, 0o600)
    side = tmp_path / "side.nrrd"
    side.write_bytes(
        b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 16 16\nencoding: raw\n"
        + f"data file: {secret}\n\n".encode()
    )
    bomb = tmp_path / "bomb.nrrd"  # 1 MiB on disk, 1 GiB once decompressed
    bomb.write_bytes(
        b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 1024 1024 1024\nencoding: gzip\n\n"
        + gzip.compress(bytes(2**20), 9) * 1024
    )
    rss_before, peak_before = server.memory_mib()
    for path, message in (
        (side, r"^side\.nrrd refers to a separate data file \(data file: "),
        (bomb, r"^bomb\.nrrd would expand to 1\.0 GiB \(1024x1024x1024 voxels\)"),
    ):
        page.set_input_files("#upload-image", str(path))
        wait_text(page, "#message", message, 60)
        assert page.locator("#message").get_attribute("data-kind") == "error"
        assert text(page, "#volume-name") == "CTChest4"  # nothing replaced
        # the field is empty again: no refused name left in it
        page.wait_for_function("document.querySelector('#upload-image').files.length === 0")
        assert path.name not in page.locator(".v-file-input").first.inner_text()
    rss_after, peak_after = server.memory_mib()
    print(
        f"server memory around the bomb upload: RSS {rss_before:.0f} -> {rss_after:.0f} MiB, "
        f"peak {peak_before:.0f} -> {peak_after:.0f} MiB"
    )
    assert peak_after - peak_before < 200, (peak_before, peak_after)
    assert not server.out.exists()

    # a valid .nii.gz far over 64 KiB loads (the sample CT, 0.7 MB compressed)
    chest = tmp_path / "chest.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(sample[1])), str(chest))
    assert chest.stat().st_size > 256 * 1024
    page.set_input_files("#upload-image", str(chest))
    wait_text(page, "#message", r"^Loaded chest\.nii\.gz$", 60)
    assert text(page, "#volume-name") == "chest"
    assert not console_noise(browser.console) and not browser.errors


# ---------------------------------------------------------------------------------------------
# 3. work is never dropped silently; 5. the page on load


def test_unsaved_work_is_asked_about_both_ways_and_can_always_be_downloaded(
    server, browser, sample, tmp_path
):
    from UniverSegLogic.core.geometry import SliceFrame
    from UniverSegLogic.core.io import read_image, read_segmentation

    ct = read_image(str(sample[1]))
    frame = SliceFrame.of(ct, "axial")
    page = browser.open_app(server)
    # on load: no console error, a CT window, the slice shown, how to paint and scroll
    assert not console_noise(browser.console) and not browser.errors, browser.console
    assert page.locator("#window-preset").locator("..").inner_text().endswith("CT abdomen")
    shown = page.evaluate("window.trame.state.get('slice_index')")
    assert text(page, "#slice-number") == f"Slice {shown} (0-33)"
    assert "change slice" in text(page, "#hint") and "paint" in text(page, "#hint")
    box = page.locator(".remote-controlled-area").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, 120)  # the wheel changes slice; the number follows
    wait_state(page, f"get('slice_index') !== {shown}")
    now = page.evaluate("window.trame.state.get('slice_index')")
    wait_text(page, "#slice-number", rf"^Slice {now} \(0-33\)$")

    # paint a stroke: unsaved work
    choose_effect(page, "paint")
    paint_stroke(page)
    painted = wait_text(page, "#status", r"^right lung: 4 labeled$")
    choose_effect(page, "none")
    wait_text(page, "#save-state", r"(?<!no) unsaved changes$")

    # opening an image asks first; "Keep my work" keeps everything
    page.set_input_files("#upload-image", str(sample[1]))
    wait_text(page, "#confirm-text", r"^Opening CTChest4\.nrrd would discard the unsaved changes")
    page.locator("#confirm-keep").click()
    wait_text(page, "#message", r"^Kept your changes; CTChest4\.nrrd was not opened\.$")
    assert text(page, "#status") == painted
    page.wait_for_function("document.querySelector('#upload-image').files.length === 0")

    # Download works although --out is set, and holds the stroke
    with page.expect_download() as info:
        page.locator("#download").click()
    path = tmp_path / info.value.suggested_filename
    info.value.save_as(str(path))
    assert path.name == "right lung 3 slices.seg.nrrd"
    mask = frame.to_frame(read_segmentation(str(path), ct).get("right lung").mask)
    assert sum(bool(m.any()) for m in mask) == 4  # the 3 painted slices and the stroke
    wait_text(page, "#save-state", "no unsaved changes$")

    # more work, then "Discard and open": the new image replaces it
    choose_effect(page, "paint")
    paint_stroke(page, fx=0.6, fy=0.5)
    choose_effect(page, "none")
    wait_text(page, "#save-state", r"(?<!no) unsaved changes$")
    page.set_input_files("#upload-segmentation", str(sample[2]))
    wait_text(page, "#confirm-text", r"^Opening right lung 3 slices\.seg\.nrrd would discard")
    page.locator("#confirm-discard").click()
    wait_text(page, "#message", r"^Loaded right lung 3 slices\.seg\.nrrd$")
    wait_text(page, "#status", r"^right lung: 3 labeled$")
    assert not server.out.exists()


# ---------------------------------------------------------------------------------------------
# 4. one run at a time


def test_a_double_click_on_propagate_keeps_one_run_and_cancel_until_it_ends(server, browser):
    page = browser.open_app(server)
    page.locator("#propagate").dblclick()
    # a progress report comes from the worker once the run computes: both clicks are handled
    wait_state(page, "get('progress') > 0", 120)
    assert page.evaluate("window.trame.state.get('running')") is True
    assert page.locator("#cancel").is_enabled()
    assert page.locator("#progress").is_visible()
    assert page.locator("#undo").is_disabled() and page.locator("#save").is_disabled()
    assert not re.search("running", text(page, "#message"))  # the second click said nothing
    page.locator("#cancel").click()
    # (a very fast machine may finish the run before the click arrives: then it says so)
    message = wait_text(page, "#message", r"^(Cancelled: nothing changed\.|right lung: predicted)")
    if message.startswith("Cancelled"):
        assert text(page, "#status") == "right lung: 3 labeled"
    assert page.locator("#cancel").is_disabled() and page.locator("#propagate").is_enabled()
    assert page.evaluate("window.trame.state.get('running')") is False
