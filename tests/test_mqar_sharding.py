"""Sharding an MQAR sweep over processes that share one output folder: the lock on results.jsonl, and
processes racing to append to it."""

import collections
import fcntl
import multiprocessing
from pathlib import Path

from rebased.tasks.mqar.sweep import append_result, load_results


def is_locked(path: Path) -> bool:
    """Whether some open of `path` (in this process or another) holds its flock."""
    with open(path, "a") as other:
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(other, fcntl.LOCK_UN)
        return False


def test_repairing_a_torn_line_keeps_the_file_and_so_its_lock(tmp_path):
    from rebased.files import locked
    from rebased.tasks.mqar.sweep import _repair_tail

    path = tmp_path / "results.jsonl"
    path.write_text('{"run_id": "a"}\n{"run_id": "b", "acc')
    inode = path.stat().st_ino
    with locked(path):
        _repair_tail(path)
        assert is_locked(path)  # a rename would have put an unlocked file in its place
    assert path.stat().st_ino == inode and path.read_text() == '{"run_id": "a"}\n'


ROWS, WRITERS = 100, 4


def append_rows(path: Path, writer: int, start) -> None:
    """A writer process: wait for the others, then append rows every writer appends and rows of its own."""
    start.wait()
    for i in range(ROWS):
        append_result(path, {"run_id": f"shared-{i}", "writer": writer})
        append_result(path, {"run_id": f"own-{writer}-{i}", "writer": writer})


def test_processes_appending_at_once_leave_each_run_once(tmp_path):
    """Four processes append the same 100 runs (as two processes that trained a run both would) and 100 runs
    each of their own, all at once: every line whole, every run once. Without the lock, a writer checks for
    a run between another's check and its append, and the file holds runs twice."""
    path = tmp_path / "results.jsonl"
    context = multiprocessing.get_context("fork")  # torch is imported already: the writers start in ms
    start = context.Barrier(WRITERS)
    writers = [context.Process(target=append_rows, args=(path, w, start)) for w in range(WRITERS)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0
    counts = collections.Counter(line["run_id"] for line in load_results(path))
    expected = {f"shared-{i}" for i in range(ROWS)} | {f"own-{w}-{i}" for w in range(WRITERS) for i in range(ROWS)}
    assert set(counts) == expected
    assert [run_id for run_id, count in counts.items() if count > 1] == []
