"""The runtime that ships in the Slicer extension: network, weights, geometry, slicing onto the
network's canvas, support selection, shape prior, inference engine, the :class:`Propagator`
session, restacking and file input/output. No Qt, no MRML."""
