"""The commented default configuration printed by ``preannot config init``."""

from pathlib import Path

__all__ = ["TEMPLATE", "render_template"]

TEMPLATE = r'''# preannot node configuration. Every key is optional unless marked required.
# Any key can be overridden by an environment variable: PREANNOT_<SECTION>__<KEY>, e.g.
#   PREANNOT_NODE__PORT=11113   PREANNOT_NODE__ALLOWED_CALLERS='["ORTHANC"]'
# Documentation: docs/configuration.md

[node]
ae_title = "PREANNOT"            # our AE title (1-16 characters)
bind = "0.0.0.0"                 # listening address
port = 11112                     # DICOM port
data_dir = "/var/lib/preannot"   # spool, database, outputs (mode 0700)
allowed_callers = ["ORTHANC"]    # calling AE titles accepted; ["*"] accepts any; [] refuses all
# The PACS's address(es): its AE title is refused from anywhere else, and its connections are never held back by
# the limits on not-yet-identified connections (max_pending_*), so slow or hostile hosts cannot lock it out.
caller_hosts = { ORTHANC = ["127.0.0.1/32"] }
max_associations = 10            # concurrent associations
max_pdu = 262144                 # maximum PDU size we receive (bytes; 0 = unlimited)
acse_timeout = 30                # seconds
dimse_timeout = 60               # seconds
network_timeout = 60             # seconds
stable_seconds = 10              # a series is complete after this many seconds without a new instance
late_instances = "reprocess"     # new instances of a processed series: "reprocess" (new job version) or "ignore"
free_space_reserve_mb = 1024     # answer 0xA700 (out of resources) rather than fill the disk below this
unmatched_retention_days = 7     # series matching no route are kept this long
fsync = true                     # fsync every instance before answering Success (keep true in production)
incomplete_hold_minutes = 60     # a series with missing instances waits this long for them, then fails
on_conflict = "keep"             # same SOP Instance UID, other content: "keep" the first or "replace" it

[[destinations]]                 # where results go (repeat the table for several)
name = "pacs"                    # required: referenced by routes.send_to
ae_title = "ORTHANC"             # required
host = "127.0.0.1"               # required
port = 4242                      # required
# calling_ae_title = "PREANNOT"  # our AE title towards this destination (default: node.ae_title)
# timeout = 30
# withdraw_superseded = true     # reprocessed series: send an IOCM rejection note (KOS) for the earlier results

[[routes]]                       # which series go to which models (repeat for several)
name = "chest-ct"                # required, unique
match = { Modality = "CT", BodyPartExamined = ["CHEST", "THORAX"], SliceThickness = "<=2.5" }
# called_ae = ["PREANNOT"]       # only series sent to these AE titles of ours
# min_slices = 5                 # fewer images: skipped (scouts, secondary captures, colour, non-images too)
# expected_count_from = "pacs"   # ask the PACS by C-FIND how many instances the series has
# calling_ae = ["ORTHANC"]       # only series sent by these AE titles
models = ["lesion-ct-demo"]      # required: model folders under [models].dir
send_to = ["pacs"]               # destination names
# stable_seconds = 10            # overrides node.stable_seconds for this route
# min_confidence = 0.5           # findings below this model confidence are not reported
# max_findings = 20              # at most this many findings per label (most confident/largest first)

[models]
dir = "{models_dir}"   # folder of MONAI bundles (only these ever run); relative: to this file's folder
device = "auto"                  # "auto" (CUDA when present), "cpu" or "cuda"
amp = true                       # automatic mixed precision on CUDA
threads = 0                      # torch CPU threads, set once at start (0: torch's default)
preload = true                   # load the routed models when a worker starts

[jobs]
workers = 1                      # parallel jobs
max_attempts = 3                 # attempts before a job is dead
lease_seconds = 900              # a running job not finished by then is taken again
timeout_seconds = 1800           # a job running longer fails with a timeout
backoff_seconds = 10             # first retry delay (doubles each attempt)
backoff_max_seconds = 600
stop_timeout_seconds = 30        # on SIGTERM: a running job may finish this long, then is requeued
inputs_wait_seconds = 600        # study-level models: how long a job waits for the study's other input series

[delivery]
max_attempts = 8                 # attempts per object and destination before it is dead-lettered
backoff_seconds = 5              # first retry delay (doubles each attempt)
backoff_max_seconds = 600
poll_seconds = 1

[outputs]
# uid_root = "1.2.826.0.1.3680043.10.1473."   # UID root for new objects (default: highdicom's)
seg_series_number = 9901
sr_series_number = 9902
# rejection_series_number = 9907 # the IOCM rejection note withdrawing superseded results
# rejection_reason = "quality"   # its title: "quality" (113001) or "patient-safety" (113037)
manufacturer = "preannot"
# institution_name = "My Hospital"
device_serial_number = "preannot-node"
preview_png = true               # write preview.png with the key slices beside the outputs
sr_max_findings = 100            # findings listed in the SR (the SEG keeps all; the SR says how many it leaves out); 0: all

[retention]
spool_days = 7                   # spooled instances go after this, once their jobs and deliveries are settled
outputs_days = 30                # job output folders go after this, once delivered
interval_minutes = 60            # how often the node purges (preannot purge --dry-run shows the plan)

[verdicts]
enabled = true                   # SEG/SR/KO coming back for a study with results: the radiologist's verdict
accept_dice = 0.9                # a kept finding with at least this Dice is "accepted", below it "edited"
alert_acceptance_floor = 0.7     # alert when acceptance over the last alert_window studies is below this
alert_window = 30
baseline_days = 30               # the first N days of verdicts of a model version are its baseline
alert_p = 0.01                   # significance of the drift tests
# fetch_from = "pacs"            # also look for SEG/SR/KO in this destination (when the PACS cannot route them)
fetch_minutes = 60
fetch_days = 14

[followup]
enabled = true                   # match each study's findings to the same patient's prior result (docs/followup.md)
# fetch_from = "pacs"            # also look for the prior there (C-FIND + C-GET) when the node's store has none
max_days = 1095                  # how far back a prior is looked for
min_ncc = 0.7                    # the alignment's quality floor (correlation of the two series over the body)
min_gate_mm = 10                 # same finding: centres within max(min_gate_mm, gate_factor x diameter)
gate_factor = 0.75
growth_pct = 25                  # volume change (%) from which a finding is grown or shrunk

[compute]
backend = "local"                # "ray": model actors on a Ray cluster (docs/operations.md, Scale-out on Ray)
# address = "head:6379"          # an existing Ray cluster; without it the node starts a local Ray
# actors = 2                     # jobs at once, one per actor
# gpus_per_actor = 0             # 1: a whole GPU each; 0.25: four light models' actors share a GPU; 0: CPU actors

[notify]
priorities = ["stat"]            # results of these priorities are announced when ready
# fhir_url = "https://fhir.hospital.local/fhir"    # POST {fhir_url}/DiagnosticReport (preliminary)
# hl7_host = "ris.hospital.local"                  # and/or an HL7 v2 ORU^R01 over MLLP
# hl7_port = 2575

[web]
enabled = true                   # HTTP service: dashboard /, API /docs, metrics /metrics
bind = "127.0.0.1"
port = 8080
# tokens = { ops = "at-least-16-characters-secret" }   # bearer tokens by name; required for actions
auth_reads = false               # true: reads need a token too
'''


def render_template(models_dir: Path | None = None) -> str:
    """The template with an absolute models folder: the given one, else this installation's
    ``models/`` (a checkout), else ``/opt/preannot/models``."""
    if models_dir is None:
        here = Path(__file__).resolve().parents[1] / "models"
        models_dir = here if here.is_dir() else Path("/opt/preannot/models")
    return TEMPLATE.replace("{models_dir}", str(models_dir))
