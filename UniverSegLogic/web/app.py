"""The trame page of ``universeg-slicer web``: one slice view served by trame-slicer, the
Segment Editor's Paint / Erase / Scissors and undo, Propagate with progress and Cancel, the
slice status of every segment, Save.

Importing this module imports trame, trame-slicer and slicer-core (``pip install
".[web]"`` in a checkout); the command line imports it only when the command runs.
Test hooks: every control has a stable ``id`` (``propagate``, ``cancel``, ``save``,
``download``, ``upload-image``, ``upload-segmentation``, ``confirm-keep``, ``confirm-discard``,
...), the status lines are in ``#status`` (one ``.status-line`` each, worded by
:func:`UniverSegLogic.web.rules.status_line`), the last message in ``#message`` (``data-kind``
``info`` or ``error``), the slice shown in ``#slice-number``.

Access: the page URL carries the access token (``?token=``); no cookie is ever set (cookies are
sent to every port of a host, so another local server would receive it). Every request must
come from the app's own origin (:func:`UniverSegLogic.web.rules.request_refusal`: Host, Origin,
Sec-Fetch-Site); the page itself needs the token, and the websocket's first message must carry
it (wslink's ``secret``, which the page is redirected to pass). See SECURITY.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import posixpath
import sys
import time
from pathlib import Path
from typing import Optional

from ..errors import Cancelled, InputError, UniverSegError, UsageError, one_line
from . import rules
from .session import EFFECTS, AnnotationSession, UnsavedChanges
from .uploads import (
    DEFAULT_MAX_IMAGE_MB,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_MAX_VOXELS,
    UploadLimits,
    check_upload,
)

log = logging.getLogger(__name__)

ORIENTATIONS = ("Axial", "Coronal", "Sagittal")
#: the page (the only HTTP paths that need the token; the rest is trame's public client code)
PAGE_PATHS = ("/", "/index.html")
#: trame's websocket route, which the page is told to use (it would ask a ParaView launcher at
#: POST /paraview/ first otherwise: the 405 on every page load)
WS_PATH = "/ws"
#: sent with every HTTP response: no referrer (the page URL holds the token), no framing, no
#: use of the app's files by other origins
SECURITY_HEADERS = {
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "Cross-Origin-Resource-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}
#: the page's responses (their URL holds the token) are not kept in caches either
PAGE_HEADERS = {**SECURITY_HEADERS, "Cache-Control": "no-store"}
#: one line under the tools: how to change slice and paint
HINT = "Scroll over the image to change slice; choose Paint, then drag to paint."
#: colours of the slice strip, per kind of slice (rules.slice_kinds)
KIND_COLORS = {
    "labeled": "#3d7cff",
    "corrected": "#ff9f1a",
    "empty": "#9aa7b8",
    "predicted": "#22c55e",
    "": "#2a2f38",
}


def access_middleware(app: WebApp):
    """aiohttp middleware for every request (page, scripts, websocket): refused (403) unless it
    comes from the app's own origin (:func:`rules.request_refusal` against ``app.hosts``); the
    page also needs the token in its URL, and is redirected once to tell trame's client the
    websocket's address and the token for its first message (trame's client then removes both
    from the address bar; the token stays, so a reload works). Sets no cookie."""
    from urllib.parse import urlencode

    from aiohttp import web

    @web.middleware
    async def check(request, handler):
        problem = rules.request_refusal(request.headers, app.hosts)
        # the page under any spelling the static files answer to (/./index.html, /index.html/)
        page = posixpath.normpath("/" + request.path.lstrip("/")) in PAGE_PATHS
        if (
            problem is None
            and page
            and not rules.token_matches(app.token, request.query.get("token"))
        ):
            problem = (
                "missing or wrong access token; open the URL that the server printed when it "
                "started"
            )
        if problem is not None:
            log.warning("refused %s %s: %s", request.method, request.path, problem)
            return web.Response(
                status=403, text=f"universeg-slicer web: {problem}\n", headers=PAGE_HEADERS
            )
        if page and request.query.get("secret") != app.token:
            query = {**request.query, "secret": app.token, "sessionURL": f"ws://USE_HOST{WS_PATH}"}
            return web.Response(
                status=302,
                headers={**PAGE_HEADERS, "Location": "/index.html?" + urlencode(query)},
            )
        response = await handler(request)
        if isinstance(response, web.StreamResponse) and not response.prepared:
            response.headers.update(PAGE_HEADERS if page else SECURITY_HEADERS)
        return response

    return check


class WebApp:
    """The trame server and page around one :class:`AnnotationSession`."""

    def __init__(
        self,
        out_path=None,
        limits: Optional[UploadLimits] = None,
        token: Optional[str] = None,
        server=None,
        options=None,
    ):
        from trame.app import get_server
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories
        from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

        self.server = server or get_server(None, client_type="vue3")
        self.state, self.ctrl = self.server.state, self.server.controller
        self.token = token or rules.new_token()
        #: the Host values requests must name (rules.served_hosts; set once the port is known,
        #: None: any); nothing is served before
        self.hosts = frozenset()
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.session = AnnotationSession(
            self.slicer_app, out_path=out_path, limits=limits, options=options
        )
        self.layout_manager = LayoutManager(
            self.slicer_app.scene, self.slicer_app.view_manager, self.server
        )
        self.layout_manager.register_layout_dict(
            {"Slice": Layout(LayoutDirection.Vertical, [ViewLayoutDefinition.axial_view()])}
        )
        self.layout_manager.set_layout("Slice")
        self.view = self.slicer_app.view_manager.get_slice_views()[0]
        self._loop = None
        self._refresh_handle = None
        self._suggested, self._suggested_next = [], 0  # the last run's slices to paint next
        self._run_task = None  # the one propagation in progress
        self._pending_upload = None  # (kind, name, content, size) waiting for the user's answer
        self._init_state()
        self._build_ui()
        self.view.modified.connect(lambda *_: self._on_view_modified())
        self.session.editor.segmentation_modified.connect(self._schedule_refresh)
        for sig in self.session.undo_stack.signals():
            sig.connect(self._schedule_refresh)
        self.ctrl.on_server_bind.add(self._on_bind)

    # ------------------------------------------------------------------ server

    def _on_bind(self, wslink_server) -> None:
        wslink_server.app.middlewares.append(access_middleware(self))

        async def validate_token(secret, client_id):  # wslink: the websocket's first message
            return rules.token_matches(self.token, secret)

        self.server.protocol.validateToken = validate_token

    def url(self, host: str, port: int) -> str:
        """The page URL with its access token."""
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/index.html?token={self.token}"

    # ------------------------------------------------------------------ state

    def _init_state(self) -> None:
        s = self.state
        s.trame__title = "UniverSeg annotation"
        s.has_volume = False
        s.volume_name = ""
        s.segments = []
        s.active_segment = ""
        s.new_segment_name = ""
        s.effect = "none"
        s.effect_active = "none"  # the effect the server has switched to (strokes go to it)
        s.brush = 5.0
        s.can_undo = False
        s.can_redo = False
        s.orientation = "Axial"
        s.window_preset = "Auto"
        s.window_presets = ["Auto", *rules.WINDOW_PRESETS]
        s.status_lines = []
        s.slice_kinds = []
        s.slice_index = -1
        s.slice_count = 0
        s.unsaved = False
        s.confirm_open = False
        s.confirm_text = ""
        s.upload_key = 0  # bumped to clear the file fields
        s.running = False
        s.has_suggestion = False
        s.progress = 0.0
        s.progress_text = ""
        s.message = "Load an image to start."
        s.message_kind = "info"
        s.out_path = str(self.session.out_path) if self.session.out_path else ""
        s.download_name = "segmentation.seg.nrrd"
        s.max_upload_bytes = self.session.limits.upload_bytes
        s.change("effect", "brush")(self._on_effect)
        s.change("window_preset")(self._on_window_preset)
        s.change("orientation")(self._on_orientation)
        s.change("active_segment")(self._on_active_segment)

    def _say(self, text: str, kind: str = "info") -> None:
        self.state.message = text
        self.state.message_kind = kind
        (log.warning if kind == "error" else log.info)(text)

    def _guard(self, action):
        """Run a page action; a UniverSeg error becomes the page's message, never a crash."""
        try:
            return action()
        except UniverSegError as exc:
            self._say(one_line(exc), "error")
        except Exception as exc:  # noqa: BLE001 - the server must survive any page action
            log.exception("internal error")
            self._say(f"internal error ({type(exc).__name__}: {one_line(exc)})", "error")
        return None

    def refresh(self) -> None:
        """Push the session (segments, undo, status lines, slice strip) to the page."""
        s, session = self.state, self.session
        self._refresh_handle = None
        s.has_volume = session.volume_node is not None
        s.volume_name = session.volume_node.GetName() if session.volume_node else ""
        s.segments = session.segments()
        s.active_segment = session.active_segment_id
        s.can_undo = session.undo_stack.can_undo()
        s.can_redo = session.undo_stack.can_redo()
        s.download_name = session.download_name()
        s.unsaved = session.has_unsaved_changes()
        if not s.has_volume:
            s.status_lines, s.slice_kinds = [], []
            return
        axis, index = session.view_position(self.view)
        s.slice_index = -1 if index is None else index
        s.slice_count = session.slice_count(axis)
        statuses = session.statuses(axis)
        s.status_lines = [rules.status_line(st) for st in statuses]
        active = [st for st in statuses if st.segment_id == s.active_segment]
        s.slice_kinds = rules.slice_kinds(active[0]) if active else []

    def _schedule_refresh(self, *_args) -> None:
        """Coalesce the many modified events of a paint stroke into one refresh."""
        if self._loop is None or self._refresh_handle is not None:
            return

        def run():
            with self.state:
                self._guard(self.refresh)

        self._refresh_handle = self._loop.call_later(0.15, run)

    def _on_view_modified(self) -> None:
        if self.session.volume_node is None:
            return
        axis, index = self.session.view_position(self.view)
        index = -1 if index is None else index
        count = self.session.slice_count(axis)
        if (self.state.slice_index, self.state.slice_count) != (index, count):
            with self.state:
                self.state.slice_index, self.state.slice_count = index, count

    # ------------------------------------------------------------------ actions

    def load(self, image=None, labels=None) -> None:
        """Load the command line's image and segmentation (errors raise)."""
        if image:
            self.session.load_image(image)
            self._show_volume()
        if labels:
            self.session.load_segmentation(labels)
        if image:
            self._say(
                f"Loaded {Path(image).name}" + (f" and {Path(labels).name}" if labels else "")
            )
        self.refresh()

    def _show_volume(self) -> None:
        dm = self.slicer_app.display_manager
        dm.show_volume_in_slice_background(self.session.volume_node)
        dm.show_volume_in_slice_foreground(None)
        self.view.set_orientation(self.state.orientation)
        dm.reset_views()
        self._default_window()

    def _default_window(self) -> None:
        """Open a volume with the window its modality or intensities call for (a CT: soft
        tissue; otherwise Slicer's automatic window)."""
        from trame_slicer.utils import vtk_image_to_np

        values = vtk_image_to_np(self.session.volume_node.GetImageData())
        preset = rules.default_window_preset(values, self.session.modality())
        self._apply_window(preset)
        self.state.window_preset = preset

    def on_upload(self, kind: str, files) -> None:
        """Upload from the page (``kind`` image or segmentation); one file. A file that would
        replace unsaved changes waits for the user's answer (:meth:`on_confirm`)."""

        def action():
            if not files:
                raise InputError("no file received")
            if len(files) != 1:
                raise InputError("upload one file at a time")
            f = files[0]
            content = f.get("content")
            if isinstance(content, list):
                content = b"".join(content)
            upload = (kind, f.get("name"), content, f.get("size"))
            try:
                self._load_upload(*upload)
            except UnsavedChanges as exc:
                self._pending_upload = upload
                self.state.confirm_text = f"{one_line(exc)}."
                self.state.confirm_open = True

        self._guard(action)
        self.state.upload_key += 1  # the file fields never keep a name (refused or loaded)

    def _load_upload(self, kind, name, content, size, discard_changes=False) -> None:
        name = self.session.upload(kind, name, content, size, discard_changes=discard_changes)
        if kind == "image":
            self._show_volume()
        self._say(f"Loaded {name}")
        self.refresh()

    def on_confirm(self, discard: bool) -> None:
        """The user's answer about unsaved changes: discard them and open the waiting file, or
        keep them (the file is dropped)."""
        upload, self._pending_upload = self._pending_upload, None
        self.state.confirm_open = False
        if upload is None:
            return
        if discard:
            self._guard(lambda: self._load_upload(*upload, discard_changes=True))
        else:
            self._say(f"Kept your changes; {upload[1]} was not opened.")

    def on_upload_refused(self, name, size) -> None:
        """The page refused a file before sending it (over the size limit)."""
        self._guard(lambda: check_upload(str(name), None, "image", self.session.limits, int(size)))
        self.state.upload_key += 1

    def _on_effect(self, effect, brush, **_):
        if effect in EFFECTS:
            self._guard(lambda: self.session.set_effect(effect, brush))
            self.state.effect_active = self.session.effect_name()

    def _on_window_preset(self, window_preset, **_):
        if self.session.volume_node is not None:
            self._guard(lambda: self._apply_window(window_preset))

    def _apply_window(self, preset: str) -> None:
        from trame_slicer.core.volume_window_level import VolumeWindowLevel
        from trame_slicer.utils import vtk_image_to_np

        volume = self.session.volume_node
        if preset == "Auto":
            VolumeWindowLevel.get_volume_display_node(volume).SetAutoWindowLevel(1)
            return
        values = vtk_image_to_np(volume.GetImageData())
        window, level = rules.window_level(preset, values)
        VolumeWindowLevel.set_volume_node_window_level(volume, window, level)

    def _on_orientation(self, orientation, **_):
        if orientation not in ORIENTATIONS:
            return
        self.view.set_orientation(orientation)
        self.view.fit_view_to_content()
        self._guard(self.refresh)

    def _on_active_segment(self, active_segment, **_):
        if active_segment and active_segment != self.session.active_segment_id:
            self._guard(lambda: self.session.select_segment(active_segment))
            self._guard(self.refresh)

    def on_add_segment(self) -> None:
        def action():
            self.session.add_segment(self.state.new_segment_name)
            self._say(f"Added segment {self.state.new_segment_name.strip()}")
            self.state.new_segment_name = ""
            self.refresh()

        self._guard(action)

    def on_undo(self) -> None:
        self._guard(self.session.undo)
        self._guard(self.refresh)

    def on_redo(self) -> None:
        self._guard(self.session.redo)
        self._guard(self.refresh)

    def on_mark_slice(self, labeled: bool = True) -> None:
        def action():
            axis, index = self.session.view_position(self.view)
            if index is None:
                raise UsageError("the view shows no slice of the volume")
            status = self.session.mark_slice(axis, index, labeled)
            verb = "marked as labeled" if labeled else "unmarked"
            self._say(f"{status.name}: slice {index} {verb}")
            self.refresh()

        self._guard(action)

    def on_clear_predictions(self) -> None:
        def action():
            erased = self.session.clear_predictions()
            self._say(f"Erased {len(erased)} predicted slices")
            self.refresh()

        self._guard(action)

    def on_go_to_suggested(self) -> None:
        """Show the next slice to paint that the last run suggested."""
        if not self._suggested:
            return

        def action():
            index = self._suggested[self._suggested_next % len(self._suggested)]
            self._suggested_next += 1
            self.session.go_to_slice(self.view, index)
            self._say(
                f"Suggested: paint slice {index} (or mark it labeled if the structure "
                "is absent there)"
            )
            self.refresh()

        self._guard(action)

    def on_propagate(self) -> None:
        """Start a propagation without blocking the page (Cancel stays clickable). One run at a
        time: a click while a run is in progress (a double click) changes nothing; the running
        state belongs to the run that set it and is cleared only when that run ends."""
        if self._run_task is not None or self.session.running:
            return
        self.state.running = True
        self.state.progress = 0.0
        self.state.progress_text = "starting"
        self._say("Propagating...")
        self._run_task = asyncio.get_running_loop().create_task(self._propagate())

    async def _propagate(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()

        def progress(fraction, text):  # worker thread -> the event loop
            loop.call_soon_threadsafe(self._set_progress, float(fraction), str(text))

        try:
            report = await self.session.propagate(progress=progress, view=self.view)
            text, kind = report.message(), "info"
            self._suggested, self._suggested_next = list(report.suggested), 0
            with self.state:
                self.state.has_suggestion = bool(report.suggested)
        except Cancelled:
            text, kind = "Cancelled: nothing changed.", "info"
        except UniverSegError as exc:
            text, kind = one_line(exc), "error"
        except Exception as exc:  # noqa: BLE001
            log.exception("propagation failed")
            text, kind = f"internal error ({type(exc).__name__}: {one_line(exc)})", "error"
        with self.state:
            self._run_task = None
            self.state.running = False
            self.state.progress_text = ""
            self._guard(self.refresh)
            self._say(text, kind)
        log.info("propagation finished in %.2f s", time.perf_counter() - t0)

    def _set_progress(self, fraction: float, text: str) -> None:
        if not self.state.running:
            return
        with self.state:
            self.state.progress = round(100 * fraction, 1)
            self.state.progress_text = text

    def on_cancel(self) -> None:
        if self.session.running:
            self.session.cancel()
            self.state.progress_text = "cancelling"

    def on_save(self) -> None:
        def action():
            path = self.session.save()
            self._say(f"Saved {path}")
            self.refresh()

        self._guard(action)

    def on_download(self):
        """Bytes of the segmentation for the browser's download (None after an error)."""
        data = self._guard(self.session.save_bytes)
        if data is None:
            return None
        self._say(f"Downloaded {self.session.download_name()}")
        self._guard(self.refresh)
        return self.server.protocol.addAttachment(data)

    # ------------------------------------------------------------------ page

    def _upload_input(self, kind: str, label: str):
        from trame.widgets import vuetify3 as v3

        trigger = self.ctrl.trigger_name(lambda files, k=kind: self.on_upload(k, files))
        refused = self.ctrl.trigger_name(self.on_upload_refused)
        v3.VFileInput(
            id=f"upload-{kind}",
            label=label,
            density="compact",
            hide_details=True,
            show_size=True,
            disabled=("running",),
            prepend_icon="mdi-file-upload",
            key=(f"'{kind}-' + upload_key",),  # a new key: a new, empty field
            change=(
                "(f => { if (!f) return; "
                f"if (f.size > max_upload_bytes) trigger('{refused}', [f.name, f.size]); "
                f"else trigger('{trigger}', [$event.target.files]); "
                "})($event.target.files && $event.target.files[0])"
            ),
            classes="mb-2",
        )

    def _build_ui(self) -> None:
        from trame.ui.vuetify3 import VAppLayout
        from trame.widgets import html
        from trame.widgets import vuetify3 as v3

        ctrl = self.ctrl
        with VAppLayout(self.server, full_height=True) as self.ui:
            self.ui.root.theme = "dark"
            with v3.VAppBar(density="compact"):
                v3.VToolbarTitle("UniverSeg annotation")
                html.Span("{{ volume_name }}", id="volume-name", classes="mx-4 text-caption")
                v3.VSpacer()
                html.Div(
                    "{{ message }}",
                    id="message",
                    __properties=[("data_kind", "data-kind")],
                    data_kind=("message_kind",),
                    classes=(
                        "message_kind === 'error' ? 'text-error mx-4 text-body-2' : "
                        "'mx-4 text-body-2'",
                    ),
                )
            with v3.VDialog(v_model=("confirm_open",), persistent=True, max_width=520):
                with v3.VCard(id="confirm-dialog"):
                    v3.VCardTitle("Unsaved changes")
                    v3.VCardText("{{ confirm_text }}", id="confirm-text")
                    with v3.VCardActions():
                        v3.VSpacer()
                        v3.VBtn(
                            "Keep my work", id="confirm-keep", click=(self.on_confirm, "[false]")
                        )
                        v3.VBtn(
                            "Discard and open",
                            id="confirm-discard",
                            color="error",
                            click=(self.on_confirm, "[true]"),
                        )
            with v3.VNavigationDrawer(permanent=True, width=380, location="left"):
                with html.Div(classes="pa-3"):
                    html.Div("Image", classes="text-overline")
                    self._upload_input("image", "Open image (.nrrd, .nii.gz, .mha)")
                    self._upload_input("segmentation", "Open segmentation (.seg.nrrd)")
                    with html.Div(classes="d-flex ga-2"):
                        v3.VSelect(
                            id="orientation",
                            label="View",
                            items=("orientations", list(ORIENTATIONS)),
                            v_model=("orientation",),
                            density="compact",
                            hide_details=True,
                        )
                        v3.VSelect(
                            id="window-preset",
                            label="Window",
                            items=("window_presets",),
                            v_model=("window_preset",),
                            density="compact",
                            hide_details=True,
                        )

                    html.Div("Segments", classes="text-overline mt-3")
                    with v3.VList(id="segments", density="compact", classes="py-0"):
                        with v3.VListItem(
                            v_for="seg in segments",
                            key="seg.id",
                            active=("seg.id === active_segment",),
                            click="active_segment = seg.id",
                            classes="segment-row",
                            __properties=[("data_name", "data-name")],
                            data_name=("seg.name",),
                        ):
                            with html.Div(classes="d-flex align-center"):
                                html.Span(
                                    style=(
                                        "{ display: 'inline-block', width: '12px', height: "
                                        "'12px', borderRadius: '3px', background: seg.color, "
                                        "marginRight: '8px' }",
                                    )
                                )
                                html.Span("{{ seg.name }}")
                    with html.Div(classes="d-flex ga-2 mt-1"):
                        v3.VTextField(
                            id="new-segment-name",
                            v_model=("new_segment_name",),
                            label="New segment",
                            density="compact",
                            hide_details=True,
                            disabled=("!has_volume || running",),
                        )
                        v3.VBtn(
                            "Add",
                            id="add-segment",
                            click=self.on_add_segment,
                            disabled=("!has_volume || running || !new_segment_name",),
                        )

                    html.Div("Edit", classes="text-overline mt-3")
                    html.Div(HINT, id="hint", classes="text-caption mb-1")
                    with v3.VBtnToggle(
                        id="effects",
                        v_model=("effect",),
                        mandatory=True,
                        density="compact",
                        divided=True,
                        disabled=("!active_segment || running",),
                    ):
                        for name, icon in (
                            ("none", "mdi-cursor-default"),
                            ("paint", "mdi-brush"),
                            ("erase", "mdi-eraser"),
                            ("scissors", "mdi-content-cut"),
                        ):
                            v3.VBtn(
                                name.capitalize(),
                                id=f"effect-{name}",
                                value=name,
                                prepend_icon=icon,
                                size="small",
                            )
                    v3.VSlider(
                        id="brush",
                        v_model=("brush",),
                        min=1,
                        max=30,
                        step=1,
                        label="Brush %",
                        density="compact",
                        hide_details=True,
                        thumb_label=True,
                        classes="mt-2",
                    )
                    with html.Div(classes="d-flex ga-2"):
                        v3.VBtn(
                            "Undo",
                            id="undo",
                            prepend_icon="mdi-undo",
                            click=self.on_undo,
                            disabled=("!can_undo || running",),
                            size="small",
                        )
                        v3.VBtn(
                            "Redo",
                            id="redo",
                            prepend_icon="mdi-redo",
                            click=self.on_redo,
                            disabled=("!can_redo || running",),
                            size="small",
                        )

                    html.Div("UniverSeg", classes="text-overline mt-3")
                    with html.Div(classes="d-flex ga-2 flex-wrap"):
                        v3.VBtn(
                            "Propagate",
                            id="propagate",
                            color="primary",
                            prepend_icon="mdi-layers-triple",
                            click=self.on_propagate,
                            disabled=("!active_segment || running",),
                        )
                        v3.VBtn(
                            "Cancel",
                            id="cancel",
                            click=self.on_cancel,
                            disabled=("!running",),
                        )
                    v3.VProgressLinear(
                        id="progress",
                        v_show=("running",),
                        model_value=("progress",),
                        height=6,
                        color="primary",
                        classes="mt-2",
                    )
                    html.Div(
                        "{{ progress_text }}",
                        id="progress-text",
                        v_show=("running",),
                        classes="text-caption",
                    )
                    with html.Div(classes="d-flex ga-2 mt-2 flex-wrap"):
                        v3.VBtn(
                            "Mark slice labeled",
                            id="mark-slice",
                            size="small",
                            click=lambda: self.on_mark_slice(True),
                            disabled=("!active_segment || running",),
                        )
                        v3.VBtn(
                            "Clear prediction",
                            id="clear-prediction",
                            size="small",
                            click=self.on_clear_predictions,
                            disabled=("!active_segment || running",),
                        )
                        v3.VBtn(
                            "Go to suggested slice",
                            id="suggested-slice",
                            size="small",
                            click=self.on_go_to_suggested,
                            disabled=("!has_suggestion || running",),
                        )
                    # which slices of the active segment are labeled / predicted / corrected
                    with html.Div(
                        id="slice-strip",
                        classes="d-flex mt-2",
                        style="height: 14px; gap: 1px;",
                    ):
                        html.Div(
                            v_for="(kind, i) in slice_kinds",
                            key="i",
                            title=("`slice ${i}: ${kind || 'not labeled'}`",),
                            style=(
                                "{ flex: '1 1 0', background: "
                                f"({KIND_COLORS!r})[kind], "
                                "outline: i === slice_index ? '2px solid white' : 'none' }",
                            ),
                        )
                    with html.Div(classes="text-caption d-flex ga-3 mt-1"):
                        for kind in ("labeled", "corrected", "predicted"):
                            html.Span(f"\u25a0 {kind}", style=f"color: {KIND_COLORS[kind]}")
                    with html.Div(id="status", classes="mt-2"):
                        html.Div(
                            "{{ line }}",
                            v_for="line in status_lines",
                            key="line",
                            classes="status-line text-body-2",
                        )

                    html.Div("Save", classes="text-overline mt-3")
                    with html.Div(classes="d-flex ga-2"):
                        v3.VBtn(
                            "Save",
                            id="save",
                            v_if=("out_path",),
                            prepend_icon="mdi-content-save",
                            disabled=("!has_volume || running",),
                            click=self.on_save,
                        )
                        v3.VBtn(
                            "Download",
                            id="download",
                            prepend_icon="mdi-download",
                            disabled=("!has_volume || running",),
                            click=(
                                "utils.download(download_name, "
                                f"trigger('{ctrl.trigger_name(self.on_download)}'), "
                                "'application/octet-stream')"
                            ),
                        )
                    html.Div(
                        "{{ (out_path ? 'Save writes ' + out_path + '; ' : '') + "
                        "(unsaved ? 'unsaved changes' : 'no unsaved changes') }}",
                        id="save-state",
                        classes="text-caption text-truncate",
                        title=("out_path",),
                    )
            with v3.VMain(), html.Div(style="position: relative; height: calc(100vh - 48px);"):
                html.Div(
                    "{{ slice_index >= 0 ? `Slice ${slice_index} (0-${slice_count - 1})` "
                    ": 'Outside the volume' }}",
                    id="slice-number",
                    v_show=("has_volume",),
                    classes="text-body-2",
                    style=(
                        "position: absolute; top: 8px; right: 8px; z-index: 5; padding: 2px 8px; "
                        "border-radius: 4px; background: rgba(0, 0, 0, 0.6); color: white; "
                        "pointer-events: none;"
                    ),
                )
                self.layout_manager.initialize_layout_grid(self.ui)

    # ------------------------------------------------------------------ start

    def start(self, host: str, port: int, ready=None) -> None:
        """Serve until interrupted; ``ready(url)`` is called once the port is known."""

        def on_ready(**_):
            self._loop = asyncio.get_running_loop()
            self.hosts = rules.served_hosts(host, self.server.port)
            url = self.url(host, self.server.port)
            if ready is not None:
                ready(url)

        self.ctrl.on_server_ready.add(on_ready)
        os.environ.setdefault("TRAME_ARGS", "--server")  # trame must not parse our arguments
        self.server.start(
            host=host,
            port=port,
            open_browser=False,
            show_connection_info=False,
            timeout=0,
            disable_logging=True,
        )


def serve(
    image=None,
    labels=None,
    out=None,
    host="127.0.0.1",
    port=0,
    allow_remote=False,
    max_upload_mb=DEFAULT_MAX_UPLOAD_MB,
    max_image_mb=DEFAULT_MAX_IMAGE_MB,
    max_voxels=DEFAULT_MAX_VOXELS,
    options=None,
) -> int:
    """``universeg-slicer web``: check the arguments, load the files, serve the page.
    ``options``: the :class:`~UniverSegLogic.core.propagator.PropagationOptions` of every run."""
    warning = rules.check_host(host, allow_remote)
    limits = UploadLimits.from_options(max_upload_mb, max_image_mb, max_voxels)
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkOSOpenGLRenderWindow")
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Platform")
    app = WebApp(out_path=out, limits=limits, options=options)
    app.load(image, labels)

    def ready(url):
        if warning:
            print(warning, file=sys.stderr, flush=True)
        print(f"universeg-slicer web: serving {url}", flush=True)

    app.start(host, port, ready)
    app.session.close()
    return 0
