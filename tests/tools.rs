//! Tool calling on both APIs against the real SmolLM2 model. A forced call (`tool_choice`
//! `required` or a named function) is grammar-constrained, so it is deterministic even for a
//! 135M model: its arguments parse and validate against the tool's schema, streamed or not.

mod common;

use common::Server;
use serde_json::{json, Value};

fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {"type": "object", "properties": {
                "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
                "required": ["a", "b"], "additionalProperties": false}}}
    ])
}

fn schema_of(name: &str) -> Value {
    tools()
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["function"]["name"] == name)
        .unwrap()["function"]["parameters"]
        .clone()
}

fn assert_valid_call(call: &Value) -> (String, Value) {
    assert_eq!(call["type"], "function", "{call}");
    assert!(call["id"].as_str().unwrap().starts_with("call_"), "{call}");
    let name = call["function"]["name"].as_str().unwrap().to_owned();
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("arguments are not JSON ({e}): {call}"));
    let validator = jsonschema::validator_for(&schema_of(&name)).unwrap();
    assert!(validator.is_valid(&args), "{args} breaks {name}'s schema");
    (name, args)
}

fn weather_question(choice: Value, stream: bool) -> Value {
    json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": tools(),
        "tool_choice": choice,
        "temperature": 0,
        "max_tokens": 100,
        "stream": stream,
    })
}

/// The tool calls of a streamed answer, assembled from their deltas as SDKs do.
fn assemble(payloads: &[String]) -> (Vec<Value>, Option<String>) {
    let mut calls: Vec<Value> = Vec::new();
    let mut finish = None;
    for p in payloads {
        if p == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(p).unwrap();
        let Some(choice) = v["choices"].get(0) else {
            continue;
        };
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
        for d in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = d["index"].as_u64().unwrap() as usize;
            if calls.len() <= i {
                calls.push(json!({"id": d["id"], "type": d["type"],
                                  "function": {"name": d["function"]["name"], "arguments": ""}}));
            }
            let args = calls[i]["function"]["arguments"]
                .as_str()
                .unwrap()
                .to_owned()
                + d["function"]["arguments"].as_str().unwrap_or("");
            calls[i]["function"]["arguments"] = json!(args);
        }
    }
    (calls, finish)
}

#[tokio::test]
async fn a_named_tool_choice_gives_a_valid_call_streamed_or_not() {
    let s = Server::start(&[]).await;
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let r = s.chat(weather_question(named.clone(), false)).await;
    let choice = &r["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{r}");
    assert_eq!(choice["message"]["content"], Value::Null, "{r}");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{r}");
    let (name, args) = assert_valid_call(&calls[0]);
    assert_eq!(name, "get_weather");

    let payloads = s
        .stream("/v1/chat/completions", &weather_question(named, true))
        .await
        .collect()
        .await;
    let (streamed, finish) = assemble(&payloads);
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(streamed.len(), 1);
    let (sname, sargs) = assert_valid_call(&streamed[0]);
    assert_eq!((sname, sargs), (name, args), "the same call, streamed");
}

#[tokio::test]
async fn required_calls_one_of_the_tools_and_none_leaves_them_out() {
    let s = Server::start(&[]).await;
    let r = s.chat(weather_question(json!("required"), false)).await;
    assert_eq!(r["choices"][0]["finish_reason"], "tool_calls", "{r}");
    assert_valid_call(&r["choices"][0]["message"]["tool_calls"][0]);

    // `none`: the tools are not even described, so the prompt is the plain question's.
    let none = s.chat(weather_question(json!("none"), false)).await;
    let mut plain = weather_question(Value::Null, false);
    plain.as_object_mut().unwrap().remove("tools");
    let plain = s.chat(plain).await;
    assert_eq!(
        none["usage"]["prompt_tokens"],
        plain["usage"]["prompt_tokens"]
    );
    assert_eq!(
        none["choices"][0]["message"],
        plain["choices"][0]["message"]
    );
    // `auto`: the tools are described to the model (a longer prompt); whatever it chooses,
    // the answer is text or a call that validates.
    let auto = s.chat(weather_question(json!("auto"), false)).await;
    assert!(
        auto["usage"]["prompt_tokens"].as_u64() > plain["usage"]["prompt_tokens"].as_u64(),
        "{auto}"
    );
    match auto["choices"][0]["message"]["tool_calls"].as_array() {
        Some(calls) => calls.iter().for_each(|c| {
            assert_valid_call(c);
        }),
        None => assert!(auto["choices"][0]["message"]["content"].is_string()),
    }
}

