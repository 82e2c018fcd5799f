"""The official `openai` Python package against backstop: it must work unchanged."""

import asyncio
import urllib.request

import openai
import pytest

MODEL = "smollm2"


@pytest.fixture()
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="not-needed", max_retries=0)


def ask(text):
    return [{"role": "user", "content": text}]


def test_chat_completion_has_exact_length_and_usage(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ask("Tell me a story."), max_tokens=8, temperature=0
    )
    assert r.object == "chat.completion"
    assert r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_streaming_matches_the_non_streamed_answer_and_reports_usage(client):
    kwargs = dict(model=MODEL, messages=ask("What is the sun?"), max_tokens=24, temperature=0.8, seed=11)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stop_strings_cut_the_answer(client):
    full = client.chat.completions.create(
        model=MODEL, messages=ask("Describe a cat."), max_tokens=30, temperature=0
    ).choices[0].message.content
    words = full.split(" ")
    stop = " " + words[3]
    cut = client.chat.completions.create(
        model=MODEL, messages=ask("Describe a cat."), max_tokens=30, temperature=0, stop=[stop]
    )
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_text_completion(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0)
    assert r.choices[0].text.startswith(" Paris")
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0, stream=True
        )
    )
    assert streamed == r.choices[0].text


def test_models_list_and_retrieve(client):
    # Listed the way Ollama lists them: with their tag.
    assert [m.id for m in client.models.list()] == [MODEL + ":latest"]
    assert client.models.retrieve(MODEL).id == MODEL + ":latest"


def test_errors_raise_the_matching_exception_types(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-nope", messages=ask("hi"))
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ask("hi"), temperature=5)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], stream=True)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model=MODEL, messages=ask("word " * 5000), max_tokens=1)
    assert e.value.code == "context_length_exceeded"


def test_concurrent_async_streams_each_match_their_own_answer(base_url):
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="not-needed", max_retries=0)
    prompts = ["Name a fruit.", "Name a city.", "Name an animal.", "Name a color."]

    async def stream(prompt):
        out = []
        async for c in await client.chat.completions.create(
            model=MODEL, messages=ask(prompt), max_tokens=16, temperature=0, stream=True
        ):
            if c.choices and c.choices[0].delta.content:
                out.append(c.choices[0].delta.content)
        return "".join(out)

    async def whole(prompt):
        r = await client.chat.completions.create(model=MODEL, messages=ask(prompt), max_tokens=16, temperature=0)
        return r.choices[0].message.content

    async def main():
        together = await asyncio.gather(*(stream(p) for p in prompts))
        alone = [await whole(p) for p in prompts]
        return together, alone

    together, alone = asyncio.run(main())
    assert together == alone


def test_embeddings_come_back_as_unit_vectors_in_input_order(client):
    # The openai package asks for base64 by default and decodes it itself.
    r = client.embeddings.create(model=MODEL, input=["first text", "second text"])
    assert [d.index for d in r.data] == [0, 1]
    assert all(len(d.embedding) == 576 for d in r.data)
    assert abs(sum(x * x for x in r.data[0].embedding) - 1.0) < 1e-4
    floats = client.embeddings.create(model=MODEL, input="first text", encoding_format="float")
    assert max(abs(x - y) for x, y in zip(floats.data[0].embedding, r.data[0].embedding)) < 1e-5
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens


def test_parse_with_a_pydantic_model_gives_a_validated_object(client):
    # The SDK turns the model into a strict json_schema response_format and validates the
    # answer itself: constrained decoding makes it parse every time, even with a 135M model.
    from typing import Literal

    from pydantic import BaseModel, Field

    class Address(BaseModel):
        city: str = Field(max_length=24)
        zip: str = Field(pattern=r"^[0-9]{5}$")

    class Person(BaseModel):
        name: str = Field(min_length=1, max_length=24)
        age: int = Field(ge=0, le=120)
        mood: Literal["happy", "sad", "calm"]
        address: Address

    r = client.chat.completions.parse(
        model=MODEL, messages=ask("Invent a person."), response_format=Person,
        temperature=0, max_tokens=200,
    )
    assert r.choices[0].finish_reason == "stop"
    person = r.choices[0].message.parsed
    assert isinstance(person, Person)
    assert 0 <= person.age <= 120 and len(person.address.zip) == 5


def test_an_invalid_schema_is_a_bad_request_naming_the_parameter(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=ask("hi"),
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}},
        )
    assert e.value.status_code == 400
    assert e.value.body["param"] == "response_format.json_schema.schema"


WEATHER = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}]


def test_a_forced_tool_call_round_trips_through_the_sdk(client):
    import json

    choice = {"type": "function", "function": {"name": "get_weather"}}
    messages = ask("What is the weather in Paris?")
    r = client.chat.completions.create(
        model=MODEL, messages=messages, tools=WEATHER, tool_choice=choice, temperature=0, max_tokens=80,
    )
    assert r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")

    # Streamed: the SDK's own accumulation gives the same call.
    with client.chat.completions.stream(
        model=MODEL, messages=messages, tools=WEATHER, tool_choice=choice, temperature=0, max_tokens=80,
    ) as stream:
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls[0]
    assert (streamed.function.name, json.loads(streamed.function.arguments)) == ("get_weather", args)

    # The result goes back as a `tool` message; the model answers in text.
    follow = messages + [r.choices[0].message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    answer = client.chat.completions.create(model=MODEL, messages=follow, tools=WEATHER, temperature=0, max_tokens=24)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


def drafted_tokens_taken(base_url):
    """backstop_draft_accepted_tokens_total from /metrics (0 before any)."""
    text = urllib.request.urlopen(base_url + "/metrics").read().decode()
    lines = [l for l in text.splitlines() if l.startswith("backstop_draft_accepted_tokens_total{")]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def test_speculative_decoding_is_asked_for_through_extra_body_and_streams_the_same_text(client, base_url):
    kwargs = dict(model=MODEL, messages=ask("Write the numbers from 1 to 30 separated by commas."),
                  max_tokens=60, temperature=0)
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    taken_before = drafted_tokens_taken(base_url)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, extra_body={"speculative.n_max": 8}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain
    taken = drafted_tokens_taken(base_url)
    assert taken - taken_before >= 10, "the stream took drafted tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kwargs, extra_body={"speculative.n_max": 33})
    assert e.value.body["param"] == "speculative.n_max"
