"""What the hot path's savings must not cost: request ids drawn in batches stay unique,
also across a fork (MCPGW_WORKERS), and well-formed."""

from __future__ import annotations

import os
import re

from services.common import logs


def test_request_ids_drawn_in_batches_are_unique_hex() -> None:
    ids = [logs.new_request_id() for _ in range(5000)]  # several draws of random bytes
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{16}", value) for value in ids)


def test_a_forked_worker_never_repeats_its_parents_request_ids() -> None:
    logs.new_request_id()  # the parent holds undrawn ids of its current batch
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: its next ids, to the parent
        os.close(read)
        os.write(write, " ".join(logs.new_request_id() for _ in range(20)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    os.waitpid(pid, 0)
    parent = [logs.new_request_id() for _ in range(20)]
    assert len(child) == 20 and not set(child) & set(parent)
