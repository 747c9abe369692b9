"""Slot choice on the llama.cpp backend: the shipped rule (engine/backends/llamacpp_slots.py: the longest
cached prefix, ties to the lowest id) and the adjacency rule bench/llamacpp_slots.py measures against it."""

from __future__ import annotations

import random

from bench.llamacpp_slots import SPARE, adjacent, runs
from gerdsen_ai_server.engine.backends.llamacpp_slots import choose_slot, common_prefix


def test_the_shipped_rule_takes_the_longest_prefix_then_the_lowest_id() -> None:
    prompt = list(range(100, 120))
    assert choose_slot(prompt, {0: [], 1: [], 3: []}) == 0  # no prefix anywhere: the lowest
    assert choose_slot(prompt, {0: prompt[:3], 3: prompt[:10], 5: []}) == 3
    assert choose_slot(prompt, {1: prompt[:10] + [7], 4: prompt[:10]}) == 1  # a tie: the lowest
    assert choose_slot(prompt, {2: prompt, 6: prompt[:19]}) == 2  # the whole prompt cached
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([], [1]) == 0


def test_runs_count_consecutive_ids() -> None:
    assert runs([]) == 0 and runs([3]) == 1 and runs([0, 1, 2]) == 1
    assert runs([0, 2, 4]) == 3 and runs([4, 0, 1, 5]) == 2


def test_a_tie_goes_beside_the_busy_slots() -> None:
    prompt = list(range(100, 120))
    assert adjacent(prompt, {0: [], 1: [], 3: []}, [2]) == 1  # not 0: two runs
    assert adjacent(prompt, {0: [], 4: []}, [2, 3]) == 4
    assert adjacent(prompt, {0: [], 1: [], 2: []}, []) == 0  # nothing busy: the lowest, as before
    # A system prompt cached in slots 0 and 3: the one beside the busy slot.
    assert adjacent(prompt, {0: prompt[:10], 3: prompt[:10] + [7], 5: []}, [2]) == 3
    # A cached prefix longer by more than SPARE tokens wins over adjacency (with spare=0, by one token).
    assert adjacent(prompt, {0: prompt[: SPARE + 1], 3: [], 5: []}, [2]) == 0
    assert adjacent(prompt, {0: prompt[:SPARE], 3: [], 5: []}, [2]) == 3
    assert adjacent(prompt, {0: prompt[:11], 3: prompt[:10], 5: []}, [2], spare=0) == 0
    # Past the two tokens every prompt feeds again (llamacpp.py _assign), a longer match is no better.
    assert adjacent(prompt, {0: prompt, 3: prompt[:18] + [7]}, [2]) == 3


def test_no_more_than_spare_prefix_tokens_are_given_up() -> None:
    prompt = list(range(100, 200))
    far, near = {0: prompt[:50]}, [2]  # slot 0 shares 50 tokens, two ids from the busy slot
    assert adjacent(prompt, {**far, 3: prompt[:49]}, near, spare=0) == 0
    assert adjacent(prompt, {**far, 3: prompt[:41]}, near, spare=8) == 0
    assert adjacent(prompt, {**far, 3: prompt[:42]}, near, spare=8) == 3
    rng = random.Random(0)
    for _ in range(2000):  # any state: the slot taken shares at least the best usable prefix less spare
        prompt = [rng.randrange(4) for _ in range(rng.randint(0, 12))]
        slots = rng.sample(range(8), rng.randint(1, 8))
        free = {s: [rng.randrange(4) for _ in range(rng.randint(0, 12))] for s in slots}
        busy = rng.sample([s for s in range(8) if s not in free], rng.randint(0, 8 - len(free)))
        usable = max(0, len(prompt) - 2)
        best = max(min(common_prefix(t, prompt), usable) for t in free.values())
        for spare in (SPARE, 2, 8):
            chosen = adjacent(prompt, free, busy, spare)
            assert chosen in free and min(common_prefix(free[chosen], prompt), usable) >= best - spare
            assert runs([*busy, chosen]) == min(
                runs([*busy, s]) for s in free if min(common_prefix(free[s], prompt), usable) >= best - spare
            )
