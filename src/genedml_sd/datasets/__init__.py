"""Real example data: the HER2ST demo and downloader, and demo datasets in platform output layouts.

:func:`her2st_demo` is shipped with the package; :func:`visium_layout`, :func:`visium_hd_layout`,
:func:`xenium_layout` and :func:`wsi_layout` write Space Ranger, Space Ranger HD, Xenium and Aperio SVS
outputs made from its section B4 (real pixels and counts in simulated layouts);
:func:`add_sopa_embeddings` and :func:`add_lazyslide_features` add tile embeddings in the layouts sopa and
LazySlide write, for trying ``gd.tl.fit(features_key=...)`` without those tools.
"""

from ._her2st import fetch_her2st, her2st, her2st_demo, her2st_registry
from ._layouts.embeddings import add_lazyslide_features, add_sopa_embeddings
from ._platforms import visium_hd_layout, visium_layout, wsi_layout, xenium_layout

__all__ = [
    "add_lazyslide_features",
    "add_sopa_embeddings",
    "fetch_her2st",
    "her2st",
    "her2st_demo",
    "her2st_registry",
    "visium_hd_layout",
    "visium_layout",
    "wsi_layout",
    "xenium_layout",
]
