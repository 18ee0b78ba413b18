"""The systemd unit works after the README's set-up (issue 18, point 7).

`make run` / `make test` link the command where the unit runs it
(``make install-bin``: /usr/local/bin/dmfs -> .venv/bin/dmfs); then
``systemd-analyze verify`` of the unit as shipped must pass.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "contrib" / "systemd" / "dmfs@.service"


def exec_start_binary() -> str:
    m = re.search(r"^ExecStart=(\S+)", UNIT.read_text(), re.M)
    assert m, "no ExecStart in the unit"
    return m.group(1)


def test_unit_verifies_after_the_set_up():
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    binary = exec_start_binary()
    if not os.path.exists(binary):
        if os.geteuid() != 0:
            pytest.skip(f"{binary} is missing and linking it (make install-bin) needs root")
        if shutil.which("make") is None:
            pytest.skip("make is not installed, so the set-up cannot run")
        # The set-up step the README's `make run` runs.
        p = subprocess.run(["make", "-s", "-C", str(REPO), "install-bin"],
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr
    assert os.access(binary, os.X_OK), f"{binary} is not executable after make install-bin"
    v = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0 and v.stdout.startswith("dmfs "), v.stderr
    p = subprocess.run(["systemd-analyze", "verify", str(UNIT)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "dmfs@" not in p.stderr, p.stderr   # no complaint about our unit
