"""End to end: ``universeg-slicer web`` in a real headless Chromium (Playwright).

The server runs as its own process on a free loopback port with the sample chest CT and a
segmentation holding 3 painted axial slices of "right lung". The page is driven like a person
would: paint a stroke with Slicer's Paint effect, press Propagate, wait for the status line,
press Save, upload a bad file. The saved file is checked with slicerio. Every wait is on page
text or on the server's output, never a fixed sleep. The screenshot of the page after the
propagation goes to the test's tmp folder (and to ``$UNIVERSEG_WEB_SCREENSHOT`` when set, which
is how ``docs/web_app.png`` was made).

In CI (``CI`` set) a missing Chromium or Playwright is a failure, not a skip.
"""

import json
import os
import re
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from web_browser_tools import (
    CHROMIUM,
    choose_effect,
    console_noise,
    paint_stroke,
    start_server,
    text,
    wait_text,
)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from UniverSegLogic.web.sample import write_sample

    folder = tmp_path_factory.mktemp("web")
    image, seg, labeled = write_sample(folder)
    return folder, image, seg, labeled


@pytest.fixture()
def server(sample, tmp_path):
    folder, image, seg, _ = sample
    out = tmp_path / "result.seg.nrrd"
    srv = start_server(
        ["--image", str(image), "--labels", str(seg), "--out", str(out), "--port", "0"], tmp_path
    )
    srv.out = out
    try:
        yield srv
    finally:
        srv.stop()


def test_paint_propagate_save_and_a_bad_upload_in_chromium(server, sample, tmp_path):
    import slicerio
    from playwright.sync_api import sync_playwright

    _, image, seg_path, labeled = sample
    timings = {"server_ready_s": round(server.start_s, 2)}

    # every URL needs the token: the bare page is refused
    base = server.url.split("/index.html")[0]
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(base + "/index.html", timeout=10)
    assert refused.value.code == 403

    console, page_errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("console", lambda m: console.append((m.type, m.text)))
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            t = time.perf_counter()
            page.goto(server.url)
            assert wait_text(page, "#status", r"right lung: 3 labeled$") == "right lung: 3 labeled"
            timings["page_ready_s"] = round(time.perf_counter() - t, 2)
            page.locator("#window-preset").locator("..").click()
            page.get_by_role("option", name="CT lung").click()

            # propagate: the page stays usable while it runs, the status line says the result
            shown = int(page.evaluate("window.trame.state.get('slice_index')"))
            assert shown not in labeled and min(labeled) < shown < max(labeled)
            t = time.perf_counter()
            page.locator("#propagate").click()
            status = wait_text(page, "#status", r"^right lung: 3 labeled, \d+ predicted$", 120)
            timings["propagate_to_status_s"] = round(time.perf_counter() - t, 2)
            assert re.match(r"right lung: predicted \d+ slices", text(page, "#message"))
            kinds = page.evaluate("window.trame.state.get('slice_kinds')")
            assert kinds[shown] == "predicted"
            page.screenshot(path=str(tmp_path / "web_app.png"))
            if os.environ.get("UNIVERSEG_WEB_SCREENSHOT"):
                page.screenshot(path=os.environ["UNIVERSEG_WEB_SCREENSHOT"])

            # correct the prediction on the slice shown with Slicer's Paint (a stroke from the
            # lung's inner edge into the mediastinum): the corrected slice counts as labeled
            choose_effect(page, "paint")
            paint_stroke(page)
            wait_text(page, "#status", r"^right lung: 4 labeled, 1 corrected, \d+ predicted$")
            choose_effect(page, "none")

            # propagate again from the 4 labeled slices
            t = time.perf_counter()
            page.locator("#propagate").click()
            status = wait_text(page, "#status", r"^right lung: 4 labeled, \d+ predicted$", 120)
            timings["second_propagate_to_status_s"] = round(time.perf_counter() - t, 2)
            predicted = int(re.search(r"(\d+) predicted", status).group(1))
            assert predicted > 0
            assert re.search(r"paint slice \d+ next", text(page, "#message"))

            # "Go to suggested slice" moves the view onto a slice that is not labeled
            page.locator("#suggested-slice").click()
            message = wait_text(page, "#message", r"^Suggested: paint slice \d+")
            suggested = int(re.search(r"slice (\d+)", message).group(1))
            page.wait_for_function(
                f"window.trame.state.get('slice_index') === {suggested}", timeout=30_000
            )
            kinds = page.evaluate("window.trame.state.get('slice_kinds')")
            assert kinds[suggested] not in ("labeled", "corrected")

            page.locator("#save").click()
            wait_text(page, "#message", r"^Saved ")

            # a bad upload: a clear message, nothing changed
            bad = tmp_path / "bad.seg.nrrd"
            bad.write_text("this is not a segmentation\n")
            page.set_input_files("#upload-segmentation", str(bad))
            message = wait_text(page, "#message", r"^bad\.seg\.nrrd ")
            assert message == (
                "bad.seg.nrrd is not a usable .seg.nrrd file: it does not start with a NRRD header"
            )
            assert page.locator("#message").get_attribute("data-kind") == "error"
            assert text(page, "#status") == status
        finally:
            browser.close()

    assert not console_noise(console), console_noise(console)
    assert not page_errors, page_errors

    # the saved file (read with slicerio, placed on the CT's voxel grid): painted slices bit for
    # bit, the stroke, non-empty predictions, name, colour and the annotation record
    from UniverSegLogic.core.geometry import SliceFrame
    from UniverSegLogic.core.io import read_image, read_segmentation

    ct = read_image(str(image))
    frame = SliceFrame.of(ct, "axial")
    out_seg = read_segmentation(str(server.out), ct).get("right lung")
    in_seg = read_segmentation(str(seg_path), ct).get("right lung")
    assert np.allclose(out_seg.color, in_seg.color, atol=1e-4)
    out_mask, in_mask = frame.to_frame(out_seg.mask), frame.to_frame(in_seg.mask)
    for t in labeled:
        assert np.array_equal(out_mask[t], in_mask[t]), f"painted slice {t} changed"
    assert out_mask[shown].any() and not in_mask[shown].any()  # the corrected slice
    (tags,) = [
        s["tags"]
        for s in slicerio.read_segmentation(str(server.out))["segments"]
        if s["name"] == "right lung"
    ]
    assert tags["UniverSeg.Labeled"].endswith(
        "slices=" + ",".join(map(str, sorted(labeled + [shown])))
    )
    stored = tags["UniverSeg.Predicted"].split("slices=")[1].split(",")
    predicted_slices = [int(item.split(".")[0]) for item in stored]
    assert len(predicted_slices) == predicted
    inner = [t for t in predicted_slices if min(labeled) < t < max(labeled)]
    assert inner and all(out_mask[t].any() for t in inner)

    timings["server_rss_peak_mib"] = server.memory_mib()[1]
    (tmp_path / "timings.json").write_text(json.dumps(timings, indent=2))
    print("web app timings:", json.dumps(timings))
