"""The completed-exception table: runs, buckets, range lookups."""

import random
from array import array

import pytest

from dmfs.dm.exception_table import BUCKET_CHUNKS, ExceptionTable


def test_consecutive_exceptions_collapse_into_one_run():
    t = ExceptionTable()
    for i in range(1000):
        t.insert(50 + i, 7 + i)
    assert len(t) == 1000
    assert t.entries() == 1
    assert list(t.runs()) == [(50, 7, 1000)]
    assert t.lookup(50) == 7 and t.lookup(1049) == 1006 and t.lookup(1050) is None


def test_runs_crossing_buckets_and_gaps():
    t = ExceptionTable()
    t.insert(BUCKET_CHUNKS - 2, 100, 4)
    assert t.entries() == 2
    assert list(t.runs()) == [(BUCKET_CHUNKS - 2, 100, 4)]
    pieces = list(t.lookup_range(BUCKET_CHUNKS - 4, 8))
    assert pieces == [(BUCKET_CHUNKS - 4, None, 2), (BUCKET_CHUNKS - 2, 100, 2),
                      (BUCKET_CHUNKS, 102, 2), (BUCKET_CHUNKS + 2, None, 2)]
    assert list(t.missing(BUCKET_CHUNKS - 4, 8)) == [(BUCKET_CHUNKS - 4, 2), (BUCKET_CHUNKS + 2, 2)]


def test_two_exceptions_for_one_chunk_are_refused():
    t = ExceptionTable()
    t.insert(10, 1, 5)
    with pytest.raises(ValueError):
        t.insert(14, 99)
    with pytest.raises(ValueError):
        t.insert(8, 99, 3)
    assert len(t) == 5


def test_remove_from_either_end_and_middle():
    t = ExceptionTable()
    t.insert(0, 100, 10)
    t.remove(9)
    t.remove(0)
    t.remove(4, 2)
    assert list(t.runs()) == [(1, 101, 3), (6, 106, 3)]
    assert len(t) == 6
    with pytest.raises(KeyError):
        t.remove(4)


def test_random_against_a_dict():
    rnd = random.Random(1)
    t = ExceptionTable()
    model = {}
    nxt = 0
    for _ in range(3000):
        start = rnd.randrange(3 * BUCKET_CHUNKS)
        n = rnd.randrange(1, 40)
        if any(c in model for c in range(start, start + n)):
            continue
        t.insert(start, nxt, n)
        for i in range(n):
            model[start + i] = nxt + i
        nxt += n + rnd.randrange(2)
    assert len(t) == len(model)
    for c in range(3 * BUCKET_CHUNKS + 50):
        assert t.lookup(c) == model.get(c)
    for _ in range(200):
        s = rnd.randrange(3 * BUCKET_CHUNKS)
        n = rnd.randrange(1, 600)
        covered = []
        for old, new, k in t.lookup_range(s, n):
            for i in range(k):
                covered.append((old + i, None if new is None else new + i))
        assert covered == [(c, model.get(c)) for c in range(s, s + n)]


def test_bulk_load_matches_inserts():
    rnd = random.Random(5)
    runs = []
    pos = 0
    for _ in range(2000):
        pos += rnd.randrange(1, 3 * BUCKET_CHUNKS // 100)
        n = rnd.randrange(1, 50)
        runs.append((pos, 10 * pos, n))
        pos += n
    runs.append((pos, 10 * (pos - 1) + 1, 5))  # continues the previous run's old only
    rnd.shuffle(runs)
    a = ExceptionTable.from_runs(runs)
    b = ExceptionTable()
    for r in runs:
        b.insert(*r)
    assert len(a) == len(b)
    assert list(a.runs()) == list(b.runs())
    assert a.entries() == b.entries()
    with pytest.raises(ValueError):
        ExceptionTable.from_runs([(0, 5, 10), (9, 100, 1)])


def test_from_sorted_cuts_runs_at_bucket_borders():
    # a run over three buckets and a bit, then one starting in its last bucket
    long_old = BUCKET_CHUNKS - 5
    runs = [(3, 1000, 2), (long_old, 10, 2 * BUCKET_CHUNKS + 10),
            (3 * BUCKET_CHUNKS + 20, 7, 1), (9 * BUCKET_CHUNKS, 50, 4)]
    t = ExceptionTable.from_sorted(array("q", [v for r in runs for v in r]))
    b = ExceptionTable()
    for r in runs:
        b.insert(*r)
    assert t._buckets == b._buckets
    assert len(t) == len(b) and t.entries() == b.entries() == 7
    assert t.lookup(long_old + BUCKET_CHUNKS) == 10 + BUCKET_CHUNKS
    assert list(t.runs()) == runs
