"""`dmfs mount [-f] [-o OPT,...] POOL MNT`: serve a pool over FUSE.

Without ``-f`` the command forks *before* trio or pyfuse3 start (neither
survives a fork), the child becomes a session leader and runs the
daemon, and the parent waits on a pipe until the child reports "ok"
(the mount answers requests) or "err <reason>".  So when `dmfs mount`
returns 0 the mount is live, and a failure is one line on the terminal.
The daemon logs to ``POOL/dmfs.log``; with ``-f`` it logs to stderr.

Inside `trio.run` (s3ql's mount.py order): open the pool, `pyfuse3.init`,
start the signal watcher and the announcer (round trip through the
mount, fusectl tuning, ``READY=1`` for systemd), then `pyfuse3.main`.
After main returns the pool is closed, then the mount is removed.
"""

from __future__ import annotations

import errno
import faulthandler
import logging
import logging.handlers
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time

import pyfuse3
import trio

from ..errors import DmError
from ..fuse.operations import Operations
from .common import QuietError, describe_error, leaf_exception
from .mounts import FSTYPE, loop_devices_using, mount_type

log = logging.getLogger(__name__)

LOG_NAME = "dmfs.log"
READY_TIMEOUT = 60.0
FUSECTL = "/sys/fs/fuse/connections"
MAX_BACKGROUND = 64
CLOSE_TIMEOUT = 600.0

# Mount options a user may add with -o.  Anything else is refused here:
# libfuse rejects unknown ones only after forking, with a cryptic error.
USER_OPTIONS = frozenset(("allow_other", "allow_root", "debug"))

LOG_FORMAT = "%(asctime)s.%(msecs)03d %(process)d %(levelname)s %(name)s: %(message)s"
LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"


def setup_logging(stream, debug: bool, level: int = logging.INFO,
                  handler: logging.Handler | None = None) -> None:
    """Log to `stream` (or `handler`): INFO and up, everything with --debug."""
    if handler is None:
        handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else level)
    if not debug:
        # pyfuse3 logs each worker task start at DEBUG only; keep trio quiet.
        logging.getLogger("trio").setLevel(logging.WARNING)


def _escape_opt(value: str) -> str:
    # libfuse splits -o values at commas; a backslash escapes one.
    value = value.replace("\\", "\\\\").replace(",", "\\,")
    return value.encode("ascii", "replace").decode("ascii")


def fuse_options(user_opts: list[str], pool_path: str) -> set[str]:
    """The pyfuse3 option set: fsname, subtype, default_permissions, -o extras."""
    opts = {"fsname=dmfs:" + _escape_opt(pool_path), "subtype=dmfs", "default_permissions"}
    for group in user_opts:
        for opt in group.split(","):
            opt = opt.strip()
            if not opt:
                continue
            if opt not in USER_OPTIONS:
                raise QuietError(f"unknown mount option {opt!r} "
                                 f"(known: {', '.join(sorted(USER_OPTIONS))})")
            opts.add(opt)
    return opts


def check_mountpoint(mnt: str) -> None:
    """MNT must be an existing, empty directory that is not mounted on."""
    try:
        st = os.stat(mnt)
    except FileNotFoundError:
        raise QuietError(f"mountpoint {mnt} does not exist") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            from .client import stale_message
            raise QuietError(stale_message(mnt)) from None
        raise QuietError(f"mountpoint {mnt}: {e.strerror}") from None
    if os.path.ismount(mnt) and mount_type(mnt) == FSTYPE:
        from .client import stale_message
        try:
            os.getxattr(mnt, "user.dmfs.pid")
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                raise QuietError(stale_message(mnt)) from None
        else:
            raise QuietError(f"{mnt} is already a dmfs mount (see: dmfs status {mnt})")
    if not stat.S_ISDIR(st.st_mode):
        raise QuietError(f"mountpoint {mnt} is not a directory")
    if os.path.ismount(mnt):
        raise QuietError(f"{mnt} is already a mount point")
    if os.listdir(mnt):
        raise QuietError(f"mountpoint {mnt} is not empty")


def check_pool_path(pool: str) -> None:
    if os.path.exists(pool) and not os.path.isdir(pool):
        raise QuietError(f"pool {pool} exists and is not a directory")


