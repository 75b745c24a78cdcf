"""Physical tile geometry: sizes in µm and px of the local tile and the neighbour region."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TileGeometry:
    """Size of the tiles cut around each spot.

    Parameters
    ----------
    tile_um
        Side of one tile in µm (112 µm in the paper: 224 px at 0.5 µm/px).
    tile_px
        Side of one output tile in px (224 for ViT encoders).
    grid
        The neighbour region is ``grid x grid`` tiles centred on the spot (5 in the paper:
        560 µm, 1120 px at 0.5 µm/px).
    """

    tile_um: float = 112.0
    tile_px: int = 224
    grid: int = 5

    def __post_init__(self) -> None:
        if not self.tile_um > 0:
            raise ValueError(f"tile_um must be > 0 µm, got {self.tile_um!r}.")
        if int(self.tile_px) != self.tile_px or self.tile_px < 1:
            raise ValueError(f"tile_px must be a positive integer, got {self.tile_px!r}.")
        if int(self.grid) != self.grid or self.grid < 1 or self.grid % 2 == 0:
            raise ValueError(
                f"grid must be a positive odd integer (the spot sits in the centre tile), got {self.grid!r}."
            )

    @property
    def um_per_px(self) -> float:
        """Target resolution of the tiles, µm/px."""
        return self.tile_um / self.tile_px

    @property
    def region_um(self) -> float:
        """Side of the neighbour region, µm."""
        return self.tile_um * self.grid

    @property
    def region_px(self) -> int:
        """Side of the neighbour region, px."""
        return self.tile_px * self.grid

    @property
    def n_neighbours(self) -> int:
        """Number of neighbour tokens, ``grid**2``."""
        return self.grid * self.grid

    def to_dict(self) -> dict:
        """JSON-safe dict, used in feature-cache keys and saved models."""
        return {"tile_um": float(self.tile_um), "tile_px": int(self.tile_px), "grid": int(self.grid)}

    def key(self) -> str:
        """Short stable string identifying the geometry (e.g. ``"112um-224px-g5"``)."""
        return f"{self.tile_um:g}um-{self.tile_px}px-g{self.grid}"

    @classmethod
    def from_dict(cls, d: dict) -> TileGeometry:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: d[k] for k in asdict(cls()) if k in d})
