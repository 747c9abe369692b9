"""Which free llama.cpp slot a waiting request takes.

1. The slot whose cached tokens share the longest prefix with the prompt, when that keeps at least a tenth
   of what the slot holds: a conversation coming back, a repeated prompt, a shared system prompt. Ties: the
   least recently used.
2. Else the slot that keeps the running ones in the fewest runs of consecutive ids, then an empty slot
   before one holding a history (the least recently used of those), then the lowest id.

Why runs: each slot is its own KV stream (llamacpp.py), and llama.cpp splits a step's batch into micro-batches
of sequences with consecutive ids (llamacpp_ubatch.py), each a pass over the weights: busy slots 0, 2, 4
decode in three passes where 0, 1, 2 take one (8 scattered slots 3.4-4.6x the time of 8 adjacent:
docs/performance.md "llama.cpp slots").

Why not the longest prefix whatever it keeps, ties to the lowest id (the rule before): a prompt that shares
nothing with any slot, or only a chat template's first tokens, then took slot 0, and the conversation cached
there was prefilled again from nothing when it came back, with every other slot empty: a chat UI's title or
tag request after each answer made every turn a cold prefill, and the agent bench had a 12 s turn among
2-3 s ones. llama-server's rule (a prefix covering a tenth of the prompt, else the least recently used slot)
keeps conversations but scatters slots: +0.3 to +0.8 micro-batches a decode step at 8-16 slots in
``python -m bench.llamacpp_slots --simulate`` (no KV buffer is shared across slots here, as its unified one
is). This rule stays within +0.08 of the rule before there (0.35 fewer with many one-turn requests), and
in process it decoded as fast (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


KEEP = 0.1  # the share of its cached tokens a slot must keep to be reused for another prompt


def runs(busy: Collection[int]) -> int:
    """How many runs of consecutive ids ``busy`` falls into: the micro-batches of a decode step."""
    ids = sorted(set(busy))
    return sum(1 for i, slot in enumerate(ids) if i == 0 or slot != ids[i - 1] + 1)


def choose_slot(
    prompt: Sequence[int],
    free: Mapping[int, Sequence[int]],
    busy: Collection[int] = (),
    used: Mapping[int, int] | None = None,
) -> int:
    """The id of the slot that ``prompt`` takes, of ``free`` (id -> the tokens its cells hold, in id order);
    ``busy``: the slots running; ``used``: when each free one was last taken (larger: more recent)."""
    last = used or {}
    shared = {slot: common_prefix(tokens, prompt) for slot, tokens in free.items()}
    best = max(free, key=lambda slot: (shared[slot], -last.get(slot, 0)))
    if shared[best] and shared[best] >= KEEP * len(free[best]):
        return best
    return min(
        free, key=lambda slot: (runs([*busy, slot]), bool(free[slot]), last.get(slot, 0) if free[slot] else slot)
    )
