"""The prompt cache's disk tier across a restart (issue 27, item 3), on a real Gunicorn server with
the `openai` SDK: a prompt answered by one server is found on disk by the next one on the same
models folder (a disk hit in /health and /metrics), and its greedy answer is the one computed
without any cached prefix."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests.support import DEFAULT_MODEL
from tests.support.models import default_model_folder
from tests.support.server import Server, start_server, stop_server

pytestmark = pytest.mark.server

SYSTEM = (
    "You are a careful assistant for a hardware shop. Answer briefly, name the aisle of every item, and "
    "never invent prices. Aisles: 1 tools, 2 paint, 3 garden, 4 plumbing, 5 electrical, 6 timber, 7 fasteners, "
    "8 lighting, 9 flooring, 10 doors and windows, 11 kitchen fittings, 12 bathroom fittings, 13 storage, "
    "14 cleaning, 15 outdoor furniture, 16 seasonal. Hand tools such as hammers, saws and screwdrivers are in "
    "aisle 1; power tools are behind the counter. Paint is mixed to order at the paint desk in aisle 2. Seeds, "
    "soil and hoses are in aisle 3. Pipes, taps and washers are in aisle 4. Cables, plugs and switches are in "
    "aisle 5. Timber is cut to length at the back of aisle 6. Screws, nails and bolts are in aisle 7."
)  # long enough that its disk file is worth reading (engine/prompt_cache_disk.py's DISK_MIN_GAIN)
ASK: list[Any] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where do I find a hammer?"}]


def tiers(srv: Server) -> dict[str, Any]:
    return requests.get(srv.url + "/health", timeout=10).json()["prompt_cache_tiers"]  # type: ignore[no-any-return]


def answer(srv: Server) -> str:
    client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, max_tokens=12, temperature=0)
    return reply.choices[0].message.content or ""


def test_a_prompt_is_found_on_disk_after_a_restart(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / DEFAULT_MODEL).symlink_to(default_model_folder(), target_is_directory=True)
    env = {"IMPETUS_MODELS_DIR": str(models), "IMPETUS_PROMPT_CACHE_DISK_BYTES": str(64 << 20)}

    first = start_server(tmp_path, **env)
    try:
        cold = answer(first)  # no cached prefix anywhere: what the tiers must reproduce
        deadline = time.monotonic() + 30
        while tiers(first)["disk"]["writes"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)  # written through by the writer thread, after the answer
        before = tiers(first)
        assert before["disk"]["writes"] == 1 and before["disk"]["hits"] == 0 and before["ram"]["hits"] == 0
        assert 0 < before["disk"]["bytes"] <= before["disk"]["limit_bytes"]
    finally:
        stop_server(first)  # waits for the exit: the second server starts on the same disk tier
    assert len(list((models / ".prompt-cache").glob("*.safetensors"))) == 1

    second = start_server(tmp_path, **env)
    try:
        assert tiers(second)["disk"]["entries"] == 1  # found again by the new process
        assert answer(second) == cold
        after = tiers(second)
        assert after["disk"]["hits"] == 1 and after["ram"]["hits"] == 0 and after["disk"]["rejected"] == 0
        assert answer(second) == cold  # now from RAM: the disk read is kept there too
        assert tiers(second)["ram"]["hits"] == 1
        metrics = requests.get(second.url + "/metrics", timeout=10).text
        assert 'impetus_prompt_cache_tier_hits_total{tier="disk"} 1.0' in metrics
        assert 'impetus_prompt_cache_tier_bytes{tier="disk"}' in metrics
    finally:
        stop_server(second, wait=False)
