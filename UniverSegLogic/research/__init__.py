"""Developer tools (not shipped in the Slicer extension): data preparation, training, fusion
calibration, evaluation against Fill between slices, figures and the benchmark.

Install their extra dependencies with ``pip install ".[research]"``.
"""
