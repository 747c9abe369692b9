"""A conversation on the llama.cpp backend with a chat UI's side request after each answer (a title, tags: a
prompt of its own that shares only the chat template's first tokens), under each slot rule.

    .venv/bin/python -m bench.llamacpp_side                 # the shipped rule and the rule before it (~2 min)
    .venv/bin/python -m bench.llamacpp_side --turns 6 --system-words 600

Open WebUI, LibreChat and others ask the model for a title or tags after an answer, while the conversation
waits for its user. Per turn of the conversation: its prompt tokens, how many of them came from a slot's cache
(``prefix_tokens_reused``), and its time to first token, in process on the embedded default model's GGUF
(llama.cpp, ``--threads``), greedy, the side requests answered in between (not timed). Rules are
``bench.llamacpp_slots.RULES``: ``before`` is the shipped one, ``longest`` the rule before it.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from typing import Any
from unittest import mock

from bench.llamacpp_slots import RULES
from bench.prompts import sentence


def conversation(rule: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from gerdsen_ai_server.engine.backends import llamacpp
    from gerdsen_ai_server.engine.engine import InferenceEngine
    from gerdsen_ai_server.engine.options import EngineOptions
    from gerdsen_ai_server.engine.protocol import GenerationRequest, SamplingParams
    from tests.support import TEST_MODELS_DIR

    options = EngineOptions(
        TEST_MODELS_DIR,
        backend="llamacpp",
        max_batch=args.slots,
        context_length=args.context,
        llamacpp_threads=args.threads,
    )
    engine = InferenceEngine(options)
    engine.start()
    turns: list[dict[str, Any]] = []
    try:
        engine.load_model(args.model, trusted=True).result(timeout=300)
        (model,) = engine.models()
        backend, tokenizer = model.model, model.tokenizer
        ends = [int(t) for t in getattr(tokenizer, "eos_token_ids", [tokenizer.eos_token_id])]
        sampling = SamplingParams(temperature=0.0, logit_bias=dict.fromkeys(ends, -100.0))

        def ask(messages: list[dict[str, str]], length: int) -> tuple[str, float, int, int]:
            prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
            before = backend.prefix_tokens_reused
            start, first, parts = time.perf_counter(), 0.0, []
            for event in engine.submit(GenerationRequest(model.model_id, prompt, length, sampling=sampling)):
                first = first or (time.perf_counter() - start if event.token_ids else 0.0)
                parts.append(event.text)
            return "".join(parts), first, len(prompt), backend.prefix_tokens_reused - before

        def choose(prompt: list[int], free: Any, busy: list[int], used: Any) -> int:
            return RULES[rule](prompt, free, busy, used)

        messages = [{"role": "system", "content": sentence(random.Random(7), args.system_words)}]
        with mock.patch.object(llamacpp, "choose_slot", choose):
            for turn in range(args.turns):
                messages.append({"role": "user", "content": sentence(random.Random(100 + turn), 40)})
                text, ttft, tokens, reused = ask(messages, args.answer_tokens)
                messages.append({"role": "assistant", "content": text})
                turns.append({"turn": turn + 1, "prompt": tokens, "reused": reused, "ttft_ms": ttft * 1000})
                title = "Write a five-word title for this chat:\n" + messages[1]["content"]
                ask([{"role": "user", "content": title}], 12)  # the UI's side request, while the user reads
    finally:
        engine.shutdown()
    return turns


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.llamacpp_side", description=__doc__)
    p.add_argument("--rules", default="before,longest", help=f"of {', '.join(RULES)}")
    p.add_argument("--turns", type=int, default=5)
    p.add_argument(
        "--system-words", type=int, default=400, help="the conversation's system prompt (~1.3 tokens a word)"
    )
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--context", type=int, default=4096, help="tokens a slot")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="", help="a GGUF folder (default: the embedded default model's f32 GGUF)")
    args = p.parse_args(argv)
    if not args.model:
        from bench.gguf_model import write_gguf
        from gerdsen_ai_server.engine.formats.gguf import ensure_default_model
        from tests.support import DEFAULT_MODEL, TEST_MODELS_DIR

        folder = ensure_default_model(TEST_MODELS_DIR)
        args.model = str(
            write_gguf(folder, TEST_MODELS_DIR / "llamacpp" / DEFAULT_MODEL / f"{DEFAULT_MODEL}-f32.gguf").parent
        )
    print("| rule | turn | prompt tokens | reused from a slot | TTFT ms |")
    print("|---|---|---|---|---|")
    later: dict[str, list[float]] = {}
    for rule in args.rules.split(","):
        for row in conversation(rule, args):
            print(f"| {rule} | {row['turn']} | {row['prompt']} | {row['reused']} | {row['ttft_ms']:.0f} |", flush=True)
            if row["turn"] > 1:
                later.setdefault(rule, []).append(row["ttft_ms"])
    for rule, values in later.items():
        print(f"{rule}: later turns' median TTFT {statistics.median(values):.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
