"""UniverSeg for 3D Slicer: Qt-free logic (model, weights, slicing, support, engine, restacking,
MRML bridge, CLI, evaluation, training).

Submodules are imported lazily so that ``import UniverSegLogic`` stays cheap (Slicer imports the
module at start-up, before torch may be installed).
"""

__version__ = "0.1.0"
