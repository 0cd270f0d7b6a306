"""The preannot exception tree.

Every error the node raises on purpose derives from :class:`PreannotError`, so callers can catch
the whole family at a boundary (the SCP turns them into DICOM statuses, the worker into a failed
job with its reason, the CLI into a message and exit code 2)::

    PreannotError
    ├── ConfigError              the configuration file or environment is invalid
    ├── SpoolError               an instance could not be persisted
    │   └── OutOfSpaceError      the disk is full or below the configured reserve (-> 0xA700)
    ├── InvalidInstanceError     a received object cannot be understood (-> 0xC000 range)
    ├── VolumeError              a series cannot be turned into a 3D volume (mixed sizes, gaps, ...)
    ├── ModelError               a model bundle is missing, broken or failed while running
    │   └── ModelTimeoutError    inference ran past the job timeout
    ├── OutputError              a DICOM SEG / SR could not be built
    ├── DeliveryError            a destination refused or could not be reached
    └── JobError                 a job id / state transition is invalid
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DeliveryError",
    "InvalidInstanceError",
    "JobError",
    "ModelError",
    "ModelTimeoutError",
    "OutOfSpaceError",
    "OutputError",
    "PreannotError",
    "SpoolError",
    "VolumeError",
]


class PreannotError(Exception):
    """Root of every error raised on purpose by preannot."""


class ConfigError(PreannotError):
    """The configuration is invalid; the message names the key and the bad value."""


class SpoolError(PreannotError):
    """A received instance could not be written to the spool."""


class OutOfSpaceError(SpoolError):
    """The spool disk is full or below the configured free-space reserve."""


class InvalidInstanceError(PreannotError):
    """A received object is not a dataset the node can index."""


class VolumeError(PreannotError):
    """A series cannot be assembled into a 3D volume."""


class ModelError(PreannotError):
    """A model bundle is missing, broken, or failed while running."""


class ModelTimeoutError(ModelError):
    """Inference ran past the job timeout."""


class OutputError(PreannotError):
    """A result object (SEG, SR) could not be built."""


class DeliveryError(PreannotError):
    """A destination refused a result or could not be reached."""


class JobError(PreannotError):
    """An unknown job, or a state transition that is not allowed."""
