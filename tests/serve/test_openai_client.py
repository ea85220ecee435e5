"""The server as users reach it: the official ``openai`` Python client against a real ``serve``
process (tiny synthetic DeepSeek-V3, CPU): completions, chat, streaming with usage, seeded
sampling, and errors arriving as the client's exception classes."""
import pytest

from tensorrt_llm_dwdp.model.presets import get_preset
from tensorrt_llm_dwdp.model.synthetic import write_synthetic_checkpoint
from tensorrt_llm_dwdp.serve.cluster import LocalServer

openai = pytest.importorskip("openai", reason="pip install openai (a test dependency)")
pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    model = str(root / "tiny")
    write_synthetic_checkpoint(model, get_preset("tiny-deepseek-v3", num_layers=2), quant="nvfp4")
    server = LocalServer(model, str(root / "serve"), {"device": "cpu", "max_seq_len": 512})
    with server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _stream_chat(client, **kw):
    text, usage, roles = "", None, []
    for chunk in client.chat.completions.create(model="tiny", messages=CHAT, stream=True,
                                                stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            roles.append(choice.delta.role)
    return text, usage, roles


def test_models_and_completions(client):
    (model,) = client.models.list().data
    assert model.id.endswith("tiny")
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=6)
    assert out.object == "text_completion" and out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.prompt_tokens == 6 and 1 <= out.usage.completion_tokens <= 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Hello", max_tokens=6, stream=True) if c.choices)
    assert streamed == out.choices[0].text


def test_chat_stream_with_usage_matches_the_whole_answer(client):
    whole = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10,
                                           extra_body={"ignore_eos": True})
    assert whole.choices[0].message.role == "assistant"
    text, usage, roles = _stream_chat(client, max_tokens=10, extra_body={"ignore_eos": True})
    assert text == whole.choices[0].message.content
    assert roles[0] == "assistant"
    assert usage.completion_tokens == 10 and usage.prompt_tokens == whole.usage.prompt_tokens


def test_seeded_sampling_reproduces_and_seeds_differ(client):
    kw = dict(max_tokens=24, temperature=0.8, extra_body={"ignore_eos": True})
    a, _, _ = _stream_chat(client, seed=7, **kw)
    b, _, _ = _stream_chat(client, seed=7, **kw)
    c, _, _ = _stream_chat(client, seed=8, **kw)
    greedy, _, _ = _stream_chat(client, max_tokens=24, extra_body={"ignore_eos": True})
    assert a == b
    assert a != c
    assert a != greedy
    # The same seed through completions, streamed and not, with the filters on.
    kw = dict(model="tiny", prompt="Once", max_tokens=12, temperature=1.0, top_p=0.9, seed=3,
              extra_body={"top_k": 40, "min_p": 0.01, "ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert whole == streamed


def test_errors_arrive_as_the_clients_exceptions(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", temperature=2.5)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x" * 600, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=CHAT, n=2)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert e.value.body["code"] == "model_not_found"


def test_seed_holds_in_a_busy_batch(client):
    """The seeded request decodes beside others (different batch at every step): same text."""
    import asyncio

    kw = dict(model="tiny", max_tokens=16, temperature=0.8, extra_body={"ignore_eos": True})
    alone = client.chat.completions.create(messages=CHAT, seed=7, **kw).choices[0].message.content
    aclient = openai.AsyncOpenAI(base_url=client.base_url, api_key="unused", max_retries=0, timeout=60)

    async def main():
        async with aclient:
            others = [aclient.chat.completions.create(
                messages=[{"role": "user", "content": "x" * (i + 1)}], seed=i, **{**kw, "max_tokens": 4 + 3 * i})
                for i in range(5)]
            mine = aclient.chat.completions.create(messages=CHAT, seed=7, **kw)
            return (await asyncio.gather(mine, *others))[0].choices[0].message.content

    assert asyncio.run(main()) == alone
