"""Which free llama.cpp slot a waiting request takes: the longest cached prefix, then adjacency to the busy slots.

Why adjacency: each slot is its own KV stream (llamacpp.py), and llama.cpp splits a step's batch into
micro-batches of sequences with consecutive ids (llamacpp_ubatch.py), so busy slots 0, 2, 4 decode in
three passes where 0, 1, 2 take one: measured 65.0 vs 27.6 ms a step for three sequences and 172 vs
37 ms for eight (docs/performance.md "llama.cpp slots"). A running sequence cannot move to another
slot, so the choice is made once, when a request takes its slot.

The rule: among the free slots whose usable prefix is within ``SPARE`` tokens of the longest, the
one that leaves the busy slots in the fewest runs of consecutive ids, then the longest prefix, then
the lowest id (as before: taking the lowest free slots keeps the busy ones packed at the low end as
conversations come and go). ``SPARE`` lets a request give up a chat template's header or a few
tokens for adjacency; a prefix longer by more than that always wins. Measured in process with
bench/llamacpp_slots.py (the default model on llama.cpp, 6 slots, chats with shared system prompts
and one-turn requests beside them, paired rounds on a loaded 2-core machine): micro-batches a decode
step 1.59 -> 1.29 (medians; fewer in 8 of 9 pairs), prompt tokens reused within the rounds' spread.
What that saves in time was not readable under that load (docs/performance.md "llama.cpp slots").
A conversation that comes back returns to its own slot, wherever it is: moving its KV beside the
busy slots (``llama_memory_seq_cp`` across streams) is the lever this choice cannot reach.
Preferring the slot that evicts the least cached history (an empty one) to the lowest spreads the
busy slots out where conversations come back (the bench's ``--simulate --shots 0``), so it is not used.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

SPARE = 8  # prefix tokens a request may give up for a slot beside the busy ones


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def runs(busy: Collection[int]) -> int:
    """How many runs of consecutive ids ``busy`` falls into: the micro-batches of a decode step."""
    ids = sorted(set(busy))
    return sum(1 for i, slot in enumerate(ids) if i == 0 or slot != ids[i - 1] + 1)


def choose_slot(
    prompt: Sequence[int], free: Mapping[int, Sequence[int]], busy: Collection[int], spare: int = SPARE
) -> int:
    """The id of the slot (of ``free``: id -> the tokens its cells hold) that ``prompt`` takes
    beside the ``busy`` ids. A slot's usable prefix stops two tokens short of the prompt's end
    (llamacpp.py ``_assign`` always feeds those), so a longer match there is no better."""
    shared = {slot: min(common_prefix(tokens, prompt), max(0, len(prompt) - 2)) for slot, tokens in free.items()}
    best = max(shared.values())
    near = [slot for slot in free if shared[slot] >= best - spare]
    return min(near, key=lambda s: (runs([*busy, s]), -shared[s], s))
