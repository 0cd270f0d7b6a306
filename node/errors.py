"""The preannot exception tree.

Every error the node raises on purpose derives from :class:`PreannotError`, so callers can catch
the whole family at a boundary (the SCP turns them into DICOM statuses, the worker into a failed
job with its reason, the CLI into a message and exit code 2)::

    PreannotError
    ├── ConfigError              the configuration file or environment is invalid
    ├── SpoolError               an instance could not be persisted
    │   └── OutOfSpaceError      the disk is full or below the configured reserve (-> 0xA700)
    ├── InvalidInstanceError     a received object cannot be understood (-> 0xC000 range)
    ├── VolumeError              a series cannot be turned into a 3D volume (mixed sizes, ...): permanent
    │   └── MissingSlicesError   slices are missing from the stack (a hole in the spacing)
    ├── ModelError               a model bundle is missing, broken or failed while running
    │   ├── ModelTimeoutError    inference ran past the job timeout
    │   ├── ModelRefusedError    the model's card says it is not for this input (modality, inputs): permanent
    │   ├── BundleError          the bundle's code failed as it will again (a missing key, a wrong type): permanent
    │   ├── InputsPendingError   a study-level model's input series has not arrived yet: the job waits, not counted
    │   └── ComputeLostError     the Ray actor (or its server) running the job went away: requeued, not counted
    ├── OutputError              a DICOM SEG / SR could not be built
    ├── DeliveryError            a destination refused or could not be reached
    ├── NotFoundError            no job / series / model with that id (HTTP 404)
    │   └── JobNotFoundError
    └── ConflictError            the state does not allow the action (HTTP 409)
        └── JobError             a job state transition is not allowed

Each class carries the HTTP status an API answer uses for it (``http_status``), so the web layer maps
errors by type, never by reading their text, and whether retrying can help (``permanent``): a job that
fails with a permanent error is dead at its first attempt.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "ComputeLostError",
    "ConfigError",
    "ConflictError",
    "DeliveryError",
    "InputsPendingError",
    "InvalidInstanceError",
    "JobError",
    "JobNotFoundError",
    "MissingSlicesError",
    "ModelError",
    "ModelRefusedError",
    "ModelTimeoutError",
    "NotFoundError",
    "OutOfSpaceError",
    "OutputError",
    "PreannotError",
    "SpoolError",
    "VolumeError",
]


class PreannotError(Exception):
    """Root of every error raised on purpose by preannot."""

    #: the HTTP status an API answer uses for this kind of error
    http_status: int = 500
    #: the same input fails the same way every time: a job failing with it is not retried
    permanent: bool = False


class ConfigError(PreannotError):
    """The configuration is invalid; the message names the key and the bad value."""

    http_status = 400


class SpoolError(PreannotError):
    """A received instance could not be written to the spool."""


class OutOfSpaceError(SpoolError):
    """The spool disk is full or below the configured free-space reserve."""


class InvalidInstanceError(PreannotError):
    """A received object is not a dataset the node can index."""


class VolumeError(PreannotError):
    """A series cannot be assembled into a 3D volume (the input itself is at fault: not retried)."""

    permanent = True


class MissingSlicesError(VolumeError):
    """The stack has a hole: slices of the series are missing."""


class ModelError(PreannotError):
    """A model bundle is missing, broken, or failed while running."""


class ModelTimeoutError(ModelError):
    """Inference ran past the job timeout."""


class ModelRefusedError(ModelError):
    """The model's card says it is not for this input (another modality, inputs it does not describe): the same
    input is refused the same way every time."""

    permanent = True


class BundleError(ModelError):
    """The bundle's own code failed in a way the same input repeats (a key it expects missing, a wrong type or
    shape): not retried."""

    permanent = True


class InputsPendingError(ModelError):
    """A study-level model's input series is not there yet (or still arriving): the job waits and runs again
    without counting the attempt, until its inputs are there or the wait (``[jobs] inputs_wait_seconds``) ends."""

    def __init__(self, message: str, *, retry_in: float = 5.0) -> None:
        super().__init__(message)
        #: seconds until it is worth looking again
        self.retry_in = retry_in


class ComputeLostError(ModelError):
    """The compute running the job (a Ray actor, its process or its server) went away mid-job: the job is
    put back in the queue without counting the attempt and runs on another actor."""


class OutputError(PreannotError):
    """A result object (SEG, SR) could not be built."""


class DeliveryError(PreannotError):
    """A destination refused a result or could not be reached."""


class NotFoundError(PreannotError):
    """No object (job, series, model) with the id given."""

    http_status = 404


class ConflictError(PreannotError):
    """The object's current state does not allow the action asked for."""

    http_status = 409


class JobError(ConflictError):
    """A job state transition that is not allowed."""


class JobNotFoundError(JobError, NotFoundError):
    """No job with that id (a JobError too, for callers that catch every job error)."""

    http_status = 404
