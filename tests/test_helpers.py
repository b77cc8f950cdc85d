"""The shared test helpers that are more than builders: ``run_command``."""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
from helpers import run_command

# A child that starts two sleeping grandchildren, one in its own process group and one
# in a session of its own (as torchrun starts its workers; this one lets go of the output
# pipes, so only killing it by its mark ends it in time), says their pids, and sleeps.
SPAWNER = """
import subprocess, sys, time
same = subprocess.Popen(["sleep", "120"])
own = subprocess.Popen(["sleep", "120"], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print("grandchildren", same.pid, own.pid, flush=True)
time.sleep(120)
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for its reaper, not for us)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_run_command_returns_the_outcome():
    done = run_command([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                       timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")


def test_a_timed_out_command_is_killed_with_every_process_it_started():
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"ran past 3 s; it was killed") as failed:
        run_command([sys.executable, "-c", SPAWNER], timeout=3)
    found = re.search(r"grandchildren (\d+) (\d+)", str(failed.value))
    assert found, f"the spawner did not start within the timeout: {failed.value}"
    pids = [int(p) for p in found.groups()]
    assert not [pid for pid in pids if _running(pid)]
    assert time.monotonic() - start < 60  # not held until the sleeps end
