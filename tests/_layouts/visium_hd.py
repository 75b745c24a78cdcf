"""Re-export of :mod:`genedml_sd.datasets._layouts.visium_hd`."""

from genedml_sd.datasets._layouts.visium_hd import (  # noqa: F401
    ANGLE_DEG,
    CROP_PX,
    VisiumHDTruth,
    write_visium_hd,
)
