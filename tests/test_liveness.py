"""Liveness of a driver's parent run: fresh heartbeat and, on this host, a living process."""

from __future__ import annotations

import os
import time

from mergesec.orchestrator.leases import lease_ttl
from mergesec.orchestrator.tracking import liveness_tags, parent_is_live


def test_parent_liveness():
    now = time.time()
    me = f"{os.uname().nodename}:{os.getpid()}:a"
    gone = f"{os.uname().nodename}:{2**22 + 12345}:b"
    elsewhere = "another-host:1:c"
    assert parent_is_live(liveness_tags(me, now), now)
    assert parent_is_live(liveness_tags(elsewhere, now), now)
    assert not parent_is_live(liveness_tags(gone, now), now)
    assert not parent_is_live(liveness_tags(elsewhere, now - lease_ttl() - 1), now)
    assert not parent_is_live({}, now)
