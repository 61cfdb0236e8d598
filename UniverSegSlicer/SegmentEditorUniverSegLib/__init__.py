"""The Segment Editor effect "UniverSeg" (registered by the UniverSegSlicer module)."""

from SegmentEditorEffects.AbstractScriptedSegmentEditorAutoCompleteEffect import *  # noqa: F403
from SegmentEditorEffects.AbstractScriptedSegmentEditorEffect import *  # noqa: F403

from .SegmentEditorEffect import SegmentEditorEffect  # noqa: F401
