"""Re-export of :mod:`genedml_sd.datasets._layouts.wsi`."""

from genedml_sd.datasets._layouts.wsi import (  # noqa: F401
    aperio_description,
    write_huge,
    write_svs,
)
