"""The side-by-side benchmark runs end to end (tiny mode) and its pieces do what they say.

This proves the bench works, not speed: `make bench` measures speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench import client
from bench.measure import cpu_times, steal_share
from bench.model import TINY, cut_tokenizer
from bench.profiling import summarize_profile, thread_names
from bench.report import BEGIN, END, GPU_BEGIN, GPU_END, paired_table, write_doc
from bench.schedule import faster, level_rounds, measured
from bench.targets import targets

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.timing
@pytest.mark.timeout(180)
def test_tiny_bench_end_to_end(converted_default: Path, tmp_path: Path) -> None:
    out = tmp_path / "performance.md"
    start = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gerdsen_ai_server.cli",
            "bench",
            "--tiny",
            "--no-profile",
            "--model-dir",
            str(tmp_path / "bench-model"),
            "--models-dir",
            str(converted_default.parent),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert time.monotonic() - start < 120  # typically ~10 s

    doc = out.read_text()
    assert doc.startswith("# Performance") and BEGIN in doc and END in doc
    for heading in (
        "### Raw in-process mlx-lm",
        "### Servers, same streaming client",
        "### Multi-turn chat",
        "### Targets (issue 3)",
    ):
        assert heading in doc, heading
    assert "| bf16 as stored, reference BLAS |" in doc
    assert "| ours (impetus serve) | 1 |" in doc and "| ours (impetus serve) | 2 |" in doc
    assert "| 1/1 |" in doc and "| 2/2 |" in doc  # every request answered
    assert "one stream: ours / raw in-process decode (fp32" in doc and "same rounds): the one round's ratio" in doc
    assert "| one stream: decode rate | 1 |" in doc  # the resident raw process measured beside the servers
    assert "| mlx_lm.server" not in doc  # --tiny skips it
    assert ("(steal, /proc/stat) during the run: " in doc) == sys.platform.startswith("linux")
    assert result.stdout.count("### Servers") == 1  # the table is printed too

    # The model is a standard MLX folder in bfloat16 that never ends a generation early.
    config = json.loads((tmp_path / "bench-model" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["hidden_size"] == TINY.hidden


def test_cut_tokenizer_is_a_valid_smaller_bpe(converted_default: Path) -> None:
    from tokenizers import Tokenizer

    full = json.loads((converted_default / "tokenizer.json").read_text())
    cut = cut_tokenizer(full, 512)
    assert len(cut["model"]["vocab"]) == 512
    assert all(t["id"] < 512 for t in cut["added_tokens"])
    tok = Tokenizer.from_str(json.dumps(cut))
    text = "The harbour light, 42 ways: café!"
    ids = tok.encode(text).ids
    assert max(ids) < 512
    assert tok.decode(ids) == text


def test_percentile() -> None:
    assert client.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert client.percentile([1.0, 2.0], 0.99) == pytest.approx(1.99)
    assert client.percentile([], 0.5) != client.percentile([], 0.5)  # NaN


def test_level_result_counts_only_ok_requests() -> None:
    ok = client.Result(ok=True, ttft=0.1, total=1.1, tokens=11)
    bad = client.Result(ok=False, error="HTTP 503")
    level = client.LevelResult(streams=2, wall=2.0, results=[ok, bad])
    assert level.tokens == 11 and level.aggregate_tps == 5.5
    assert level.errors == ["HTTP 503"]
    assert ok.decode_tps == pytest.approx(10.0)


def test_profile_summary_buckets_the_engine_thread() -> None:
    raw = "\n".join(
        [
            "thread (11): impetus-engine;Thread.run (threading.py:982);InferenceEngine._run (engine.py:1);"
            "InferenceEngine._step (engine.py:2);BatchGenerator.next (mlx_lm/generate.py:1);"
            "GenerationBatch._step (mlx_lm/generate.py:1434) 70",
            "thread (11): impetus-engine;Thread.run (threading.py:982);InferenceEngine._run (engine.py:1);"
            "InferenceEngine._emit (engine.py:3) 20",
            "thread (11): impetus-engine;Thread.run (threading.py:982);InferenceEngine._run (engine.py:1);"
            "InferenceEngine._drain_commands (engine.py:4);Queue.get (queue.py:180) 10",
            "thread (12): ThreadPoolExecutor-0_0;Thread.run (threading.py:982);Queue.get (queue.py:180) 100",
            "thread (11): impetus-engine 3",  # a sample caught outside any Python frame (it broke a full run)
        ]
    )
    summary = summarize_profile(raw)
    assert summary["engine_samples"] == 103
    buckets = dict(summary["buckets"])
    assert buckets["decode: waiting on MLX compute (mx.eval / tolist in GenerationBatch._step)"] == 70
    assert buckets["per-token output: detokenize, stop strings, stream put (_emit)"] == 20
    assert buckets["idle: waiting for work (command queue)"] == 10
    assert buckets["engine loop, other"] == 3
    assert thread_names(raw) == {11: "impetus-engine", 12: "ThreadPoolExecutor-0_0"}


def test_write_doc_keeps_text_outside_the_markers(tmp_path: Path) -> None:
    path = tmp_path / "performance.md"
    write_doc(path, "first")
    assert "first" in path.read_text()
    path.write_text("# Mine\n\nnotes above\n\n" + path.read_text().split("## Latest run\n\n", 1)[1] + "\nnotes below\n")
    write_doc(path, "second")
    text = path.read_text()
    assert "second" in text and "first" not in text
    assert text.startswith("# Mine") and "notes below" in text


def test_a_gpu_run_gets_its_own_block_and_leaves_the_cpu_run_alone(tmp_path: Path) -> None:
    path = tmp_path / "performance.md"
    write_doc(path, "cpu figures")
    write_doc(path, "gpu figures", gpu="CUDA, NVIDIA H200")
    write_doc(path, "gpu figures again", gpu="CUDA, NVIDIA H200")
    text = path.read_text()
    assert text.count("## Latest GPU run") == 1 and text.count(GPU_BEGIN) == 1 and text.count(GPU_END) == 1
    assert "cpu figures" in text and "gpu figures again" in text and "gpu figures\n" not in text
    assert text.index(END) < text.index(GPU_BEGIN)  # appended after the CPU run
    write_doc(path, "cpu again")
    assert "cpu again" in path.read_text() and "gpu figures again" in path.read_text()


def _level(streams: int, tokens_per_s: float) -> client.LevelResult:
    level = client.LevelResult(streams=streams, wall=1.0)
    level.results = [client.Result(ok=True, ttft=0.1, tokens=int(tokens_per_s), total=1.0)]
    return level


def test_gpu_targets_check_batching_scales_and_drop_the_cpu_fast_path_target() -> None:
    raw = {
        "bf16": {
            "label": "bf16 as stored, GPU",
            "single": {"decode_tps": 100.0, "e2e_tps": 90.0},
            "batch": [{"n": 8, "e2e_tps": 400.0, "decode_tps": 450.0}],
        }
    }
    servers = {
        "ours": {"levels": [_level(1, 100.0), _level(8, 350.0)]},
        "mlx": {"levels": [_level(1, 90.0), _level(8, 300.0)]},
    }
    gpu_rows = "\n".join(targets(raw, servers, {"compute_dtype": "as stored"}, gpu="CUDA"))
    assert "8 streams / one stream" in gpu_rows and "3.50x | ≥ 3x | **met**" in gpu_rows
    assert "≥ 4x" not in gpu_rows
    servers["ours"]["levels"][1] = _level(8, 250.0)
    assert "2.50x | ≥ 3x | not met" in "\n".join(targets(raw, servers, {}, gpu="CUDA"))
    assert "8 streams / one stream" not in "\n".join(targets(raw, servers, {}))  # CPU run: no such row


def test_the_1_and_8_stream_levels_are_repeated_and_their_faster_round_counts() -> None:
    args = argparse.Namespace(level_repeats=2)
    assert [level_rounds(args, n) for n in (1, 4, 8, 16)] == [2, 1, 2, 1]
    slow = client.LevelResult(streams=8, wall=2.0, results=[client.Result(ok=True, ttft=0.1, total=1, tokens=100)])
    fast = client.LevelResult(streams=8, wall=1.0, results=[client.Result(ok=True, ttft=0.2, total=1, tokens=100)])
    assert faster(None, slow) is slow
    assert faster(slow, fast) is fast and faster(fast, slow) is fast


def test_targets_compare_with_the_limits_measured_in_the_same_rounds() -> None:
    """The raw pass at the start says 200 tok/s for batch_generate-8; measured beside the servers, the
    best round said 180: the target uses 180, and the round-by-round table shows both rounds."""
    raw = {
        "fp32": {
            "label": "fp32, OpenBLAS",
            "single": {"decode_tps": 60.0, "e2e_tps": 55.0},
            "batch": [{"n": 8, "e2e_tps": 200.0, "decode_tps": 230.0}],
        }
    }
    servers = {"ours": {"levels": [_level(1, 40.0), _level(8, 171.0)]}}
    info = {"compute_dtype": "float32"}
    rows = "\n".join(targets(raw, servers, info))
    assert "171.0 / 200.0 = 86% | ≥ 95 % | not met" in rows
    rounds = {
        1: [{"decode_tps": 44.0, "e2e_tps": 40.0}, {"decode_tps": 41.0, "e2e_tps": 38.0}],
        8: [{"e2e_tps": 170.0, "decode_tps": 190.0}, {"e2e_tps": 180.0, "decode_tps": 200.0}],
    }
    raw["fp32"]["paired"] = {"single": rounds[1][0], "batch8": rounds[8][1], "rounds": rounds}
    rows = "\n".join(targets(raw, servers, info))
    assert "fp32, OpenBLAS, same rounds" in rows
    assert "171.0 / 180.0 = 95% | ≥ 95 % | **met**" in rows
    servers["ours"]["rounds"] = {1: [_level(1, 40.0), _level(1, 39.0)], 8: [_level(8, 150.0), _level(8, 171.0)]}
    table = "\n".join(paired_table(raw, servers))
    # With the rounds at hand, the verdict is the median of the rounds' ratios (88 %, 95 %), the best
    # rounds for information.
    rows = "\n".join(targets(raw, servers, info))
    assert "median of the 2 rounds' ratios | 88%, 95% → 92% | ≥ 95 % | not met" in rows
    assert "each side's best round | 171.0 / 180.0 = 95% | (for information)" in rows
    assert "| 8 streams: batch_generate-8 vs aggregate | 2 | 180.0 | 171.0 | 95% |" in table
    assert "| 8 streams: batch_generate-8 vs aggregate | 1 | 170.0 | 150.0 | 88% |" in table


def test_the_slow_bf16_peers_run_each_level_once_and_the_preload_only_at_8_streams() -> None:
    cpu = argparse.Namespace(gpu="")
    assert measured(cpu, "ours", 1, 1) and measured(cpu, "mlx+openblas fp32", 8, 1)
    assert measured(cpu, "ours malloc", 8, 0) and not measured(cpu, "ours malloc", 8, 1)  # for information: once
    assert measured(cpu, "mlx", 16, 0) and not measured(cpu, "mlx", 8, 1)
    assert measured(cpu, "mlx+openblas", 8, 0) and not measured(cpu, "mlx+openblas", 1, 0)
    assert not measured(cpu, "mlx+openblas", 8, 1)
    assert measured(argparse.Namespace(gpu="CUDA"), "mlx", 8, 1)  # on a GPU mlx_lm.server is not slow


def test_steal_share_is_the_hypervisors_part_of_the_cpu_time_between_two_readings() -> None:
    assert steal_share((5, 1000), (35, 2000)) == pytest.approx(0.03)
    assert steal_share(None, (35, 2000)) is None  # not Linux: nothing to say
    assert steal_share((5, 1000), (5, 1000)) is None  # no time passed
    now = cpu_times()
    if sys.platform.startswith("linux"):
        assert now is not None and 0 <= now[0] <= now[1]


def test_each_stream_keeps_one_connection() -> None:
    """The client reads each stream to its end after [DONE], as the OpenAI SDK does, so a stream's
    requests share one keep-alive connection (broken off at [DONE], each request opened a new one)."""
    import http.server
    import socketserver

    connections: list[int] = []

    class SSE(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            connections.append(1)
            super().setup()

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for event in ('{"choices": [{"text": "hi"}]}', "[DONE]"):
                data = f"data: {event}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                time.sleep(0.01)
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args: object) -> None:
            pass

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    with Server(("127.0.0.1", 0), SSE) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        level = client.run_level(f"http://127.0.0.1:{server.server_address[1]}", "m", ["a"] * 6, 2, 4)
        server.shutdown()
    assert [r.tokens for r in level.results] == [1] * 6
    assert len(connections) == 2


def test_the_proxy_table_shows_each_figures_step_time_and_the_targets_median_ratios(tmp_path: Path) -> None:
    from bench import overhead

    args = overhead.parse_args(["--streams", "1,8", "--rounds", "2"])
    assert args.batch_sizes == [8] and args.ours_env[0] == "IMPETUS_BACKEND=mlx"
    raw = {
        "single": {"decode_tps": 800.0},
        "single_batchgen": {"decode_tps": 900.0},
        "batch": [{"n": 8, "e2e_tps": 3200.0}],
    }
    ours1, mlx8 = _level(1, 401.0), _level(8, 2000.0)  # one stream: 400 tokens after the first in 1.0 - 0.1 s
    assert overhead.level_figure(ours1) == pytest.approx(400 / 0.9) and overhead.level_figure(mlx8) == 2000.0
    rounds = [
        {**overhead.raw_figures(raw), ("ours", 1): 400.0, ("ours", 8): 2400.0, ("mlx", 1): 300.0, ("mlx", 8): 2000.0},
        {("raw", 1): 700.0, ("raw", 8): 3000.0, ("ours", 1): 420.0, ("ours", 8): 2910.0, ("mlx", 8): 2200.0},
    ]
    body = overhead.render(rounds, args, ["Run header"])
    # the best round of each figure; ms/step = streams / tok/s; our overhead = our step - raw's at that size
    assert "| raw `stream_generate` | 1 | 800.0 | 1.25 | 1.250 |  |" in body
    assert "| raw `batch_generate`-8 | 8 | 3200.0 | 2.50 | 0.312 |  |" in body
    assert "| raw `BatchGenerator` alone, one prompt | 1 | 900.0 | 1.11 | 1.111 |  |" in body
    assert "| ours (impetus serve) | 1 | 420.0 | 2.38 | 2.381 | +1.13 |" in body
    assert "| ours (impetus serve) | 8 | 2910.0 | 2.75 | 0.344 | +0.25 |" in body
    assert "| mlx_lm.server (fp32 copy, OpenBLAS) | 8 | 2200.0 |" in body
    # targets: the median of the rounds' ratios (50 % and 60 %; 75 % and 97 %; 1.2x and ~1.32x)
    assert "| one stream: ours / raw `stream_generate` | 55% (median of 2 rounds) | >= 90% | not met |" in body
    assert "| 8 streams: ours / raw `batch_generate`-8 | 86% (median of 2 rounds) | >= 85% | **met** |" in body
    assert "| 8 streams: ours / `mlx_lm.server` | 1.26x (median of 2 rounds) | >= 1.2x | **met** |" in body
    assert "16 streams" not in body  # not measured: no row, no target
    assert "Where the host time sits" not in body  # no py-spy, no split

    # the CPU split: each group's microseconds a token, the median of the rounds; a group never charged has no row
    level = _level(8, 2000.0)
    level.client_cores = 0.5  # half a core over the level's wall time
    before = dict.fromkeys(overhead.CPU_GROUPS, 1.0)
    split = overhead.measure_split(level, before, {**before, "engine": 1.2, "http": 1.1})
    per_token = 1e6 / level.tokens
    assert split["engine"] == pytest.approx(0.2 * per_token) and split["client"] == pytest.approx(0.5 * per_token)
    splits = [{8: split}, {8: {**split, "engine": split["engine"] + 2, "http": split["http"] + 2}}]
    body = overhead.render(rounds, args, ["Run header"], splits)
    assert f"| engine thread | {split['engine'] + 1:.0f} |" in body and "| CPU µs / token | 8 streams |" in body
    assert "other Python threads" not in body
    assert split["ours"] == pytest.approx(sum(split[g] for g in overhead.CPU_GROUPS))
    # raw mlx-lm's CPU a token in the same round (bench.raw): its calling thread, the rest, and the sum
    raw_cpu = overhead.raw_split(
        {
            "single": {"cpu_main_us": 300.0, "cpu_native_us": 200.0},
            "batch": [{"n": 8, "cpu_main_us": 50.0, "cpu_native_us": 100.0}],
        }
    )
    assert raw_cpu[1]["raw"] == 500.0 and raw_cpu[8] == {"raw_main": 50.0, "raw_native": 100.0, "raw": 150.0}
    body = overhead.render(rounds, args, ["Run header"], [{8: {**split, **raw_cpu[8]}, 1: raw_cpu[1]}])
    assert "| **raw mlx-lm, all its threads** | 500 | 150 |" in body
    assert f"| **our server, all its threads** |  | {split['ours']:.0f} |" in body

    path = tmp_path / "performance.md"
    path.write_text("# Performance\n\n<!-- bench:begin -->\nmain run\n<!-- bench:end -->\n")
    for text in ("proxy one", "proxy two"):
        overhead.write_doc(path, text, markers=(overhead.BEGIN, overhead.END), title=overhead.TITLE)
    doc = path.read_text()
    assert doc.count(overhead.TITLE) == 1 and "proxy two" in doc and "proxy one" not in doc and "main run" in doc


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.timing
@pytest.mark.timeout(240)
def test_the_proxy_runs_raw_ours_and_mlx_lm_server_side_by_side(converted_default: Path, tmp_path: Path) -> None:
    out = tmp_path / "performance.md"
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--proxy", "--rounds", "1", "--max-tokens", "8", "--streams", "1,8"]
        + ["--model-dir", str(tmp_path / "tiny"), "--models-dir", str(converted_default.parent), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = out.read_text()
    assert "## Host overhead: the micro-model proxy" in doc and "compute dtype float32" in doc
    for row in (
        "| raw `stream_generate` | 1 |",
        "| raw `batch_generate`-8 | 8 |",
        "| raw `BatchGenerator` alone, one prompt | 1 |",
        "| ours (impetus serve) | 1 |",
        "| ours (impetus serve) | 8 |",
        "| mlx_lm.server (fp32 copy, OpenBLAS) | 1 |",
        "| mlx_lm.server (fp32 copy, OpenBLAS) | 8 |",
    ):
        assert row in doc, row
    for target in ("one stream: ours / raw", "8 streams: ours / raw `batch_generate`-8", "8 streams: ours / `mlx"):
        assert f"| {target}" in doc and "(median of 1 round) |" in doc, target
    assert "n/a" not in doc  # every figure measured
    # raw mlx-lm decodes with the step our server compiles on a CPU: the comparison is of host overhead only
    assert "Raw mlx-lm: the forward pass our server runs" in doc
