"""The command line's output piped into a reader that leaves early (`minikv status | head`)."""

from __future__ import annotations

import subprocess
import sys


def test_a_reader_that_left_gets_no_traceback():
    # the read end is closed before minikv writes: its first write meets EPIPE
    proc = subprocess.Popen([sys.executable, "-m", "minikv", "-h"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=30) == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
