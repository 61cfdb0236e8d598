"""The browser annotation app (``universeg-slicer web``), built on trame-slicer.

trame-slicer serves Slicer's own core libraries (MRML scene, slice views, the Segment Editor's
Paint / Erase / Scissors effects and undo) in a web page from plain Python; this package adds the
UniverSeg annotation loop on top: propagate the painted slices with the MRML bridge, show which
slices are labeled, predicted or corrected, and save a ``.seg.nrrd`` that Slicer reads.

Modules
    ``rules``    pure rules, no Slicer, no trame: file-name safety, the access token, which
                 requests come from the app's own page, host binding, window/level presets,
                 the status wording
    ``uploads``  what an upload may be: one self-contained file, bounded once decoded,
                 complete (checked from its header before any reader sees it)
    ``session``  the annotation session on a trame-slicer :class:`SlicerApp` (MRML only, no web
                 server): loading, segments, propagation (run off the UI loop, applied as one undo
                 step), saving
    ``app``      the trame page and server (imports trame; used by ``universeg-slicer web``)

Never shipped in the Slicer extension (``Testing/update_cmake_lists.py`` lists it as not
shipped); installed with ``pip install ".[web]"`` (in a checkout). Importing this package imports
nothing heavy.
"""
