"""Re-export of :mod:`genedml_sd.datasets._layouts.her2st`."""

from genedml_sd.datasets._layouts.her2st import (  # noqa: F401
    Source,
    barcodes,
    her2st_b4,
    resize,
)
