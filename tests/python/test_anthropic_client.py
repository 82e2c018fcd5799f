"""The official `anthropic` Python package against backstop's `/v1/messages`: an application
written for Claude keeps working when it is pointed at backstop (and, with a router, when
Claude is down)."""

import anthropic
import pytest

MODEL = "smollm2"
ASK = [{"role": "user", "content": "Name a color."}]


@pytest.fixture()
def client(base_url):
    return anthropic.Anthropic(base_url=base_url, api_key="not-needed", max_retries=0)


def test_a_message_and_its_stream_carry_the_same_text(client):
    m = client.messages.create(model=MODEL, max_tokens=16, system="Be brief.", messages=ASK, extra_body={"temperature": 0})
    assert m.type == "message"
    assert m.role == "assistant"
    assert m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.output_tokens > 0
    with client.messages.stream(model=MODEL, max_tokens=16, system="Be brief.", messages=ASK, extra_body={"temperature": 0}) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == m.content[0].text
    assert final.stop_reason == m.stop_reason
    assert final.usage.output_tokens == m.usage.output_tokens


def test_errors_raise_the_sdks_exception_types(client):
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-nope", max_tokens=8, messages=ASK)
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "robot", "content": "x"}])


def test_a_forced_tool_gives_a_tool_use_block_streamed_or_not(client):
    tools = [{"name": "get_weather", "description": "Current weather in a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                               "required": ["city"], "additionalProperties": False}}]
    kwargs = dict(model=MODEL, max_tokens=60, tools=tools, tool_choice={"type": "tool", "name": "get_weather"},
                  messages=[{"role": "user", "content": "What is the weather in Rome?"}], extra_body={"temperature": 0})
    m = client.messages.create(**kwargs)
    assert m.stop_reason == "tool_use"
    use = [b for b in m.content if b.type == "tool_use"][0]
    assert use.name == "get_weather" and isinstance(use.input["city"], str)
    with client.messages.stream(**kwargs) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    streamed = [b for b in final.content if b.type == "tool_use"][0]
    # The second request reuses the first one's cached prompt; llama.cpp does not promise
    # bit-identical logits across batch shapes, so only the call's shape is compared.
    assert streamed.name == "get_weather" and isinstance(streamed.input["city"], str)
