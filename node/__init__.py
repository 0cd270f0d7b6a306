"""preannot: an imaging pre-annotation DICOM node."""

__version__ = "0.1.0"
__all__ = ["__version__"]
