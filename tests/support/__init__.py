"""What the tests and the benchmark share: where things are, one server launcher, one Socket.IO recorder,
one ``chat()`` and one ``wait_idle()``, and the small models and stand-in hub the tests build.

    tests.support            ROOT, TEST_MODELS_DIR, DEFAULT_MODEL
    tests.support.server     free_port, Server, launch (any server command), start_server / stop_server (ours),
                             reap_stopped (servers stopped without waiting, at the session's end)
    tests.support.recorder   Recorder (Socket.IO events, stamped on arrival), listen (a client wired to one)
    tests.support.http       chat() (POST /v1/chat/completions), wait_idle(), health()
    tests.support.tiny_models, tests.support.hub_stub, tests.support.gguf   models, hub and files built here
    tests.support.threads    at_once (work on n threads started together, answers in order)
    tests.support.node       require_node (Node.js found and new enough, or the module skips)
    tests.support.models     default_model_folder (the default model converted once for the tests)
    tests.support.apps       bare_app (a Flask app with services and the error envelope, no engine)

bench/ imports the launcher from here rather than keeping its own: it runs only from a source checkout
(`make bench`; `impetus bench` refuses elsewhere), where tests/ is present, and it already built its
embedding and soak runs on the tests' launcher and tiny models. Only node.py imports pytest; nothing
bench imports does.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Converted models are cached here between runs (the first conversion takes a few seconds).
TEST_MODELS_DIR = Path(os.environ.get("IMPETUS_TEST_MODELS_DIR", ROOT / "build" / "test-models"))
DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_EMBEDDER = "tiny-embedder"  # a BERT-family embedding model the client suites build (32 dimensions, random weights)
