"""The one run path on Slicer nodes: prepare, run (with the fall-back from Apple's GPU to the
CPU), then apply or preview.

The Slicer module, its Segment Editor effect, the browser app and the tests all propagate through
a :class:`Runner`, in the spirit of segment-anything's ``SamPredictor``: its owner keeps one (the
module's logic one for the panel and the effect, the browser app one per session), and the
runner keeps the loaded engines and the propagation sessions between runs, so a correction
followed by another run recomputes only what the correction changed.

A run takes one :class:`~UniverSegLogic.core.propagator.PropagationOptions`, built once by the
caller: it is the one source of the axis (``auto``: the axis the painted slices lie on), the
weights and the device. The engine comes from the runner's
:class:`~UniverSegLogic.core.engines.EngineStore` for exactly those weights and that device.

Threads: :meth:`Runner.prepare` and :meth:`Runner.apply` read and write MRML (main thread);
:meth:`Runner.run` touches no MRML node, so it may run in a worker thread, the fall-back to the
CPU included. Importing this module imports no torch.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from ..core.device import MPS_FALLBACK_MESSAGE, is_mps_unsupported
from ..core.slices import AXIS_AUTO
from .effect import PropagationPreview
from .job import MRMLPropagationResult, PropagationJob
from .session import SessionStore

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]


def default_options():
    """The options of a run that names none: every default, and axis ``auto``."""
    from ..core.propagator import PropagationOptions

    return PropagationOptions(axis=AXIS_AUTO)


class Runner:
    """Prepare, run, apply and preview propagations on Slicer nodes (see the module docstring).

    ``engines``: the :class:`~UniverSegLogic.core.engines.EngineStore` to take engines from
    (default: a new one); ``max_sessions``: propagation sessions kept (least recently used
    dropped); ``fusion``: fusion parameters for every run (default: those calibrated for the
    weights).
    """

    def __init__(self, engines=None, max_sessions: int = 2, fusion=None):
        #: the :class:`~UniverSegLogic.mrml.session.SessionStore` of this runner's sessions
        self.sessions = SessionStore(max_sessions, engines)
        self.fusion = fusion

    @property
    def engines(self):
        """The :class:`~UniverSegLogic.core.engines.EngineStore` runs take their engine from."""
        return self.sessions.engines

    def prepare(
        self,
        volumeNode,
        segmentationNode,
        segmentIds: Optional[Sequence[str]] = None,
        options=None,
        *,
        mode: str = "fill",
        supportPairs: Sequence = (),
    ) -> PropagationJob:
        """Read and check everything a run needs (main thread); nothing is loaded or written.

        ``segmentIds``: IDs or unique names (default: every segment that is not a review
        output); ``options``: a :class:`~UniverSegLogic.core.propagator.PropagationOptions`
        (default: :func:`default_options`); ``mode``: ``"fill"`` (predict the unlabeled slices
        of the same segment) or ``"new"`` (write ``"<name> (UniverSeg)"`` for review);
        ``supportPairs``: ``(volume node, segmentation node)`` pairs whose segments of the same
        names serve as extra support. Raises :class:`~UniverSegLogic.errors.MRMLError` on bad
        input."""
        return PropagationJob(
            volumeNode,
            segmentationNode,
            segmentIds,
            default_options() if options is None else options,
            self.sessions,
            mode=mode,
            supportPairs=supportPairs,
            fusion=self.fusion,
        )

    def run(
        self,
        job: PropagationJob,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
    ) -> PropagationJob:
        """Compute ``job`` (touches no MRML node: may run in a worker thread). The engine is
        loaded first, with ``progress`` and ``cancel`` (PyTorch and the model, first run only).
        When Apple's GPU lacks an operation the run needs, it runs once more on the CPU and the
        job gets a note saying so (``auto`` means the CPU from then on). Returns ``job``."""
        options = job.options
        loaded = self.engines.get(
            options.weights, options.device, progress, cancel, precision=options.precision
        )
        try:
            job.run(progress, cancel)
        except Exception as exc:  # noqa: BLE001 - only the Apple-GPU case is handled
            on_mps = "mps" in (getattr(loaded.engine, "device", ""), job.device)
            if not on_mps or not is_mps_unsupported(exc):
                raise
            self.engines.mps_failed = True
            self.sessions.discard_device("mps")
            job.use_device("cpu")
            self.engines.get(options.weights, "cpu", progress, cancel, precision=options.precision)
            job.run(progress, cancel)
            job.notes.append(MPS_FALLBACK_MESSAGE)
        return job

    def apply(self, job: PropagationJob, undo=None) -> MRMLPropagationResult:
        """Write a computed job into its segmentation (main thread; one undo step: ``undo`` --
        e.g. the Segment Editor's ``saveStateForUndo`` or a ``vtkSegmentationHistory`` -- is
        called once, right before anything is written). Raises
        :class:`~UniverSegLogic.errors.MRMLError` and writes nothing when a propagated segment
        was edited since :meth:`prepare`."""
        return job.apply(undo)

    def propagate(
        self,
        volumeNode,
        segmentationNode,
        segmentIds: Optional[Sequence[str]] = None,
        options=None,
        *,
        mode: str = "fill",
        supportPairs: Sequence = (),
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
        undo=None,
    ) -> MRMLPropagationResult:
        """:meth:`prepare`, :meth:`run` and :meth:`apply` in one call (see them). Raises
        :class:`~UniverSegLogic.errors.MRMLError` (bad input) or another
        :class:`~UniverSegLogic.errors.UniverSegError` (``Cancelled``, ``WeightsError``, ...);
        nothing is changed then."""
        job = self.prepare(
            volumeNode, segmentationNode, segmentIds, options, mode=mode, supportPairs=supportPairs
        )
        self.run(job, progress, cancel)
        return self.apply(job, undo)

    def preview(
        self,
        volumeNode,
        segmentationNode,
        segmentIds: Optional[Sequence[str]] = None,
        options=None,
        *,
        supportPairs: Sequence = (),
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
    ) -> PropagationPreview:
        """A fill-mode propagation as a :class:`~UniverSegLogic.mrml.effect.PropagationPreview`
        (the Segment Editor effect's Initialize / Update): nothing is written and no preview
        node exists yet (call its ``show``)."""
        job = self.prepare(
            volumeNode, segmentationNode, segmentIds, options, supportPairs=supportPairs
        )
        self.run(job, progress, cancel)
        return PropagationPreview(job)

    def clear(self) -> None:
        """Forget every session and engine (e.g. "Reload" in Slicer's developer mode)."""
        self.sessions.clear()
