"""Which free llama.cpp slot a waiting request takes: the one whose cached tokens share the longest prefix
with its prompt, ties to the lowest id.

Why not also adjacency: each slot is its own KV stream (llamacpp.py), and llama.cpp splits a step's batch
into micro-batches of sequences with consecutive ids (llamacpp_ubatch.py), so busy slots 0, 2, 4 decode in
three passes where 0, 1, 2 take one (docs/performance.md "llama.cpp slots"). A rule that puts a request
beside the busy slots when that costs at most a few prefix tokens was built and measured
(``python -m bench.llamacpp_slots``, which keeps it as ``adjacent``): on the default model with the
server's two threads on a quiet machine it left as many micro-batches a decode step as this rule (more in 4
of 6 paired rounds), and no faster; fewer in 8 of 9 pairs only with one thread under load. Taking the
lowest free slot already keeps the busy ones packed at the low end as conversations come and go; a
conversation that comes back returns to its own slot wherever it is, which a choice made here cannot
change (moving its KV, ``llama_memory_seq_cp`` across streams, could).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def choose_slot(prompt: Sequence[int], free: Mapping[int, Sequence[int]]) -> int:
    """The id of the slot (of ``free``: id -> the tokens its cells hold, in id order) that ``prompt`` takes."""
    return max(free, key=lambda slot: common_prefix(free[slot], prompt))
