"""Which server runs which concurrency level, and how often (the interleaved rounds of ``bench.run``).

The 1- and 8-stream levels pair with a raw limit measured in the same round (PAIRED) and run
``--level-repeats`` rounds; the slow bf16 peers and the malloc variant run each level once.
"""

from __future__ import annotations

import argparse

from bench import client

PAIRED = {1: {"op": "single"}, 8: {"op": "batch", "n": 8}}  # the levels the targets compare with a raw limit
# On a CPU the bf16 peers are 4-5x slower than ours, half a minute and more a level: they run each level once
# (the repeated rounds are for the close ratios, ours against the raw limits and the fp32 peer), and
# mlx_lm.server with OpenBLAS on the bf16 checkpoint only the 8-stream level the targets use.
SLOW_PEERS: dict[str, tuple[int, ...] | None] = {"mlx": None, "mlx+openblas": (8,)}
# Our server on glibc's malloc (the allocator comparison, for information) runs each level once too.
ONCE_A_LEVEL = {"ours malloc"}


def measured(args: argparse.Namespace, key: str, streams: int, round_: int) -> bool:
    """Whether server ``key`` runs this level in this round (see SLOW_PEERS, ONCE_A_LEVEL)."""
    if key in ONCE_A_LEVEL:
        return round_ == 0
    if args.gpu or key not in SLOW_PEERS:
        return True
    levels = SLOW_PEERS[key]
    return round_ == 0 and (levels is None or streams in levels)


def level_rounds(args: argparse.Namespace, streams: int) -> int:
    """Rounds of a level on every server: the 1- and 8-stream levels, compared with raw limits measured in
    the same rounds, run ``--level-repeats`` times (the targets take the median of the rounds' ratios)."""
    return args.level_repeats if streams in PAIRED else 1


def faster(a: client.LevelResult | None, b: client.LevelResult) -> client.LevelResult:
    """The round with the higher aggregate tok/s, whole (its TTFTs come from the same round)."""
    return b if a is None or b.aggregate_tps > a.aggregate_tps else a
