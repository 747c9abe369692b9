"""The agent bench's pieces (bench/agent.py): the workload's sizes and prefixes, the RSS sampler, the verdicts.

`make bench-agent` measures; these prove the measuring is what it says, in about a second.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench import client
from bench.agent import RssSampler
from bench.agent_report import render
from bench.agent_workload import TOOLS, counter, fresh_prompt, system_prompt, turn_message, workload
from gerdsen_ai_server.schemas.openai import Tool


@pytest.fixture(scope="module")
def tokenizer_json(converted_default: Path) -> Path:
    return converted_default / "tokenizer.json"


def test_workload_sizes_and_prefixes(tokenizer_json: Path) -> None:
    count = counter(tokenizer_json)
    work = workload(tokenizer_json, 3000, 300)
    assert 3000 <= work.system_tokens <= 3060 and work.system_tokens == count(work.system)
    for name in ("read_file", "run_command", "create_issue"):
        assert f'"name": "{name}"' in work.system  # the tool definitions are in the shared prompt
    # A cold prompt of the same length shares no prefix with the workload's: its first characters differ.
    assert system_prompt(3000, count, nonce="Cold run. ")[:9] != work.system[:9]
    messages = {turn_message(s, t, 300, count) for s in range(4) for t in range(1, 7)}
    assert len(messages) == 24  # every session's every turn is its own text
    assert all(300 <= count(m) <= 330 for m in messages)
    assert 400 <= count(fresh_prompt(400, count, "x")) <= 430
    assert fresh_prompt(400, count, "x") != fresh_prompt(400, count, "y")


def test_tools_are_valid_openai_tools() -> None:
    assert [Tool.model_validate(t).function.name for t in TOOLS][:2] == ["read_file", "write_file"]


def test_rss_sampler_sees_memory_taken_during_a_turn() -> None:
    """Sampled on a child of its own: pytest's process has servers as children whose memory comes and goes."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.stdin.readline()\n"
        "block = bytearray(200 * 2**20)\n"
        "for i in range(0, len(block), 4096): block[i] = 1\n"
        "print('held', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    sampler = RssSampler(child.pid, interval=0.02)
    sampler.start()
    try:
        deadline = time.monotonic() + 20  # a loaded machine may starve the sampler's thread for a while
        while 0 not in sampler.peaks and time.monotonic() < deadline:
            time.sleep(0.02)
        sampler.turn = 1
        time.sleep(0.1)  # a sample begun while turn was 0 is counted as turn 1's: let it pass first
        child.stdin.write("allocate\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "held"
        while sampler.peaks.get(1, 0) < sampler.peaks[0] + 150 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.02)
        sampler.stop()  # before the block goes
        assert sampler.peaks[1] >= sampler.peaks[0] + 150 * 2**20
        assert sampler.peaks[0] < 100 * 2**20  # an interpreter, no block yet
        assert sampler.peak == max(sampler.peaks.values())
    finally:
        sampler.stop()
        child.kill()
        child.wait()


def _run(turn_ttfts: list[float], ref: float) -> dict[str, Any]:
    turns = [[client.Result(ok=True, ttft=t, tokens=100, prompt_tokens=4000)] * 4 for t in turn_ttfts]
    return {
        "label": "ours, MLX",
        "turns": turns,
        "wall": 12.0,
        "ref": {"alone": ref / 3, "together": ref, "errors": []},
        "rss_loaded": 300 * 2**20,
        "rss_peak": 900 * 2**20,
        "rss_turns": {1: 800 * 2**20, 2: 850 * 2**20, 3: 900 * 2**20},
        "info": {"compute_dtype": "float32"},
        "load": 3.25,
    }


def test_report_verdicts() -> None:
    args = argparse.Namespace(
        sessions=4, turns=3, turn_tokens=300, max_tokens=100, n_ctx=8192, disk_bytes=2**30, ours_env=[]
    )
    work = SimpleNamespace(system_tokens=4000)
    cold = client.Result(ok=True, ttft=5.0, prompt_tokens=4300)
    hit = client.Result(ok=True, ttft=0.5, prompt_tokens=4300)
    restart = {"cold": cold, "disk": hit, "disk_tier": True, "metrics_before": {}, "metrics_after": {}}
    text = render(args, "make bench-agent", "now", 60, work, {"ours": _run([9.0, 0.9, 1.1], 0.5)}, restart)
    assert "| ours, MLX | 2 | 4000 | 900 | 900 | 1.8x |" in text
    assert "2.2x not met" in text  # the worst later turn decides
    assert "| 800 → 900 |" not in text and "| 850 → 900 | 3.2 |" in text
    assert "10.0x **met**" in text
    text = render(args, "c", "now", 60, work, {"ours": _run([9.0, 0.9, 0.9], 0.5)}, {**restart, "disk_tier": False})
    assert "1.8x **met**" in text and "not met (no disk tier yet)" in text
