"""femeta.parallel: collective steps, serially and on every rank under ``mpiexec -n 2``."""

from __future__ import annotations

import pytest

from femeta.parallel import _Serial, collective, merged, on_root, world

pytestmark = pytest.mark.mpi


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("cannot pickle")


def test_a_step_that_fails_on_one_rank_fails_alike_on_all():
    comm = world()
    last = comm.size - 1

    def step():
        if comm.rank == last:
            raise ValueError("bad beam 7 on the last rank")
        return comm.rank

    with pytest.raises(ValueError, match="bad beam 7 on the last rank"):
        collective(comm, step)
    assert collective(comm, lambda: comm.rank) == comm.rank  # the ranks are still in step

    def unpicklable():
        if comm.rank == last:
            raise Unpicklable("no copy of me")

    error = RuntimeError if comm.rank != last else Unpicklable
    with pytest.raises(error, match="no copy of me"):
        collective(comm, unpicklable)


def test_on_root_runs_once_and_shares_its_error(tmp_path):
    comm = world()
    path = comm.bcast(str(tmp_path), root=0)
    calls = []
    result = on_root(comm, lambda: calls.append(comm.rank) or "written")
    assert calls == ([0] if comm.rank == 0 else [])
    assert result == ("written" if comm.rank == 0 else None)

    def fails():
        raise OSError(f"disk full writing {path}")

    with pytest.raises(OSError, match="disk full"):
        on_root(comm, fails)


def test_merged_gathers_every_ranks_part():
    comm = world()
    part = {task: task * task for task in range(comm.rank, 7, comm.size)}
    assert merged(comm, part) == {task: task * task for task in range(7)}


def test_the_serial_stand_in_without_mpi4py():
    serial = _Serial()
    assert (serial.rank, serial.size) == (0, 1)
    assert merged(serial, {1: "a"}) == {1: "a"}
    assert serial.bcast(5) == 5 and serial.Barrier() is None
    with pytest.raises(KeyError):
        collective(serial, lambda: {}["missing"])
