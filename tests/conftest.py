"""Shared fixtures: the `needs_fuse` marker, an in-process `pool` and a
`mounted` dmfs daemon.

`@pytest.mark.needs_fuse` skips a test only when a FUSE mount is impossible
here (not root, or no /dev/fuse), and says which.  `pool` (t3) is an open
`dmfs.pool.Pool` in `pool_path`, on the test's nursery.  `mounted` starts
``python -m dmfs mount -f POOL MNT`` in a subprocess and, at teardown,
detaches loop devices, runs ``dmfs umount`` and requires the daemon to
exit 0 without a traceback in its log.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import util  # noqa: E402
from dmfs.pool import Pool  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_fuse: needs root and /dev/fuse (skipped otherwise)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_fuse") is not None:
        reason = util.fuse_skip_reason()
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture
def pool_path(tmp_path) -> str:
    """Where the `pool` fixture's pool lives (tests reopen or damage it there)."""
    return str(tmp_path / "pool")


@pytest.fixture
async def pool(pool_path, nursery):
    """An open Pool on the test's nursery; closed at the end unless the test did."""
    p = await Pool.open(pool_path, nursery)
    yield p
    if not p.closed:
        await p.close()


class Mounted:
    """What the `mounted` fixture yields.

    Attributes:
      pool, mnt: pathlib.Path of the pool directory and the mountpoint.
      proc: the daemon's subprocess.Popen.
      daemon: the util.Daemon (log(), stop(), ...).
      expect_rc: exit code the teardown requires (a test that kills the
        daemon on purpose sets it, or None to skip the check).
    """

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.pool = tmp_path / "pool"
        self.mnt = tmp_path / "mnt"
        self.mnt.mkdir()
        self.expect_rc = 0
        self._n = 0
        self.daemon = None
        self.start()

    @property
    def proc(self):
        return self.daemon.proc

    def start(self, extra_args=(), env=None) -> None:
        self._n += 1
        self.daemon = util.Daemon(self.pool, self.mnt, self.tmp / f"daemon-{self._n}.log",
                                  extra_args, env)
        self.daemon.wait_mounted()

    def restart(self) -> None:
        """Unmount cleanly (exit 0 required) and mount the same pool again."""
        rc = self.daemon.stop()
        assert rc == 0, f"daemon exited {rc}\n{self.daemon.log()}"
        self.check_log()
        self.start()

    def log(self) -> str:
        return self.daemon.log()

    def check_log(self) -> None:
        log = self.daemon.log()
        assert "Traceback" not in log, f"traceback in the daemon's log:\n{log}"

    def path(self, name: str):
        return self.mnt / name


@pytest.fixture
def mounted(tmp_path):
    reason = util.fuse_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    m = Mounted(tmp_path)
    try:
        yield m
    finally:
        try:
            rc = m.daemon.stop()
        except BaseException:
            m.daemon.kill()
            raise
        log = m.daemon.log()
        if m.expect_rc is not None:
            assert rc == m.expect_rc, f"daemon exited {rc}\n{log}"
        assert "Traceback" not in log, f"traceback in the daemon's log:\n{log}"
        assert util.mount_type(m.mnt) is None, f"{m.mnt} still mounted"
