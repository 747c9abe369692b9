"""OpenAI's Agents SDK (`openai-agents`) against the real server, through both of its OpenAI model
classes: chat completions (OpenAIChatCompletionsModel) and the Responses API (OpenAIResponsesModel).

What a new user's first agents do: a plain agent, a streamed one, a forced tool call followed by an
answer, and a typed (pydantic) final output. Tracing is off: it would export to OpenAI's servers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from agents.items import ToolCallItem, ToolCallOutputItem
from agents.models.interface import Model
from openai import AsyncOpenAI
from openai.types.responses import ResponseTextDeltaEvent
from pydantic import BaseModel

from tests.support import DEFAULT_MODEL
from tests.support.server import Server

pytestmark = pytest.mark.server


@pytest.fixture(autouse=True, scope="module")
def no_tracing() -> Iterator[None]:
    set_tracing_disabled(True)
    yield


@pytest_asyncio.fixture(params=["chat_completions", "responses"], loop_scope="session")
async def model(request: pytest.FixtureRequest, server: Server) -> AsyncIterator[Model]:
    """The server's default model behind each of the SDK's two OpenAI model classes; the client is
    closed inside the test's event loop (left to the garbage collector, it closes on a dead loop)."""
    client = AsyncOpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0, timeout=120)
    if request.param == "responses":
        yield OpenAIResponsesModel(model=DEFAULT_MODEL, openai_client=client)
    else:
        yield OpenAIChatCompletionsModel(model=DEFAULT_MODEL, openai_client=client)
    await client.close()


SHORT = ModelSettings(temperature=0, max_tokens=32)


async def test_plain_agent(model: Model) -> None:
    agent = Agent(name="greeter", instructions="Answer in one short sentence.", model=model, model_settings=SHORT)
    result = await Runner.run(agent, "Say hello to Ada.")
    assert isinstance(result.final_output, str) and result.final_output.strip()
    assert result.context_wrapper.usage.output_tokens > 0


async def test_streamed_agent(model: Model) -> None:
    agent = Agent(name="greeter", instructions="Answer in one short sentence.", model=model, model_settings=SHORT)
    result = Runner.run_streamed(agent, "Say hello to Ada.")
    deltas = [
        event.data.delta
        async for event in result.stream_events()
        if event.type == "raw_response_event" and isinstance(event.data, ResponseTextDeltaEvent)
    ]
    assert len(deltas) > 1, "the answer came in one piece, not streamed"
    assert "".join(deltas) == result.final_output and result.final_output.strip()


async def test_forced_tool_call_then_answer(model: Model) -> None:
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"It is sunny and 21 degrees in {city}."

    # Turn 1: tool_choice "required" forces the call; stop_on_first_tool ends the run with its output.
    # Turn 2: the history (call and result) goes back with tool_choice "none" for the answer. (Left to
    # choose, "auto" after the call, the 135M model calls the tool again until max_turns.) A generous
    # max_tokens: the model tends to echo the random call id, and the SDK fails a Responses run cut
    # short ("incomplete") where a chat completion would return the cut text.
    caller = Agent(
        name="weather",
        instructions="You answer questions about the weather using the tool.",
        model=model,
        tools=[get_weather],
        tool_use_behavior="stop_on_first_tool",
        model_settings=ModelSettings(temperature=0, max_tokens=64, tool_choice="required"),
    )
    first = await Runner.run(caller, "What is the weather in Paris?")
    assert len(calls) == 1 and isinstance(calls[0], str) and calls[0].strip()
    assert [type(item) for item in first.new_items] == [ToolCallItem, ToolCallOutputItem]
    assert first.final_output == f"It is sunny and 21 degrees in {calls[0]}."

    answerer = caller.clone(
        tool_use_behavior="run_llm_again",
        model_settings=ModelSettings(temperature=0, max_tokens=256, tool_choice="none"),
    )
    # The call id is random (call_<hex>) and the model echoes it: with the id in the prompt, even greedy
    # output varied in length from run to run (once past max_tokens, "incomplete"). A fixed id in both
    # history items makes the second turn's prompt, and so its answer, the same every run.
    history = first.to_input_list()
    for item in history:
        if isinstance(item, dict) and "call_id" in item:
            item["call_id"] = "call_weather_1"
    second = await Runner.run(answerer, history)
    assert len(calls) == 1
    assert isinstance(second.final_output, str) and second.final_output.strip()


class City(BaseModel):
    name: str
    country: str
    is_capital: bool


async def test_structured_output(model: Model) -> None:
    # output_type: the SDK sends a strict json_schema (response_format on chat completions, text.format
    # on Responses) and validates the answer into the pydantic model, failing the run when it does not fit.
    # (No float field: the 135M model writes a number's digits until max_tokens; JSON bounds no number.)
    agent = Agent(
        name="facts",
        instructions="Answer with facts about the city.",
        model=model,
        model_settings=ModelSettings(temperature=0, max_tokens=64),
        output_type=City,
    )
    result = await Runner.run(agent, "Tell me about Paris.")
    assert isinstance(result.final_output, City)
    assert result.final_output.name.strip() and result.final_output.country.strip()
