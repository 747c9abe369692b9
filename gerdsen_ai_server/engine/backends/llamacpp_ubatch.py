"""Which seeded sequences of a llama.cpp step would run in a one-token micro-batch, to re-feed their last token.

Why: we promise that a seeded request (a seed, temperature > 0) samples the same tokens again,
whatever runs beside it. On llama.cpp's CPU backend a micro-batch (ubatch) of exactly one token
takes other matrix kernels than any larger one: its logits come out ~1e-2 apart (the default model
as an f32 GGUF), enough to change a draw at temperature 1. A row in any ubatch of two or more tokens
gets the same logits to ~1e-5 whatever the other rows are. Which ubatches a ``llama_decode`` batch
becomes is not ours to choose: with a KV stream per sequence (our slots, ``kv_unified = false``)
llama.cpp splits it with ``split_equal(n_ubatch, sequential=true)`` (src/llama-batch.cpp): a ubatch
takes only sequences with consecutive ids, in batch order, and the same number of tokens from each.
So a slot whose neighbours are idle decodes alone, a two-token prompt tail beside one-token decodes
is cut into one-token pieces, and a sequence left decoding alone runs one-token ubatches: which slot
a choice of ``n`` got, and in which step it was admitted, changed its answer (the n=3 CI flake).

The backend (llamacpp.py ``step``) simulates that split for the batch it is about to decode and, for
each seeded sequence that would get a one-token ubatch, feeds its last token again (its cell is
recomputed: same token, same position) so that the ubatch has two. The cost falls on seeded
requests only, and only in those steps: a seeded sequence decoding alone takes ~1.35-1.5x the time
per token (two rows instead of one: 74.9 vs 109.0 ms per ``llama_decode``, 107 vs 144 ms per token
end to end, medians on the 2-core CI machine at load 8-9).
Unseeded and greedy requests keep the one-row kernels (nothing is promised for them beside others).
llama-server documents the same effect and leaves it (``cache_prompt``: "logits are not guaranteed
to be bit-for-bit identical for different batch sizes").
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from gerdsen_ai_server.engine.protocol import GenerationRequest


def micro_batches(rows: Sequence[tuple[int, int]], n_ubatch: int) -> list[list[tuple[int, int]]]:
    """llama.cpp's ``split_equal(n_ubatch, sequential=true)`` of a batch whose ``rows`` are
    ``(sequence id, tokens)`` in batch order (each sequence's tokens together): its ubatches, each
    as the ``(sequence id, tokens)`` it takes."""
    left = dict(rows)
    out: list[list[tuple[int, int]]] = []
    while any(left.values()):
        chosen: list[int] = []
        for seq, _ in rows:  # sequences with tokens left, each the previous one's id + 1
            if left[seq] and (not chosen or seq == chosen[-1] + 1):
                chosen.append(seq)
        take = 0
        while all(left[seq] > take for seq in chosen):  # the same count from each, while all have more
            take += 1
            if (take + 1) * len(chosen) > n_ubatch:
                break
        for seq in chosen:
            left[seq] -= take
        out.append([(seq, take) for seq in chosen])
    return out


def lone_tokens(rows: Sequence[tuple[int, int]], n_ubatch: int) -> set[int]:
    """The sequences that would run a ubatch of one token (and no other row)."""
    return {ub[0][0] for ub in micro_batches(rows, n_ubatch) if len(ub) == 1 and ub[0][1] == 1}


def refeeds(rows: Sequence[tuple[int, int]], able: Collection[int], n_ubatch: int) -> set[int]:
    """The sequences (of those ``able`` to: a previous text token in their KV cells) to feed one more
    token in front, so that no ubatch is a single token; one that cannot is left as it is."""
    extra: set[int] = set()
    if not able:  # no seeded sequence in this step (most steps): nothing to simulate
        return extra
    for _ in range(len(rows) + 1):  # each round settles at least one sequence for good
        grown = [(seq, n + (seq in extra)) for seq, n in rows]
        lone = {seq for seq in lone_tokens(grown, n_ubatch) if seq in able and seq not in extra}
        if not lone:
            break
        extra |= lone
    return extra


def seeded(request: GenerationRequest) -> bool:
    """A request whose sampled tokens we promise to reproduce: a seed, a temperature above 0, and no
    images (an image's cells are the projector's embeddings: there is no token to feed again)."""
    return request.sampling.seeded and not request.images