def sd_notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd if it asked for it.

    Returns True if a message was sent.  Failures are logged, not raised:
    a missing notification must not bring down a running mount.
    """
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]  # abstract socket namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", os.environ["NOTIFY_SOCKET"], e)
        return False
    return True


async def tune_max_background(dev_minor: int, value: int = MAX_BACKGROUND) -> None:
    """Raise the FUSE connection's max_background (12 caps loop/fio queue depth).

    Root only; needs fusectl, mounted here if systemd has not.  Failure only
    costs performance, so it is logged at debug level.
    """
    if os.geteuid() != 0:
        return
    try:
        if not os.path.ismount(FUSECTL):
            await trio.run_process(["mount", "-t", "fusectl", "fusectl", FUSECTL],
                                   capture_stdout=True, capture_stderr=True)
        path = os.path.join(FUSECTL, str(dev_minor), "max_background")
        with open(path, "w") as f:
            f.write(f"{value}\n")
        log.debug("%s set to %d", path, value)
    except (OSError, subprocess.CalledProcessError) as e:
        log.debug("could not raise max_background: %s", e)


def _record_mount(pool, mnt: str) -> None:
    """Note pid and mountpoint in POOL/lock, shown to whoever finds the pool busy."""
    try:
        pool.record_mount(mnt)
    except OSError as e:
        log.warning("cannot record the mountpoint in %s: %s", pool.lock_path, e)


async def _signal_watcher(mnt: str, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """SIGTERM/SIGINT end the FUSE main loop; the caller then unmounts cleanly."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        stopping = False
        async for signum in signals:
            name = signal.Signals(signum).name
            if stopping:
                log.info("%s: already shutting down", name)
                continue
            stopping = True
            users = loop_devices_using(mnt)
            if users:
                # B7: the mount goes away lazily and these loop devices
                # return EIO on every access until `losetup -d`.
                log.warning("%s while loop devices still use files of %s: %s; "
                            "they will fail with I/O errors until detached (losetup -d)",
                            name, mnt, ", ".join(f"{d} ({p})" for d, p in users))
            log.info("%s received, unmounting %s", name, mnt)
            pyfuse3.terminate()


async def _announce(mnt: str, ready) -> None:
    """Once the FUSE loop answers: tune fusectl, tell systemd and the parent."""
    try:
        # A stat of the mount root is a real round trip through our own
        # main loop: when it returns, the mount is usable.
        st = await trio.to_thread.run_sync(os.stat, mnt, abandon_on_cancel=True)
    except OSError as e:
        log.error("mount at %s does not answer: %s", mnt, e)
        if ready is not None:
            ready(f"err mount at {mnt} does not answer: {e.strerror}")
        pyfuse3.terminate()
        return
    await tune_max_background(os.minor(st.st_dev))
    sd_notify(f"READY=1\nSTATUS=serving {mnt}\nMAINPID={os.getpid()}")
    log.info("mounted at %s", mnt)
    if ready is not None:
        ready("ok")


async def _close_pool(pool) -> None:
    # Shielded: the pool must reach a clean state even if we are being
    # cancelled (a crashed background task cancels the nursery).
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + CLOSE_TIMEOUT
        await pool.close()
    if scope.cancelled_caught:
        log.error("closing the pool took longer than %d s; gave up", CLOSE_TIMEOUT)


async def serve(pool_path: str, mnt: str, fuse_opts: set[str], ready=None,
                opened=None) -> None:
    """The daemon: serve `pool_path` at `mnt` until unmounted or signalled.

    Args:
      ready: called with "ok" once the mount answers, or "err <reason>".
      opened: called with the pool once it is open.
    """
    from ..pool import Pool  # imported here: the pool pulls in the whole core

    async with trio.open_nursery() as nursery:
        log.info("opening pool %s", pool_path)
        pool = await Pool.open(pool_path, nursery)
        if opened is not None:
            opened(pool)
        mounted = False
        try:
            ops = Operations(pool)
            try:
                pyfuse3.init(ops, mnt, fuse_opts)
            except RuntimeError as e:
                raise QuietError(f"cannot mount at {mnt}: {e} (see the log)") from None
            mounted = True
            _record_mount(pool, mnt)
            await nursery.start(_signal_watcher, mnt)
            nursery.start_soon(_announce, mnt, ready)
            await pyfuse3.main()
            log.info("FUSE main loop ended, closing pool")
        finally:
            try:
                await _close_pool(pool)
            finally:
                if mounted:
                    pyfuse3.close(unmount=True)
                    log.info("unmounted %s", mnt)
        nursery.cancel_scope.cancel()


