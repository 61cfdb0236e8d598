"""Benchmarks (not shipped in the Slicer extension): ``universeg-slicer benchmark``.

:mod:`.clinical` times the annotation loop on a clinical-size CT (512x512 slices, hundreds of
them) against Slicer's Fill between slices on the same painting, with peak memory and Dice.
"""