#[tokio::test]
async fn a_tool_result_round_trips_into_the_next_answer() {
    let s = Server::start(&[]).await;
    let named = json!({"type": "function", "function": {"name": "add"}});
    let mut ask = weather_question(named, false);
    ask["messages"] = json!([{"role": "user", "content": "What is 17 plus 25?"}]);
    let r = s.chat(ask.clone()).await;
    let call = r["choices"][0]["message"]["tool_calls"][0].clone();
    assert_valid_call(&call);
    // The caller runs the tool and sends the result back, with the assistant's call.
    let mut follow = ask.clone();
    follow["tool_choice"] = json!("auto");
    follow["messages"] = json!([
        {"role": "user", "content": "What is 17 plus 25?"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "42"}
    ]);
    let a = s.chat(follow.clone()).await;
    assert_eq!(a["object"], "chat.completion", "{a}");
    // The call and the result are part of the prompt: dropping the result shortens it.
    let mut shorter = follow.clone();
    shorter["messages"].as_array_mut().unwrap().pop();
    let b = s.chat(shorter).await;
    assert!(
        a["usage"]["prompt_tokens"].as_u64() > b["usage"]["prompt_tokens"].as_u64(),
        "{a} vs {b}"
    );
    // Same request, same answer (greedy): the round trip is deterministic (call ids aside).
    let without_ids = |mut v: Value| {
        for c in v["choices"][0]["message"]["tool_calls"]
            .as_array_mut()
            .into_iter()
            .flatten()
        {
            c["id"] = Value::Null;
        }
        v["choices"].clone()
    };
    assert_eq!(without_ids(s.chat(follow).await), without_ids(a.clone()));
    // Whatever the model chose, a call it made validates (the grammar applies once it opens
    // a call).
    for c in a["choices"][0]["message"]["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
    {
        assert_valid_call(c);
    }
}

#[tokio::test]
async fn bad_tools_are_400s_naming_the_field() {
    let s = Server::start(&[]).await;
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let f = |name: &str, params: Value| json!([{"type": "function", "function": {"name": name, "parameters": params}}]);
    let cases = [
        (json!({"tools": "get_weather"}), "tools"),
        (
            json!({"tools": [{"type": "code_interpreter"}]}),
            "tools[0].type",
        ),
        (
            json!({"tools": f("get weather", json!({}))}),
            "tools[0].function.name",
        ),
        (
            json!({"tools": f("w", json!("{\"type\": \"object\""))}),
            "tools[0].function.parameters",
        ),
        (
            json!({"tools": f("w", json!({"type": "objcet"}))}),
            "tools[0].function.parameters",
        ),
        (
            json!({"tools": tools(), "tool_choice": {"type": "function", "function": {"name": "fly"}}}),
            "tool_choice",
        ),
        (
            json!({"tools": tools(), "tool_choice": "always"}),
            "tool_choice",
        ),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"tools": tools(), "tool_choice": "required", "response_format": {"type": "json_object"}}),
            "tool_choice",
        ),
        (
            json!({"tools": tools(), "messages": [{"role": "assistant", "content": null,
                 "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": "{1"}}]}]}),
            "messages[0].tool_calls[0].function.arguments",
        ),
    ];
    for (extra, param) in cases {
        let mut body = json!({"model": "smollm2", "messages": msgs});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, e) = s.post("/v1/chat/completions", &body).await;
        assert_eq!(status, 400, "{extra}: {e}");
        assert_eq!(e["error"]["param"], param, "{extra}: {e}");
        assert_eq!(e["error"]["type"], "invalid_request_error");
    }
    let (status, e) = s
        .post(
            "/api/chat",
            &json!({"model": "smollm2", "messages": msgs, "stream": false,
                    "tools": f("w", json!({"type": "objcet"}))}),
        )
        .await;
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("tools[0].function.parameters"),
        "{e}"
    );
    // Nothing else was disturbed.
    let r = s
        .chat(json!({"model": "smollm2", "messages": msgs, "max_tokens": 3}))
        .await;
    assert_eq!(r["object"], "chat.completion");
}

#[tokio::test]
async fn ollama_tools_are_described_and_calls_come_back_as_objects() {
    let s = Server::start(&[]).await;
    let body = |tools: Value, stream: bool| {
        json!({"model": "smollm2", "stream": stream, "tools": tools,
               "messages": [{"role": "user", "content": "What is the weather in Paris? Use a tool."}],
               "options": {"temperature": 0, "num_predict": 100}})
    };
    let (status, with) = s.post("/api/chat", &body(tools(), false)).await;
    assert_eq!(status, 200, "{with}");
    let (_, without) = s.post("/api/chat", &body(json!([]), false)).await;
    assert!(
        with["prompt_eval_count"].as_u64() > without["prompt_eval_count"].as_u64(),
        "the tools are described to the model"
    );
    let (status, _, lines) = s.ndjson("/api/chat", &body(tools(), true)).await;
    assert_eq!(status, 200);
    assert_eq!(lines.last().unwrap()["done"], true);
    let streamed_calls: Vec<Value> = lines
        .iter()
        .filter_map(|l| l["message"]["tool_calls"].as_array())
        .flatten()
        .cloned()
        .collect();
    let whole_calls = with["message"]["tool_calls"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(streamed_calls, whole_calls, "streamed and whole agree");
    for c in &whole_calls {
        // Ollama's shape: arguments are an object, not a string.
        let name = c["function"]["name"].as_str().unwrap();
        let validator = jsonschema::validator_for(&schema_of(name)).unwrap();
        assert!(validator.is_valid(&c["function"]["arguments"]), "{c}");
    }
    // An assistant turn's calls and the tool's answer round-trip.
    let (status, r) = s
        .post(
            "/api/chat",
            &json!({"model": "smollm2", "stream": false, "tools": tools(),
                    "options": {"temperature": 0, "num_predict": 20},
                    "messages": [
                        {"role": "user", "content": "What is 2 plus 3?"},
                        {"role": "assistant", "content": "",
                         "tool_calls": [{"function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
                        {"role": "tool", "content": "5"}]}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["done"], true);
}
