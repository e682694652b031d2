"""Medical I/O, HU handling, the CT-RATE reader, phantoms and previews."""

from ctflow.data.volume import CANONICAL_AXCODES, Volume, canonical_affine

__all__ = ["CANONICAL_AXCODES", "Volume", "canonical_affine"]
