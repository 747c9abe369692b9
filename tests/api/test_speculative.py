"""Speculative decoding through the real server and the openai SDK: vLLM's ``speculative_config`` in a
chat request (extra_body), prompt lookup or a draft model, gives the plain answer, its counters reach
/metrics, and a bad config is a 400 naming the field."""

from __future__ import annotations

import re

import openai
import pytest
import requests

from tests.support import DEFAULT_MODEL

EDIT = (
    "Repeat this text exactly, fixing the spelling mistakes:\n\nThe quick brown fox jumps over the lazzy dog. "
    "It was a sunny day in the park."
)
pytestmark = pytest.mark.server

NGRAM = {"method": "ngram", "num_speculative_tokens": 6, "prompt_lookup_max": 3, "prompt_lookup_min": 2}


def drafted(url: str) -> int:
    found = re.search(r"^impetus_speculative_drafted_tokens_total (\d+)", requests.get(url, timeout=10).text, re.M)
    assert found, "impetus_speculative_drafted_tokens_total not in /metrics"
    return int(found.group(1))


def test_speculative_config_keeps_the_answer(server, client) -> None:  # type: ignore[no-untyped-def]
    args = dict(model=DEFAULT_MODEL, messages=[{"role": "user", "content": EDIT}], temperature=0, max_tokens=24)
    plain = client.chat.completions.create(**args)
    before = drafted(f"{server.url}/metrics")
    fast = client.chat.completions.create(**args, extra_body={"speculative_config": NGRAM})
    assert fast.choices[0].message.content == plain.choices[0].message.content
    assert fast.usage.completion_tokens == plain.usage.completion_tokens
    assert drafted(f"{server.url}/metrics") > before
    drafted_by_model = client.chat.completions.create(  # vLLM's draft_model, the target its own draft here
        **args, extra_body={"speculative_config": {"method": "draft_model", "model": DEFAULT_MODEL}}
    )
    assert drafted_by_model.choices[0].message.content == plain.choices[0].message.content
    sampled = client.chat.completions.create(
        **{**args, "temperature": 0.8}, extra_body={"speculative_config": NGRAM}
    )  # the rejection rule's path: an answer, no error
    assert sampled.choices[0].finish_reason in ("stop", "length") and sampled.usage.completion_tokens > 0


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"method": "ngram", "draft_tokens": 4}, "draft_tokens"),
        ({"method": "ngram", "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup_min"),
        ({"method": "draft_model"}, "IMPETUS_DRAFT_MODEL"),  # no draft model named, none on the server
    ],
    ids=["unknown-key", "min-above-max", "no-draft-model"],
)
def test_a_bad_speculative_config_is_a_400(client, config, named) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": "hi"}], extra_body={"speculative_config": config}
        )
    assert "speculative_config" in str(info.value.body) and named in str(info.value.body), info.value.body
