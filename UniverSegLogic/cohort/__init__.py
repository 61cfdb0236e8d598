"""Cohort labeling: segment many target volumes from one or a few labeled reference volumes.

``universeg-slicer cohort`` (:mod:`UniverSegLogic.cli.cohort`) runs :func:`runner.run_cohort`:
every target of a manifest gets its support from the reference volumes brought onto its grid
(:mod:`align`), the same :class:`~UniverSegLogic.core.propagator.Propagator` as everywhere else
(:mod:`case`), and a ``.seg.nrrd``, a JSON record and a PNG montage (:mod:`montage`), on this
machine or a Dask cluster. Not part of the Slicer extension (a command-line and cluster tool).
"""
