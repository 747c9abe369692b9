"""The workloads and what is measured of them: raw in-process mlx-lm and llama.cpp (a pass each, and
the resident ``bench.raw --serve`` that measures the limits beside the servers), a concurrency level
on a server, and the multi-turn chat's cold and warm time to first token; the machine's steal time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import requests

from bench import client
from bench.prompts import chat_history, completion_prompts
from bench.report import say
from bench.schedule import PAIRED
from bench.servers import server_cpu
from tests.support import ROOT
from tests.support.server import Server


def raw_cmd(model_dir: Path, dtype: str, args: argparse.Namespace) -> list[str]:
    """``bench.raw`` on the bench model, as a full pass and as the resident process (``--serve``) alike."""
    return (
        [
            sys.executable,
            "-m",
            "bench.raw",
            "--single-reps",
            "1" if args.tiny else "3",
            "--model",
            str(model_dir),
            "--max-tokens",
            str(args.max_tokens),
            "--prompt-words",
            str(args.prompt_words),
        ]
        + (["--dtype", dtype] if dtype else [])
        + (["--compiled"] if getattr(args, "raw_compiled", False) else [])
    )


def run_raw(label: str, model_dir: Path, env: dict[str, str], dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = raw_cmd(model_dir, dtype, args) + ["--batches", ",".join(map(str, args.batch_sizes))]
    say(f"raw mlx-lm, {label} ...")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"bench.raw ({label}) failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["label"] = label
    say(
        f"  one stream {result['single']['decode_tps']:.1f} tok/s; "
        + ", ".join(f"batch {b['n']}: {b['e2e_tps']:.1f}" for b in result["batch"])
    )
    return result


def run_raw_llamacpp(gguf: Path, env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "bench.raw_llamacpp",
        "--model",
        str(gguf),
        "--max-tokens",
        str(args.max_tokens),
        "--prompt-words",
        str(args.prompt_words),
        "--single-reps",
        "3",
    ]
    say("raw llama.cpp (llama-cpp-python, in process), one stream ...")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"bench.raw_llamacpp failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    say(f"  one stream {result['single']['decode_tps']:.1f} tok/s")
    return dict(result)


def warm_up(server: Server, args: argparse.Namespace) -> None:
    """The first requests allocate buffers; not measured."""
    client.run_level(server.url, server.model, completion_prompts(4, args.prompt_words, seed=99), 4, 4)


def measure_level(server: Server, args: argparse.Namespace, streams: int, round_: int = 0) -> client.LevelResult:
    n = max(streams * args.requests_per_stream, args.min_requests)  # one stream: a few requests, not one
    # New prompts each round: a repeated prompt would be answered from the prefix cache.
    prompts = completion_prompts(n, args.prompt_words, seed=1000 + streams + 100 * round_)
    cpu0 = server_cpu(server)
    level = client.run_level(server.url, server.model, prompts, streams, args.max_tokens)
    level.server_cores = (server_cpu(server) - cpu0) / level.wall
    say(
        f"  {server.name}, {streams:>2} streams: {level.aggregate_tps:6.1f} tok/s, TTFT p50 "
        f"{level.ttft(0.5) * 1000:6.0f} ms p99 {level.ttft(0.99) * 1000:6.0f} ms ({len(level.ok)}/{n} ok, "
        f"{level.tokens} tokens, {level.wall:.1f} s, load {os.getloadavg()[0]:.1f})"
        f"{'  errors: ' + '; '.join(level.errors[:3]) if level.errors else ''}"
    )
    return level


class RawWorker:
    """``bench.raw --serve``: the reference configuration loaded once, measuring a limit when asked (idle
    in between), so that the limits are taken in the same rounds as the servers' levels."""

    def __init__(
        self, label: str, model_dir: Path, env: dict[str, str], dtype: str, args: argparse.Namespace, logs: Path
    ) -> None:
        self.label, self.log_path = label, logs / "raw-worker.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                raw_cmd(model_dir, dtype, args) + ["--serve"],
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self._answer()  # {"ready": ...} once the model is loaded and warm
        self.rounds: dict[int, list[dict[str, Any]]] = {n: [] for n in PAIRED}

    def _answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"bench.raw --serve ({self.label}) exited:\n{self.log_path.read_text()[-3000:]}")
        return dict(json.loads(line))

    def measure(self, streams: int, round_: int) -> None:
        assert self.process.stdin is not None
        request = {**PAIRED[streams], "seed": 1000 + streams + 100 * round_}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        out = self._answer()
        self.rounds[streams].append(out)
        figure = out["decode_tps"] if streams == 1 else out["e2e_tps"]
        say(
            f"  raw {self.label}, {'one stream' if streams == 1 else 'batch_generate 8'}: {figure:6.1f} tok/s "
            f"(load {os.getloadavg()[0]:.1f})"
        )

    def best(self) -> dict[str, Any]:
        """The best round of each limit: ``single`` by decode rate, ``batch8`` by tokens over wall time."""
        out: dict[str, Any] = {}
        if self.rounds[1]:
            out["single"] = max(self.rounds[1], key=lambda r: r["decode_tps"])
        if self.rounds[8]:
            out["batch8"] = max(self.rounds[8], key=lambda r: r["e2e_tps"])
        return out

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def history_turns(target_tokens: int, tokenizer_json: Path) -> int:
    """Turns of ``chat_history`` whose text comes closest to ``target_tokens`` tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))

    def count(turns: int) -> int:
        return sum(len(tok.encode(m["content"]).ids) + 5 for m in chat_history(turns, 0))

    turns = 1
    while count(turns + 1) <= target_tokens:
        turns += 1
    return turns


def cache_hits(server: Server) -> int | None:
    """Our server's prompt-prefix cache hits so far (/metrics); None for a server without them."""
    try:
        text = requests.get(server.url + "/metrics", timeout=10).text
    except requests.RequestException:
        return None
    for line in text.splitlines():
        if line.startswith("impetus_prompt_cache_hits") and not line.startswith("#"):
            try:
                return int(float(line.split()[-1]))
            except ValueError:
                return None
    return None


