"""Fixed, deterministic benchmark text: completion prompts and a long multi-turn chat.

Standard library only: the client side of the benchmark never imports MLX.
"""

from __future__ import annotations

import random

WORDS = (
    "the river morning light city market old road quiet house small garden window winter summer "
    "bread music letter friend station mountain harbour evening story teacher lantern bridge "
    "forest table paper machine engine signal careful bright slowly across under between after "
    "before because while people travel remember simple number question answer history library "
    "kitchen coffee doctor village island weather north south colour orange yellow green silver"
).split()


def sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def completion_prompts(count: int, words: int = 24, seed: int = 0) -> list[str]:
    """``count`` distinct prompts of about ``words`` words (~40 tokens), each starting differently,
    so no two share a cached prefix."""
    return [f"Story {seed}-{i}: " + sentence(random.Random(f"{seed}-{i}"), words) for i in range(count)]


def chat_history(turns: int, nonce: int, words_per_turn: int = 40) -> list[dict[str, str]]:
    """A multi-turn chat ending with a user turn; about 70 tokens a turn with the bench tokenizer.

    ``nonce`` starts the conversation so that different histories share no cached prefix.
    """
    rng = random.Random(f"chat-{nonce}")
    messages = [{"role": "system", "content": f"Conversation {nonce}. You answer briefly."}]
    for t in range(turns):
        messages.append({"role": "user", "content": f"Question {t}: " + sentence(rng, words_per_turn)})
        messages.append({"role": "assistant", "content": sentence(rng, words_per_turn)})
    messages.append({"role": "user", "content": "And then? " + sentence(rng, words_per_turn // 2)})
    return messages
