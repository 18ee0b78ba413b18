"""dmio.PageCacheProbe: cachestat(2) tells cached pages from cold ones
without reading them (the COW path's test before an inline copy)."""

import os

import pytest

from dmio import PageCacheProbe

PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def probe():
    p = PageCacheProbe()
    fd = os.open("/proc/self/exe", os.O_RDONLY)
    try:
        if p.cached(fd, 0, 1) is None:
            pytest.skip("this kernel has no cachestat(2) (Linux 6.5)")
    finally:
        os.close(fd)
    return p


def test_written_pages_are_cached_and_dropped_ones_are_not(tmp_path, probe):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(fd, os.urandom(4 * PAGE), 0)
        assert probe.cached(fd, 0, 4 * PAGE)
        assert probe.cached(fd, PAGE + 512, 100)          # inside one page
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert probe.cached(fd, 0, PAGE) is False
        os.pread(fd, 10, 2 * PAGE)                         # one page read back
        assert probe.cached(fd, 2 * PAGE, PAGE)
        assert probe.cached(fd, 2 * PAGE - 1, 2) is False  # straddles a cold page
        assert probe.cached(fd, 2 * PAGE, PAGE) is True    # asking read nothing
        assert probe.cached(fd, PAGE, PAGE) is False
    finally:
        os.close(fd)


def test_a_file_it_cannot_ask_about_makes_it_say_so_from_then_on(tmp_path, probe):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    os.close(fd)
    assert probe.cached(fd, 0, PAGE) is None      # EBADF
    assert not probe.supported
    fd = os.open(tmp_path / "f", os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * PAGE, 0)
        assert probe.cached(fd, 0, PAGE) is None  # no longer asked
    finally:
        os.close(fd)
