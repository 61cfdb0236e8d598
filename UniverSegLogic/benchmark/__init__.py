"""``universeg-slicer benchmark``: what users and developers time (never shipped in the Slicer
extension): :mod:`speed` (reference forward pass vs the inference engine, end-to-end
propagation), :mod:`clinical` (the annotation loop on a 512x512x400 CT against Slicer's Fill
between slices on the same painting, with peak memory and Dice), :mod:`cohort_scaling` (cohort
labeling on 1 and 2 local Dask workers) and the synthetic cohorts they run on
(:mod:`synthetic`)."""
