"""Qt-free helpers of the UniverSeg Slicer module (installed beside the module file)."""
