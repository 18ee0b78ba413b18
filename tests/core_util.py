"""Helpers of the in-process core tests (t3): holding or replacing the
kcopyd jobs of an origin.

Both wrap `KcopydClient.copy_soon`, which the origin (COW copies) and a
merge (copies into the origin) call: small copies run in kcopyd's batch
worker and never pass through `KcopydClient.copy`, so patching that one
holds nothing.
"""

from __future__ import annotations

import trio


def on_kcopyd_jobs(origin, job, *, into_origin: bool):
    """Run `await job(nursery, src, dests, callback, **kwargs)` in place of
    each job the origin's kcopyd is given that copies into the origin (a
    merge step) if `into_origin`, else out of it (a COW copy); return
    `real`, which schedules a job as kcopyd would."""
    real = origin.kcopyd.copy_soon

    def copy_soon(nursery, src, dests, callback, **k):
        if any(d.fd == origin.fd for d in dests) == into_origin:
            nursery.start_soon(lambda: job(nursery, src, dests, callback, **k))
        else:
            real(nursery, src, dests, callback, **k)

    origin.kcopyd.copy_soon = copy_soon
    return real


def hold_kcopyd_jobs(origin, *, into_origin: bool) -> trio.Event:
    """Make those jobs (see `on_kcopyd_jobs`) wait until the returned
    event is set."""
    gate = trio.Event()
    if not into_origin:
        # Or a small copy of cached data is made inline, never held.
        origin.inline_copies = False

    async def held(nursery, *args, **k):
        await gate.wait()
        real(nursery, *args, **k)

    real = on_kcopyd_jobs(origin, held, into_origin=into_origin)
    return gate


async def wait_merge_done(merge, timeout: float | None = None) -> None:
    """Wait until `merge`'s loop has stopped; fail if the merge failed."""
    from dmfs.dm import MergeState

    with trio.fail_after(timeout) if timeout else trio.CancelScope():
        while merge.state is MergeState.MERGING or merge._running is not None:
            await trio.sleep(0.01)
    assert merge.state is not MergeState.FAILED, merge.describe()
