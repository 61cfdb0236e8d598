"""Developer tools, never installed by the wheel nor shipped in the Slicer extension: data
preparation, training, fusion calibration, evaluation against Fill between slices, the session
and cohort evaluations, probes and figures.

Run from a checkout: ``python -m UniverSegResearch COMMAND`` (``data``, ``train``,
``calibrate``, ``evaluate``). Their extra dependencies: ``pip install -e ".[research]"``.
The package depends on the runtime (``UniverSegLogic``), never the other way round.
"""
