"""Re-export of :mod:`genedml_sd.datasets._layouts.xenium`."""

from genedml_sd.datasets._layouts.xenium import (  # noqa: F401
    ANGLE_DEG,
    HE_CROP,
    PIXEL_SIZE,
    REGION_UM,
    XeniumTruth,
    cell_id_strings,
    write_xenium,
)
