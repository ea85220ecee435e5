"""Request validation and response shapes of the OpenAI protocol layer."""
import json

import pytest

from tensorrt_llm_dwdp.serve import protocol
from tensorrt_llm_dwdp.serve.protocol import ApiError


def _err(fn, body):
    with pytest.raises(ApiError) as exc:
        fn(body)
    return exc.value


def test_completion_forms_of_prompt():
    assert protocol.parse_completion_request({"prompt": "hi"}).prompt == "hi"
    assert protocol.parse_completion_request({"prompt": ["hi"]}).prompt == "hi"
    assert protocol.parse_completion_request({"prompt": [1, 2, 3]}).prompt_ids == (1, 2, 3)
    assert protocol.parse_completion_request({"prompt": [[4, 5]]}).prompt_ids == (4, 5)
    req = protocol.parse_completion_request({"prompt": "x"})
    assert req.max_tokens == 16 and not req.stream and req.stop == ()


@pytest.mark.parametrize("body,param", [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "temperature": -0.1}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "temperature": float("nan")}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.01}, "top_p"),
    ({"prompt": "x", "top_k": -2}, "top_k"),
    ({"prompt": "x", "top_k": 1.5}, "top_k"),
    ({"prompt": "x", "min_p": 1.2}, "min_p"),
    ({"prompt": "x", "seed": "7"}, "seed"),
    ({"prompt": "x", "seed": 1 << 64}, "seed"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "logprobs": 2}, "logprobs"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "disaggregated_params": {"request_type": "both"}}, "disaggregated_params.request_type"),
])
def test_completion_rejections_name_the_parameter(body, param):
    e = _err(protocol.parse_completion_request, body)
    assert e.status == 400 and e.param == param
    b = e.body()["error"]
    assert set(b) == {"message", "type", "param", "code"} and b["type"] == "invalid_request_error"


def test_sampling_settings_are_parsed():
    req = protocol.parse_completion_request(
        {"prompt": "x", "temperature": 0.8, "top_p": 0.9, "top_k": 5, "min_p": 0.05, "seed": -3,
         "n": 1, "stream": True, "stream_options": {"include_usage": True}})
    assert req.stream and req.include_usage
    assert req.sampling == {"temperature": 0.8, "top_p": 0.9, "top_k": 5, "min_p": 0.05, "seed": -3}
    assert protocol.parse_chat_request({"messages": [{"role": "user", "content": "q"}], "top_k": -1}).sampling == {
        "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": None}


def test_chat_messages_and_parts():
    req = protocol.parse_chat_request({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert req.messages[1] == {"role": "user", "content": "ab"} and req.max_tokens is None
    assert protocol.parse_chat_request(
        {"messages": [{"role": "user", "content": "q"}], "max_completion_tokens": 7}).max_tokens == 7
    assert _err(protocol.parse_chat_request, {"messages": []}).param == "messages"
    assert _err(protocol.parse_chat_request, {"messages": [{"role": "tool", "content": "x"}]}).param == "messages[0].role"
    assert _err(protocol.parse_chat_request,
                {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).param == "messages[0].content"


def test_disaggregated_params():
    gen = protocol.parse_completion_request({"prompt": "x", "disaggregated_params": {
        "request_type": "generation_only", "first_gen_tokens": [7], "prompt_token_ids": [1, 2],
        "kv_url": "http://127.0.0.1:1/v1/kv/abc"}}).disagg
    assert gen.first_gen_tokens == (7,) and gen.prompt_token_ids == (1, 2)
    assert protocol.DisaggParams("context_only").to_json()["request_type"] == "context_only"
    e = _err(protocol.parse_completion_request, {"prompt": "x", "disaggregated_params": {
        "request_type": "generation_only", "first_gen_tokens": [7], "prompt_token_ids": [1],
        "kv_url": "file:///etc/passwd"}})
    assert e.param == "disaggregated_params.kv_url"


def test_json_body_errors():
    assert protocol.parse_json_body(b'{"a": 1}') == {"a": 1}
    assert _err(protocol.parse_json_body, b"{nope").code == "invalid_json"
    assert _err(protocol.parse_json_body, b"[1]").status == 400


def test_response_shapes():
    comp = protocol.parse_completion_request({"prompt": "x"})
    body = protocol.full_response(comp, rid="cmpl-1", model="m", text="ab", finish_reason="length",
                                  prompt_ids=[1, 2, 3], output_ids=[4, 5])
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "ab"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert "token_ids" not in body["choices"][0]
    chat = protocol.parse_chat_request({"messages": [{"role": "user", "content": "q"}], "return_token_ids": True})
    body = protocol.full_response(chat, rid="c", model="m", text="ok", finish_reason="stop",
                                  prompt_ids=[1], output_ids=[2])
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "ok"}
    assert body["choices"][0]["token_ids"] == [2]
    chunk = protocol.stream_chunk(chat, rid="c", model="m", created=1, text="o", finish_reason=None, first=True)
    assert chunk["choices"][0]["delta"] == {"role": "assistant", "content": "o"}
    assert protocol.sse(chunk).startswith(b"data: {") and protocol.sse(chunk).endswith(b"\n\n")
    assert json.loads(protocol.sse(chunk)[6:]) == chunk
    assert protocol.SSE_DONE == b"data: [DONE]\n\n"
