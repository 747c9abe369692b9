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
from bench.agent import RssSampler, default_model_dir, shape_spec
from bench.agent_report import BEGIN, END, flop_floor, markers, render
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


def _run(turn_ttfts: list[float], ref: float, paired: dict[int, float] | None = None) -> dict[str, Any]:
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
        "paired": paired or {},  # fresh prompts right after these turns
    }


def test_report_verdicts() -> None:
    args = argparse.Namespace(
        sessions=4, turns=3, turn_tokens=300, max_tokens=100, n_ctx=8192, disk_bytes=2**30, ours_env=[]
    )
    work = SimpleNamespace(system_tokens=4000)
    cold = client.Result(ok=True, ttft=5.0, prompt_tokens=4300)
    hit = client.Result(ok=True, ttft=0.5, prompt_tokens=4300)
    restart = {"cold": cold, "disk": hit, "disk_tier": True, "metrics_before": {}, "metrics_after": {}}
    text = render(args, "make bench-agent", "now", 60, work, {"ours": _run([9.0, 0.9, 1.1], 0.5, {2: 0.45})}, restart)
    assert "| ours, MLX | 2 | 4000 | 900 | 900 | 1.8x |" in text
    # The paired reference where there is one (turn 2), none at turn 3.
    assert "| 850 | n/a | 450 (2.0x) |" in text and "| 900 | n/a |  |" in text
    assert "2.2x not met" in text  # the worst later turn decides
    paired = _run([9.0, 0.9, 1.1], 0.5, {2: 0.45, 3: 0.6})  # turn 2 is now the worst: 2.0x
    assert "2.0x **met**" in render(args, "c", "now", 60, work, {"ours": paired}, restart)
    assert "| 800 → 900 |" not in text and "| 850 → 900 | 3.2 |" in text
    assert "10.0x **met**" in text
    text = render(args, "c", "now", 60, work, {"ours": _run([9.0, 0.9, 0.9], 0.5)}, {**restart, "disk_tier": False})
    assert "1.8x **met**" in text and "not met (no disk tier yet)" in text


def test_qwen_shape_config_and_stamp() -> None:
    """The realistic shape is Qwen2.5-0.5B's config, built into its own folder under its own stamp; the bench
    model's stamp is the one of folders built before the shape fields existed (no rebuild)."""
    from bench.model import _LATER_FIELDS, BENCH, QWEN25_05B, _stamp, config_for, default_out, shape_name

    config = config_for(shape_spec("qwen2.5-0.5b"))
    assert {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")} == {
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
    }
    assert (config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"]) == (2, 4864, 2048)
    assert (config["rope_theta"], config["rms_norm_eps"], config["tie_word_embeddings"]) == (1e6, 1e-6, True)
    assert config["max_position_embeddings"] == 8192
    assert config_for(BENCH)["rope_theta"] == 10000.0 and config_for(BENCH)["rms_norm_eps"] == 1e-5
    assert not set(_LATER_FIELDS) & set(_stamp(BENCH)) and _stamp(QWEN25_05B)["rope_theta"] == 1e6
    assert shape_name(shape_spec("qwen2.5-0.5b")) == "qwen2.5-0.5b" and shape_name(shape_spec("bench")) == "bench"
    assert default_out(QWEN25_05B).name == "bench-model-qwen2.5-0.5b" and default_out(BENCH).name == "bench-model"
    assert default_model_dir("qwen2.5-0.5b").name == "bench-model-qwen2.5-0.5b-8k"
    assert markers("bench") == (BEGIN, END) and markers("qwen2.5-0.5b")[0] == "<!-- bench-agent-qwen2.5-0.5b:begin -->"


def test_flop_floor() -> None:
    """The note's arithmetic: ~2.5x on the bench model at 4,800 cached tokens; ~1.6x on Qwen2.5-0.5B's shape,
    whose projections and MLP weigh 4.6x more per unit of hidden size; 1x with nothing cached."""
    bench, qwen = shape_spec("bench"), shape_spec("qwen2.5-0.5b")
    assert 2.4 <= flop_floor(bench, 4800, 420, 400) <= 2.7
    assert 1.5 <= flop_floor(qwen, 4330, 420, 400) <= 1.7
    assert flop_floor(qwen, 6000, 420, 400) > flop_floor(qwen, 4330, 420, 400)
    assert flop_floor(qwen, 0, 400, 400) == 1.0
    assert flop_floor(qwen, 4000, 0, 400) != flop_floor(qwen, 4000, 0, 400)  # nan: nothing new
