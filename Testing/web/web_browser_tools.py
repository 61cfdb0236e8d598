"""What the browser tests share (no tests here): the app server as a child process, waits on page
text, the server's memory, a raw wslink client, a second site on another loopback port.

Every wait is on page text or on the server's output, never a fixed sleep. In CI (``CI`` set) a
missing Chromium or Playwright is a failure, not a skip.
"""

import asyncio
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
START_TIMEOUT_S = 90
#: console messages known to be harmless: Vue's plugin registration logs (info level)
HARMLESS_CONSOLE = (re.compile(r"^Vue\.use\("),)


def need_browser():
    """Skip (fail in CI) when Playwright, Chromium or trame-slicer is missing."""
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "playwright is not installed (pip install -e '.[test]')"
    if problem is None and not os.path.exists(CHROMIUM):
        problem = "chromium is not installed (apt-get install chromium libosmesa6)"
    if problem is None:
        try:
            import trame_slicer  # noqa: F401
        except ImportError:
            problem = "trame-slicer is not installed (pip install -e '.[test]')"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"browser test cannot run in CI: {problem}")
        pytest.skip(problem)


class Server:
    """``python -m UniverSegLogic web ...`` as a child process; its output lines in a queue."""

    def __init__(self, args, cwd):
        env = dict(os.environ)
        env.update(
            ITK_GLOBAL_DEFAULT_THREADER="Platform",
            VTK_DEFAULT_OPENGL_WINDOW="vtkOSOpenGLRenderWindow",
            PYTHONUNBUFFERED="1",
        )
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "UniverSegLogic", "web", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines = queue.Queue()
        self.log = []
        self.url = self.port = self.token = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.log.append(line.rstrip("\n"))
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, pattern, timeout):
        """The first output line (not read before) matching ``pattern`` (fails on exit or
        timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"server did not print {pattern!r} in {timeout} s:\n" + self.output())
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(
                    f"server exited ({self.proc.poll()}) before {pattern!r}:\n" + self.output()
                )
            m = re.search(pattern, line)
            if m:
                return m

    def wait_serving(self):
        """Wait for the URL line; sets ``url``, ``port``, ``token`` and ``start_s``."""
        m = self.wait_for(r"serving (http://127\.0\.0\.1:(\d+)/\S+\?token=(\S+))", START_TIMEOUT_S)
        self.url, self.port, self.token = m.group(1), int(m.group(2)), m.group(3)
        self.start_s = time.perf_counter() - self.t0
        return self

    def output(self):
        return "\n".join(self.log[-60:])

    def memory_mib(self):
        """(current, peak) resident memory of the server in MiB (VmRSS, VmHWM)."""
        values = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1]) / 1024
        return values["VmRSS"], values["VmHWM"]

    def stop(self):
        """SIGINT (graceful), then SIGKILL after 15 s; always reaps the process."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)


def start_server(args, cwd):
    """A started :class:`Server` (the caller stops it)."""
    need_browser()
    srv = Server(args, cwd)
    try:
        return srv.wait_serving()
    except BaseException:
        srv.stop()
        raise


def text(page, selector):
    return page.locator(selector).inner_text()


def wait_text(page, selector, pattern, timeout_s=60):
    """Wait until the element's text matches the regular expression ``pattern``."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            "([sel, pat]) => { const e = document.querySelector(sel);"
            " return !!e && new RegExp(pat).test(e.innerText); }",
            arg=[selector, pattern],
            timeout=timeout_s * 1000,
        )
    except PlaywrightTimeout:
        pytest.fail(
            f"{selector} never matched {pattern!r} in {timeout_s} s: it reads "
            f"{text(page, selector) if page.locator(selector).count() else None!r} "
            f"(message: {text(page, '#message')!r})"
        )
    return text(page, selector)


def wait_state(page, expression, timeout_s=60):
    """Wait until a JavaScript ``expression`` is true; ``get(name)`` reads trame's state."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            f"(() => {{ const get = (k) => window.trame.state.get(k); return {expression}; }})()",
            timeout=timeout_s * 1000,
        )
    except PlaywrightTimeout:
        pytest.fail(f"state never satisfied {expression!r} in {timeout_s} s")


def console_noise(console):
    """Console errors and warnings that are not known to be harmless."""
    return [
        (kind, line)
        for kind, line in console
        if kind in ("error", "warning") and not any(h.search(line) for h in HARMLESS_CONSOLE)
    ]


def choose_effect(page, name):
    """Click an effect's button and wait until the server has switched to it (a stroke that
    starts before would go to the previous effect)."""
    page.locator(f"#effect-{name}").click()
    wait_state(page, f"get('effect_active') === {name!r}", 30)


def paint_stroke(page, fx=0.42, fy=0.45, steps=10):
    """Drag the mouse across the slice view (see :func:`choose_effect`)."""
    box = page.locator(".remote-controlled-area").first.bounding_box()
    cx, cy = box["x"] + box["width"] * fx, box["y"] + box["height"] * fy
    page.mouse.move(cx, cy)
    page.mouse.down()
    for i in range(1, steps + 1):
        page.mouse.move(cx + 4 * i, cy + 2 * i)
    page.mouse.up()


def wslink_session(url, origin=None, secret=None, host=None, calls=("trame.state.get",)):
    """Talk to a wslink websocket as a raw client: the handshake (with ``origin`` and ``host``
    headers when given), ``wslink.hello`` with ``secret``, then each of ``calls``. Returns the
    HTTP status of a refused handshake (an int), else the list of replies (dicts)."""
    import aiohttp
    import msgpack
    from wslink.chunking import UnChunker, generate_chunks

    async def run():
        headers = {k: v for k, v in (("Origin", origin), ("Host", host)) if v}
        async with aiohttp.ClientSession() as http:
            try:
                ws = await http.ws_connect(url, headers=headers)
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status
            unchunker = UnChunker()
            unchunker.set_max_message_size(2**30)
            replies = []
            async with ws:
                for i, (method, args) in enumerate(
                    [("wslink.hello", [{"secret": secret}])] + [(c, []) for c in calls]
                ):
                    rpcid = f"system:c0:{i}" if method == "wslink.hello" else f"rpc:c0:{i}"
                    packed = msgpack.packb(
                        {"wslink": "1.0", "id": rpcid, "method": method, "args": args}
                    )
                    for chunk in generate_chunks(packed, 0):
                        await ws.send_bytes(chunk)
                    while True:
                        msg = await ws.receive(timeout=30)
                        if msg.type != aiohttp.WSMsgType.BINARY:
                            replies.append({"closed": str(msg.type)})
                            return replies
                        full = unchunker.process_chunk(msg.data)
                        if full is not None and full.get("id") == rpcid:
                            replies.append(full)
                            break
            return replies

    return asyncio.run(run())


class SecondSite:
    """A real second HTTP server on another 127.0.0.1 port, as any other local program (a dev
    server, a notebook, a page a user opened) could run: it serves ``pages`` (path -> HTML) and
    records every request it receives (path, headers)."""

    def __init__(self, pages):
        site = self
        self.requests = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                site.requests.append((self.path, dict(self.headers)))
                body = pages.get(self.path.split("?")[0], "ok").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
