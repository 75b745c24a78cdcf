"""Real example data: the shipped HER2ST demo and a cached downloader of the full data set."""

from ._her2st import fetch_her2st, her2st, her2st_demo, her2st_registry

__all__ = ["fetch_her2st", "her2st", "her2st_demo", "her2st_registry"]
