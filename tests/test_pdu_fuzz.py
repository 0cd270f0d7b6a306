"""PDU-level fuzzing of the node's DICOM listener from raw sockets (tests/pdufuzz.py).

After every malformed PDU or abusive association sequence a known caller must get its C-ECHO answered
within 1 s (no lock-out), the listener stays up (no crash) and nothing is stored. `make test` runs 150
cases; `make soak` (PREANNOT_SOAK=1) runs 1,200 and writes the figures to $PREANNOT_FAULT_REPORT.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.conftest import wait_for
from tests.pdufuzz import FuzzTarget, cases
from tests.test_faults import SOAK, report

SEED = int(os.environ.get("PREANNOT_FUZZ_SEED", "20261125"))
CASES = 1200 if SOAK else 150


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _echo_seconds(ae: AE, port: int) -> float | None:
    """Seconds from a known caller's connection to its C-ECHO answered (association + echo; the release
    follows, untimed), or None when it is not answered."""
    t0 = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title="PREANNOT")
    try:
        if not assoc.is_established:
            return None
        status = assoc.send_c_echo()
        took = time.monotonic() - t0
        if not status or status.Status != 0x0000:
            return None
    finally:
        if assoc.is_established:
            assoc.release()
    return took


@pytest.mark.timeout(1800)
def test_malformed_pdus_never_lock_out_a_known_caller(make_node: Callable[..., Any], small_series: Path) -> None:
    # the PACS (TESTSCU) is bound to its host; the fuzzer also plays an allowed but broken sender (FUZZSCU) from
    # two other addresses, so that malformed traffic inside accepted associations is tried too
    node = make_node(stable=60, allowed='["TESTSCU", "FUZZSCU"]',
                     extra='[node.caller_hosts]\nTESTSCU = ["127.0.0.1/32"]\n')
    port = node.listener.port
    target = FuzzTarget(host="127.0.0.1", port=port, sources=("127.0.0.2", "127.0.0.3"), known_ae=b"FUZZSCU")
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 1.0
    assert _echo_seconds(ae, port) is not None
    threads_before = threading.active_count()
    rss_start = rss_max = _rss_mb()

    kinds: collections.Counter[str] = collections.Counter()
    slow: list[tuple[int, str, float | None]] = []
    pdus = 0
    times: list[float] = []
    for n, case in enumerate(cases(SEED, CASES, target)):
        with contextlib.suppress(OSError):  # the node refusing or resetting the connection is a fine answer
            pdus += case.run(target)
        kinds[case.name] += 1
        took = _echo_seconds(ae, port)
        if took is None or took > 1.0:
            slow.append((n, case.name, took))
        times.append(took if took is not None else 99.0)
        rss_max = max(rss_max, _rss_mb())
    from node.ingest.scp import PROTOCOL_ERRORS

    assert not slow, f"known caller not answered within 1 s after case(s) (index, kind, s) {slow[:10]}, seed {SEED}"
    assert node.listener.listening

    # nothing was stored, the connections were all let go, and the node still takes a real series
    assert node.series.list_series() == []
    assert not list((node.config.data_dir / "spool").rglob("*.dcm"))
    wait_for(lambda: node.listener.guard.pending() == 0, 15, what="the fuzz connections closed")
    wait_for(lambda: threading.active_count() <= threads_before + 2, 15, what="association threads ended")
    from node.net.scu import send_files

    outcomes = send_files([str(p) for p in sorted(small_series.glob("*.dcm"))], ae_title="PREANNOT",
                          host="127.0.0.1", port=port, calling_ae="TESTSCU")
    assert all(o.ok for o in outcomes)
    report("pdu_fuzz", seed=SEED, cases=CASES, pdus_written=int(pdus), by_kind=dict(sorted(kinds.items())),
           lockouts=len(slow), crashes=0, echo_s_median=round(sorted(times)[len(times) // 2], 3),
           echo_s_p99=round(sorted(times)[int(len(times) * 0.99)], 3), echo_s_worst=round(max(times), 3),
           stored_by_fuzz=0, pynetdicom_protocol_thread_errors=dict(PROTOCOL_ERRORS),
           rss_mb_start=round(rss_start), rss_mb_max=round(rss_max))
    # the node's memory stays bounded whatever the peers announce (its process is this one)
    assert rss_max - rss_start < 300, f"the process grew by {rss_max - rss_start:.0f} MB under the fuzz"
