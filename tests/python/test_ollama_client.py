"""The official `ollama` Python package against backstop: an Ollama user points it at
backstop and notices nothing. SmolLM2 and Gemma 3 are served side by side with room for only
one loaded model, so switching between them proves on-demand loading and LRU eviction."""

import hashlib

import ollama
import pytest

from conftest import GEMMA3, SMOLLM2, Backstop, FakeHub, model


@pytest.fixture(scope="module")
def server():
    hub = FakeHub([("test/smol-GGUF", "smol-Q4_1.gguf", model(SMOLLM2))])
    s = Backstop(
        [
            "--model", f"smollm2={model(SMOLLM2)}",
            "--model", f"gemma3={model(GEMMA3)}",
            "--max-loaded", "1",
        ],
        env={"HF_ENDPOINT": hub.url},
    )
    yield s
    s.stop()
    hub.stop()


@pytest.fixture()
def client(server):
    return ollama.Client(host=server.url)


GREEDY = {"temperature": 0, "num_predict": 16}


def test_chat_answers_and_streaming_gives_the_same_text(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat(model="smollm2", messages=messages, options=GREEDY)
    assert whole.message.role == "assistant"
    assert whole.message.content
    assert whole.done and whole.done_reason in ("stop", "length")
    assert whole.eval_count > 0 and whole.eval_duration > 0 and whole.prompt_eval_count > 0
    parts = list(client.chat(model="smollm2", messages=messages, options=GREEDY, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count


def test_generate_and_its_stream_agree(client):
    whole = client.generate(model="smollm2", prompt="Name a planet.", options=GREEDY)
    assert whole.response
    parts = list(client.generate(model="smollm2", prompt="Name a planet.", options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == whole.response
    assert parts[-1].done_reason == whole.done_reason


def test_list_show_and_ps_describe_the_models(client):
    listed = {m.model: m for m in client.list().models}
    assert set(listed) >= {"smollm2:latest", "gemma3:latest"}
    smol = listed["smollm2:latest"]
    assert smol.details.family == "llama"
    assert smol.details.quantization_level == "Q4_1"
    assert smol.size == model(SMOLLM2).stat().st_size
    assert smol.digest == hashlib.sha256(model(SMOLLM2).read_bytes()).hexdigest()
    shown = client.show("gemma3")
    assert shown.modelinfo["general.architecture"] == "gemma3"
    assert shown.details.quantization_level == "Q4_K_M"
    assert "completion" in shown.capabilities
    client.generate(model="gemma3", prompt="Hi", options={"num_predict": 2})
    running = client.ps().models
    assert [m.model for m in running] == ["gemma3:latest"]
    assert running[0].context_length > 0
    assert running[0].expires_at is not None


def test_switching_models_evicts_the_least_recently_used_one(client):
    client.generate(model="smollm2", prompt="Hi", options={"num_predict": 2})
    assert [m.model for m in client.ps().models] == ["smollm2:latest"]
    r = client.chat(model="gemma3", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 2})
    assert r.load_duration > 0
    assert [m.model for m in client.ps().models] == ["gemma3:latest"]


def test_keep_alive_zero_unloads(client):
    client.generate(model="smollm2", prompt="Hi", options={"num_predict": 2})
    r = client.generate(model="smollm2", keep_alive=0)
    assert r.done_reason == "unload"
    assert client.ps().models == []


def test_copy_create_and_delete(client, server):
    client.copy("smollm2", "smol-copy")
    assert "smol-copy:latest" in [m.model for m in client.list().models]
    r = client.generate(model="smol-copy", prompt="Name a planet.", options=GREEDY)
    assert r.response == client.generate(model="smollm2", prompt="Name a planet.", options=GREEDY).response

    digest = client.create_blob(model(SMOLLM2))
    client.create(
        model="pirate",
        files={"smollm2.gguf": digest},
        system="You are a pirate.",
        parameters={"temperature": 0, "num_predict": 12},
    )
    shown = client.show("pirate")
    assert "temperature" in shown.parameters
    a = client.generate(model="pirate", prompt="Hello")
    b = client.generate(model="smollm2", prompt="Hello", system="You are a pirate.", options={"temperature": 0, "num_predict": 12})
    assert a.response == b.response

    for name in ("smol-copy", "pirate"):
        assert client.delete(name).status == "success"
    names = [m.model for m in client.list().models]
    assert "pirate:latest" not in names and "smol-copy:latest" not in names


def test_errors_arrive_as_response_errors(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404
    assert e.value.error == "model 'no-such-model' not found"
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="smollm2", prompt="hi", options={"temperature": "hot"})
    assert e.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as e:
        client.show("../../etc/passwd")
    assert e.value.status_code == 400


def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / ((sum(x * x for x in a) ** 0.5) * (sum(y * y for y in b) ** 0.5))


def test_embed_gives_unit_vectors_where_similar_texts_are_closer(client):
    r = client.embed(
        model="smollm2",
        input=["The cat sat on the mat", "A cat is sitting on a mat", "Quarterly revenue grew 5%"],
    )
    a, b, c = r.embeddings
    assert len(a) == 576
    assert abs(sum(x * x for x in a) - 1.0) < 1e-4
    assert _cos(a, b) > _cos(a, c)
    legacy = client.embeddings(model="smollm2", prompt="The cat sat on the mat").embedding
    assert abs(_cos(legacy, a) - 1.0) < 1e-4
    assert abs(sum(x * x for x in legacy) - 1.0) > 1e-3, "the legacy endpoint is not normalized"


def test_pull_from_the_hub_streams_progress_and_serves_the_model(client):
    name = "hf.co/test/smol-GGUF:Q4_1"
    events = list(client.pull(name, stream=True))
    assert events[0].status == "pulling manifest"
    assert events[-1].status == "success"
    sized = [e for e in events if e.total]
    assert sized and sized[-1].completed == sized[-1].total == model(SMOLLM2).stat().st_size
    assert name in [m.model for m in client.list().models]
    r = client.generate(model=name, prompt="Name a planet.", options=GREEDY)
    assert r.response == client.generate(model="smollm2", prompt="Name a planet.", options=GREEDY).response
    assert client.delete(name).status == "success"
    with pytest.raises(ollama.ResponseError):
        list(client.pull("hf.co/test/smol-GGUF:Q2_K", stream=True))


def test_format_with_a_pydantic_schema_gives_a_validated_object(client):
    from pydantic import BaseModel, Field

    class Fruit(BaseModel):
        name: str = Field(max_length=20)
        colour: str = Field(max_length=20)

    class Basket(BaseModel):
        fruits: list[Fruit] = Field(min_length=1, max_length=3)
        total: int = Field(ge=1, le=3)

    r = client.chat(
        model="smollm2", messages=[{"role": "user", "content": "Fill a basket with fruit."}],
        format=Basket.model_json_schema(), options={"temperature": 0, "num_predict": 300},
    )
    assert r.done_reason == "stop"
    basket = Basket.model_validate_json(r.message.content)
    assert 1 <= len(basket.fruits) <= 3

    r = client.generate(model="smollm2", prompt="A cat, as JSON.", format="json",
                        options={"temperature": 0, "num_predict": 200})
    assert r.response.startswith("{")


def test_tools_are_accepted_and_calls_round_trip(client):
    def add(a: int, b: int) -> int:
        """Add two integers.

        Args:
          a: the first
          b: the second
        """
        return a + b

    messages = [{"role": "user", "content": "What is 2 plus 3? Use the add tool."}]
    r = client.chat(model="smollm2", messages=messages, tools=[add], options={"temperature": 0, "num_predict": 60})
    assert r.done
    for call in r.message.tool_calls or []:
        assert isinstance(call.function.arguments, dict)
    messages += [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "content": "5"},
    ]
    r = client.chat(model="smollm2", messages=messages, tools=[add], options={"temperature": 0, "num_predict": 16})
    assert r.done