def measure_chat(server: Server, args: argparse.Namespace, reps: int) -> dict[str, Any]:
    pairs = []
    hits0 = cache_hits(server)
    for rep in range(reps):
        history = chat_history(args.turns, nonce=hash((server.name, rep)) % 10**6)
        cold = client.chat(server.url, server.model, history, max_tokens=16)
        if not cold.ok:
            say(f"  chat cold failed: {cold.error}")
            continue
        more = history + [
            {"role": "assistant", "content": cold.text},
            {"role": "user", "content": "Thank you. One more question: why?"},
        ]
        warm = client.chat(server.url, server.model, more, max_tokens=16)
        if not warm.ok:
            say(f"  chat warm failed: {warm.error}")
            continue
        pairs.append((cold, warm))
    if not pairs:
        return {}
    cold_ttft = statistics.median(c.ttft for c, _ in pairs)
    warm_ttft = statistics.median(w.ttft for _, w in pairs)
    result = {
        "history_tokens": pairs[0][0].prompt_tokens,
        "warm_prompt_tokens": pairs[0][1].prompt_tokens,
        "cold": cold_ttft,
        "warm": warm_ttft,
        "reps": len(pairs),
        "hits": None,
    }
    hits1 = cache_hits(server)
    if hits0 is not None and hits1 is not None:
        result["hits"] = hits1 - hits0
    say(
        f"  chat, {result['history_tokens']}-token history: cold TTFT {cold_ttft * 1000:.0f} ms, "
        f"warm {warm_ttft * 1000:.0f} ms ({cold_ttft / warm_ttft:.1f}x)"
    )
    return result


def best_of(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Figure by figure, the faster of two raw passes (other load on the machine only ever slows one)."""
    out = dict(a)
    out["passes"] = a.get("passes", 1) + 1
    for part in ("single", "single_batchgen"):
        if part in a and part in b:
            out[part] = {k: (max(a[part][k], b[part][k]) if k.endswith("tps") else a[part][k]) for k in a[part]}
    by_n = {x["n"]: x for x in b["batch"]}
    out["batch"] = [
        {k: (max(x[k], by_n[x["n"]][k]) if k.endswith("tps") and x["n"] in by_n else x[k]) for k in x}
        for x in a["batch"]
    ]
    return out


def cpu_times() -> tuple[int, int] | None:
    """(steal, total) CPU ticks of this machine since boot, from Linux's /proc/stat; None elsewhere."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (fields[7], sum(fields)) if len(fields) == 8 else None


def steal_share(start: tuple[int, int] | None, end: tuple[int, int] | None) -> float | None:
    """The share of CPU time the hypervisor took between two ``cpu_times()`` readings: a disturbed run shows."""
    if start is None or end is None or end[1] <= start[1]:
        return None
    return (end[0] - start[0]) / (end[1] - start[1])