def run_daemon(pool_path: str, mnt: str, fuse_opts: set[str], ready=None,
               debug: bool = False, opened=None) -> int:
    """Run `serve` in trio; log a failure (traceback only for bugs) and re-raise."""
    faulthandler.register(signal.SIGUSR1, file=_log_stream(), all_threads=True)
    try:
        trio.run(serve, pool_path, mnt, fuse_opts, ready, opened)
    except BaseException as e:  # noqa: B036 -- logged and re-raised
        if isinstance(leaf_exception(e), KeyboardInterrupt):
            msg = "interrupted"
        else:
            msg = describe_error(e)
            log.error("daemon failed: %s", msg, exc_info=debug or not _expected(e))
        if ready is not None:
            ready(f"err {msg}")
        raise
    return 0


def _log_stream():
    """The stream the root logger writes to (for faulthandler dumps)."""
    for h in logging.getLogger().handlers:
        stream = getattr(h, "stream", None)
        if stream is not None:
            return stream
    return sys.stderr


class _Reporter:
    """The child's end of the start-up pipe; reports exactly once."""

    def __init__(self, fd: int):
        self.fd = fd

    def __call__(self, msg: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, msg.replace("\n", " ").encode() + b"\n")
        except OSError:
            pass  # the parent gave up waiting; nothing to tell anyone
        os.close(self.fd)
        self.fd = None
        if msg == "ok":
            # Detach from the terminal the parent is about to return to.
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)


class _DeferredLog:
    """Hold log records in memory until the pool is open, then log to POOL/dmfs.log.

    The log file must not be created before `Pool.open` accepted the
    directory (it refuses non-empty directories that are not pools, and
    a directory that is not a pool is no place for our log).  Failures
    before that point reach the user through the start-up pipe.
    """

    def __init__(self, debug: bool):
        self.memory = logging.handlers.MemoryHandler(
            capacity=1 << 20, flushLevel=logging.CRITICAL + 1, flushOnClose=False)
        setup_logging(None, debug, handler=self.memory)

    def open(self, pool) -> None:
        path = os.path.join(pool.path, LOG_NAME)
        try:
            handler = logging.FileHandler(path, encoding="utf-8")
        except OSError as e:
            log.warning("cannot open %s: %s; logging nowhere", path, e.strerror)
            return
        handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
        self.memory.setTarget(handler)
        self.memory.flush()
        root = logging.getLogger()
        root.removeHandler(self.memory)
        root.addHandler(handler)
        faulthandler.register(signal.SIGUSR1, file=handler.stream, all_threads=True)


def _child(pool_path: str, mnt: str, fuse_opts: set[str], debug: bool, wfd: int) -> int:
    report = _Reporter(wfd)
    os.setsid()
    deferred = _DeferredLog(debug)
    try:
        run_daemon(pool_path, mnt, fuse_opts, report, debug, deferred.open)
    except BaseException:  # noqa: B036 -- the child always exits through os._exit
        return 1
    report("err daemon exited before the mount was ready")
    log.info("daemon exiting")
    return 0


def _expected(e: BaseException) -> bool:
    return isinstance(leaf_exception(e), (QuietError, DmError, OSError))


def _wait_for_child(pid: int, rfd: int, pool_path: str, mnt: str) -> int:
    deadline = time.monotonic() + READY_TIMEOUT
    buf = b""
    with os.fdopen(rfd, "rb", buffering=0) as r:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QuietError(f"the mount was not ready after {READY_TIMEOUT:.0f} s; "
                                 f"daemon pid {pid} still running (see "
                                 f"{os.path.join(pool_path, LOG_NAME)})")
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            chunk = r.read(4096)
            if not chunk:
                break
            buf += chunk
    line = buf.decode(errors="replace").strip()
    if line == "ok":
        return 0
    if line.startswith("err "):
        _reap(pid)
        raise QuietError(line[4:])
    _reap(pid)
    raise QuietError(f"the daemon died during start-up (see "
                     f"{os.path.join(pool_path, LOG_NAME)})")


def _reap(pid: int) -> None:
    # The child exits right after reporting an error; don't leave a zombie.
    for _ in range(50):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.1)


def run(args) -> int:
    pool_path = os.path.abspath(args.pool)
    mnt = os.path.abspath(args.mountpoint)
    fuse_opts = fuse_options(args.options, pool_path)
    check_pool_path(pool_path)
    check_mountpoint(mnt)
    if args.foreground:
        setup_logging(sys.stderr, args.debug)
        return run_daemon(pool_path, mnt, fuse_opts, debug=args.debug)

    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the CLI
        rc = 1
        try:
            os.close(rfd)
            rc = _child(pool_path, mnt, fuse_opts, args.debug, wfd)
        finally:
            logging.shutdown()
            os._exit(rc)
    os.close(wfd)
    return _wait_for_child(pid, rfd, pool_path, mnt)
