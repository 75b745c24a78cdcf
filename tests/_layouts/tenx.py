"""Re-export of :mod:`genedml_sd.datasets._layouts.tenx`."""

from genedml_sd.datasets._layouts.tenx import (  # noqa: F401
    write_10x_h5,
    write_pyramid_tiff,
)
