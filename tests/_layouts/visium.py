"""Re-export of :mod:`genedml_sd.datasets._layouts.visium`."""

from genedml_sd.datasets._layouts.visium import (  # noqa: F401
    VisiumTruth,
    hex_lattice,
    write_visium,
)
