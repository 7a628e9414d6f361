"""lightning-desa2va: DeSa2VA-style referring video segmentation with swappable components."""

__version__ = "0.1.0"
