"""``universeg-slicer benchmark``: what users and developers time (never shipped in the Slicer
extension): :mod:`speed` (reference forward pass vs the inference engine, end-to-end
propagation), :mod:`cohort_scaling` (cohort labeling on 1 and 2 local Dask workers) and the
synthetic cohorts they run on (:mod:`synthetic`)."""
