"""Slot choice on the llama.cpp backend: the shipped rule (engine/backends/llamacpp_slots.py) against adjacency rules.

    .venv/bin/python -m bench.llamacpp_slots --simulate            # the rules on a step clock, no model (seconds)
    .venv/bin/python -m bench.llamacpp_slots [--rounds 3]          # in process, the default model on llama.cpp

The workload: ``--chats`` multi-turn conversations, ``--live`` at a time (the next starts when one
ends; the first ones a few steps apart), 2-4 turns each with a pause between turns (the user
reading), every third sharing system prompt A, every third B, the rest their own; and, unless
``--shots 0``, one-turn requests with prompts of their own arriving every 5-40 steps (API calls
beside the chats). Answers are greedy and of fixed lengths (the end token is biased away).

``--simulate`` plays it on a step clock: a request is admitted in the step it arrives, its prompt
takes one step, then one token a step; prompts are the template's shape over word ids. It reports,
paired over ``--seeds`` workloads, the mean micro-batches a decode step (the runs of consecutive busy
slots: llama.cpp's split, llamacpp_ubatch.py) and the prompt tokens reused from the slots' cells.

In process, each round runs every rule on a fresh engine through the engine as the server drives
it (the model's chat template over the whole history), rules in rotating order; per run: mean
micro-batches a ``llama_decode`` becomes (llamacpp_ubatch.py's simulation of each recorded batch;
over every step and over the decode-only steps), ms a step, total wall time, prompt tokens reused,
and how many answers differ from the first rule's (greedy; batch shapes change the last bits of the
logits, so a near tie may flip). A step of the clock is ``--step-ms`` of wall time there, and
llama.cpp runs ``--threads 1`` (the server takes one a core: steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import queue
import random
import statistics
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from unittest import mock

from bench.prompts import WORDS, sentence
from gerdsen_ai_server.engine.backends.llamacpp_slots import choose_slot, common_prefix, runs

Rule = Callable[[list[int], Mapping[int, list[int]], list[int], Mapping[int, int]], int]  # prompt, free, busy, used


SPARE = 8  # prefix tokens the adjacency rule lets a request give up for a slot beside the busy ones


def adjacent(
    prompt: Sequence[int], free: Mapping[int, Sequence[int]], busy: Collection[int], spare: int = SPARE
) -> int:
    """The rule measured and not shipped: among the free slots whose usable prefix (two tokens short of the
    prompt's end: llamacpp.py ``_assign`` feeds those again) is within ``spare`` of the longest, the one that
    leaves the busy slots in the fewest runs, then the longest prefix, then the lowest id."""
    shared = {slot: min(common_prefix(tokens, prompt), max(0, len(prompt) - 2)) for slot, tokens in free.items()}
    best = max(shared.values())
    near = [slot for slot in free if shared[slot] >= best - spare]
    return min(near, key=lambda s: (runs([*busy, s]), -shared[s], s))


def least_evicted(prompt: list[int], free: Mapping[int, list[int]], busy: list[int]) -> int:
    """A rule not taken: adjacency, then the slot whose cells hold the fewest tokens the prompt does
    not share (an empty one before another conversation's history), then the longest prefix."""
    common = {slot: common_prefix(tokens, prompt) for slot, tokens in free.items()}
    best = max(common.values())
    near = [slot for slot in free if common[slot] >= best - SPARE]
    return min(near, key=lambda s: (runs([*busy, s]), len(free[s]) - common[s], -common[s], s))


def longest(prompt: list[int], free: Mapping[int, list[int]], busy: list[int]) -> int:
    """The rule shipped before: the longest prefix, ties to the lowest id, whatever the slot holds."""
    return max(free, key=lambda slot: common_prefix(free[slot], prompt))


def _busy_only(rule: Callable[[list[int], Mapping[int, list[int]], list[int]], int]) -> Rule:
    return lambda prompt, free, busy, used: rule(prompt, free, busy)


RULES: dict[str, Rule] = {
    "before": choose_slot,  # as shipped (llamacpp_slots.py)
    "after": _busy_only(adjacent),  # may give up SPARE prefix tokens for adjacency
    "ties": _busy_only(functools.partial(adjacent, spare=0)),  # adjacency among the longest prefixes only
    "spare16": _busy_only(functools.partial(adjacent, spare=16)),
    "least-evicted": _busy_only(least_evicted),
    "longest": _busy_only(longest),
}


@dataclass
class Chat:
    system: str
    users: list[str]
    lengths: list[int]
    pauses: list[int]  # steps between an answer and the next turn


@dataclass
class Shot:
    at: int  # the step it arrives in
    user: str
    length: int


def script(seed: int, chats: int, shots: int) -> tuple[list[Chat], list[Shot]]:
    rng = random.Random(seed)
    shared = {0: "You are a careful assistant. " + sentence(rng, 40), 1: "You answer briefly. " + sentence(rng, 24)}
    out = []
    for k in range(chats):
        system = shared.get(k % 3) or f"You are assistant number {k}. " + sentence(rng, 20)
        turns = rng.randint(2, 4)
        users = [sentence(rng, rng.randint(6, 40)) for _ in range(turns)]
        lengths = [rng.choice((16, 32, 48, 64)) for _ in users]
        out.append(Chat(system, users, lengths, [rng.randint(2, 8) for _ in users]))
    at, one = 0, []
    for j in range(shots):
        at += rng.randint(5, 40)
        one.append(Shot(at, f"Request {seed}-{j}: " + sentence(rng, rng.randint(12, 40)), rng.choice((16, 32, 64))))
    return out, one


def simulate(rule: Rule, chats: list[Chat], shots: list[Shot], slots: int, live: int) -> tuple[float, int]:
    """(mean micro-batches a decode step, prompt tokens reused) of the workload on a step clock."""
    ids = {w: i + 10 for i, w in enumerate(WORDS)}
    fresh = iter(range(100_000, 10**9))  # answer tokens, and words a system prompt or request has alone

    def words(text: str) -> list[int]:
        return [ids.get(w.strip(".:").lower()) or next(fresh) for w in text.split()]

    cells: list[list[int]] = [[] for _ in range(slots)]
    used = dict.fromkeys(range(slots), 0)  # when each slot was last taken (the backend's LRU order)
    running: dict[int, list[Any]] = {}  # slot -> [owner, tokens left, prompt step done]
    waiting: list[tuple[Any, list[int], int]] = []
    todo, shots = list(range(len(chats))), list(shots)
    workers: list[dict[str, Any]] = [{"at": 3 * w, "chat": None} for w in range(live)]
    step, reused, passes = 0, 0, []
    while todo or waiting or running or shots or any(w["at"] is not None for w in workers):
        while shots and shots[0].at <= step:
            shot = shots.pop(0)
            waiting.append((None, [1, 2, 3, 4, *words(shot.user), 5], shot.length))
        for w in workers:
            if w["at"] is None or w["at"] > step:
                continue
            if w["chat"] is None:
                if not todo:
                    w["at"] = None
                    continue
                chat = chats[todo.pop(0)]
                w["chat"], w["turn"], w["history"] = chat, 0, [1, 2, *words(chat.system)]
            w["history"] += [4, *words(w["chat"].users[w["turn"]]), 5]
            waiting.append((w, list(w["history"]), w["chat"].lengths[w["turn"]]))
            w["at"] = None
        while waiting and len(running) < slots:
            owner, prompt, length = waiting.pop(0)
            slot = rule(prompt, {i: cells[i] for i in range(slots) if i not in running}, list(running), used)
            used[slot] = max(used.values()) + 1
            reused += min(common_prefix(cells[slot], prompt), max(0, len(prompt) - 2))
            cells[slot] = prompt
            running[slot] = [owner, length, False]
        decoding = [slot for slot, (_, _, prefilled) in running.items() if prefilled]
        if decoding:
            passes.append(runs(decoding))
        for slot in list(running):
            owner, left, prefilled = running[slot]
            running[slot][2] = True
            if not prefilled:
                continue
            token = next(fresh)
            cells[slot].append(token)
            running[slot][1] = left - 1
            if left > 1:
                continue
            del running[slot]
            if owner is not None:
                owner["history"].append(token)
                owner["turn"] += 1
                done = owner["turn"] == len(owner["chat"].users)
                owner["at"] = step + 1 if done else step + owner["chat"].pauses[owner["turn"] - 1]
                if done:
                    owner["chat"] = None
        step += 1
    return statistics.fmean(passes), reused


class Recorder:
    """llama-cpp-python's module with ``llama_decode`` timed and each batch's rows kept."""

    def __init__(self, lc: Any) -> None:
        self._lc = lc
        self.steps: list[tuple[list[tuple[int, int]], float]] = []
        self.cpu: list[float] = []  # the calling thread's CPU seconds (all of it at --threads 1): blind to load

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lc, name)

    def llama_decode(self, ctx: Any, batch: Any) -> int:
        rows: list[list[int]] = []
        for i in range(batch.n_tokens):
            seq = batch.seq_id[i][0]
            if rows and rows[-1][0] == seq:
                rows[-1][1] += 1
            else:
                rows.append([seq, 1])
        start, cpu = time.perf_counter(), time.thread_time()
        rc = int(self._lc.llama_decode(ctx, batch))
        self.steps.append(([(s, n) for s, n in rows], time.perf_counter() - start))
        self.cpu.append(time.thread_time() - cpu)
        return rc


def run(rule: str, chats: list[Chat], shots: list[Shot], args: argparse.Namespace) -> dict[str, Any]:
    from gerdsen_ai_server.engine.backends import llamacpp
    from gerdsen_ai_server.engine.backends.llamacpp_ubatch import micro_batches
    from gerdsen_ai_server.engine.engine import InferenceEngine
    from gerdsen_ai_server.engine.options import EngineOptions
    from gerdsen_ai_server.engine.protocol import GenerationRequest, SamplingParams
    from tests.support import TEST_MODELS_DIR

    options = EngineOptions(
        TEST_MODELS_DIR,
        backend=args.backend,
        max_batch=args.slots,
        context_length=args.context,
        llamacpp_threads=args.threads,
    )
    engine = InferenceEngine(options)
    engine.start()
    try:
        engine.load_model(args.model, trusted=True).result(timeout=300)
        (model,) = engine.models()
        assert model.backend == "llamacpp", model.backend
        backend = model.model
        recorder = backend._lc = Recorder(backend._lc)
        tokenizer = model.tokenizer
        ends = [int(t) for t in getattr(tokenizer, "eos_token_ids", [tokenizer.eos_token_id])]
        sampling = SamplingParams(temperature=0.0, logit_bias=dict.fromkeys(ends, -100.0))
        answers: dict[tuple[str, int], str] = {}
        prompt_tokens = [0]
        step_s = args.step_ms / 1000

        def ask(messages: list[dict[str, str]], length: int, key: tuple[str, int]) -> str:
            prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
            prompt_tokens[0] += len(prompt)
            request = GenerationRequest(model.model_id, prompt, length, sampling=sampling)
            answers[key] = text = "".join(event.text for event in engine.submit(request))
            return text

        todo: queue.Queue[int] = queue.Queue()
        for k in range(len(chats)):
            todo.put(k)

        def worker(delay: float) -> None:
            time.sleep(delay)
            while True:
                try:
                    k = todo.get_nowait()
                except queue.Empty:
                    return
                chat = chats[k]
                messages = [{"role": "system", "content": chat.system}]
                for turn, user in enumerate(chat.users):
                    messages.append({"role": "user", "content": user})
                    text = ask(messages, chat.lengths[turn], (f"chat{k}", turn))
                    messages.append({"role": "assistant", "content": text})
                    time.sleep(chat.pauses[turn] * step_s)

        def shoot(j: int, shot: Shot) -> None:
            time.sleep(shot.at * step_s)
            ask([{"role": "user", "content": shot.user}], shot.length, ("shot", j))

        threads = [threading.Thread(target=worker, args=(3 * w * step_s,)) for w in range(args.live)]
        threads += [threading.Thread(target=shoot, args=(j, shot)) for j, shot in enumerate(shots)]

        def choose(prompt: list[int], free: Mapping[int, list[int]], busy: list[int], used: Mapping[int, int]) -> int:
            return RULES[rule](prompt, free, busy, used)

        with mock.patch.object(llamacpp, "choose_slot", choose):
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - start
        steps = recorder.steps
        decode = [(rows, s) for rows, s in steps if all(n == 1 for _, n in rows)]
        decode_cpu = [
            (rows, c) for (rows, _), c in zip(steps, recorder.cpu, strict=True) if all(n == 1 for _, n in rows)
        ]

        def passes(batches: list[tuple[list[tuple[int, int]], float]]) -> float:
            return statistics.fmean(len(micro_batches(rows, llamacpp.BATCH_TOKENS)) for rows, _ in batches)

        return {
            "rule": rule,
            "load": os.getloadavg()[0],
            "wall_s": wall,
            "steps": len(steps),
            "ubatches_per_step": passes(steps),
            "ubatches_per_decode_step": passes(decode),
            "seqs_per_decode_step": statistics.fmean(len(rows) for rows, _ in decode),
            "ms_per_step": 1000 * statistics.fmean(s for _, s in steps),
            "ms_per_decode_step": 1000 * statistics.fmean(s for _, s in decode),
            # The same batch size in both rules: what a step costs by how many sequences it decodes.
            "cpu_ms_per_decode_step": 1000 * statistics.fmean(c for _, c in decode_cpu),
            "decode_cpu_s": sum(recorder.cpu),
            "median_ms_by_seqs": {
                k: round(1000 * statistics.median(s for rows, s in decode if len(rows) == k), 1)
                for k in sorted({len(rows) for rows, _ in decode})
            },
            "median_cpu_ms_by_seqs": {
                k: round(1000 * statistics.median(c for rows, c in decode_cpu if len(rows) == k), 1)
                for k in sorted({len(rows) for rows, _ in decode_cpu})
            },
            "prompt_tokens": prompt_tokens[0],
            "reused": backend.prefix_tokens_reused,
            "answers": answers,
        }
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--simulate", action="store_true", help="the step clock only, no model")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a GGUF, or the default model (f16 on auto)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1: steadier on a shared machine)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=200, help="workloads (--simulate)")
    parser.add_argument("--chats", type=int, default=10)
    parser.add_argument("--live", type=int, default=4, help="conversations at a time")
    parser.add_argument("--shots", type=int, default=10, help="one-turn requests beside the chats")
    parser.add_argument("--slots", type=int, default=6)
    parser.add_argument("--context", type=int, default=1024, help="tokens a slot")
    parser.add_argument("--step-ms", type=float, default=40.0, help="wall time of a step of the script's clock")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rules", default="before,after", help=f"of {', '.join(RULES)}; compared to the first")
    args = parser.parse_args(argv)
    rules = args.rules.split(",")
    if args.simulate:
        print("| rule | micro-batches a decode step | paired change vs " + rules[0] + " | prompt tokens reused |")
        print("|---|---|---|---|")
        got = {}
        for rule in rules:
            got[rule] = [
                simulate(RULES[rule], *script(seed, args.chats, args.shots), args.slots, args.live)
                for seed in range(args.seed, args.seed + args.seeds)
            ]
        for rule, outs in got.items():
            diff = [a[0] - b[0] for a, b in zip(outs, got[rules[0]], strict=True)]
            se = statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else 0.0
            mean = statistics.fmean(r[0] for r in outs)
            print(
                f"| {rule} | {mean:.3f} | {statistics.fmean(diff):+.3f} ± {se:.3f} | {statistics.fmean(r[1] for r in outs):.0f} |"
            )
        return 0
    chats, shots = script(args.seed, args.chats, args.shots)
    runs_: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = rules[r % len(rules) :] + rules[: r % len(rules)]  # each rule first in turn
        done = {rule: run(rule, chats, shots, args) for rule in order}
        for rule in order:
            res = done[rule]
            res["round"] = r
            res["answers_differ"] = sum(done[rules[0]]["answers"][key] != t for key, t in res["answers"].items())
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items() if k != "answers"}))
            runs_.append(res)
    keys = (
        "wall_s",
        "ms_per_decode_step",
        "cpu_ms_per_decode_step",
        "decode_cpu_s",
        "ubatches_per_decode_step",
        "reused",
    )
    print("| rule (median of rounds) | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for rule in rules:
        mine = [r for r in runs_ if r["rule"] == rule]
        print(f"| {rule} | " + " | ".join(f"{statistics.median(r[k] for r in mine):.4g}" for k in keys) + " |")
    at = {(r["round"], r["rule"]): r for r in runs_}
    for rule in rules[1:]:
        for key in ("wall_s", "ms_per_decode_step", "cpu_ms_per_decode_step", "decode_cpu_s"):
            ratios = [at[r, rule][key] / at[r, rules[0]][key] for r in range(args.rounds)]
            print(f"{rule} / {rules[0]}, {key}, by round: " + ", ".join(f"{x:.3f}" for x in ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
