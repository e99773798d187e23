"""GET /metrics: Prometheus text that a strict parser accepts, and counters that count.

The exposition is read back by a small parser written here (not lean's code, not a
library): `# HELP`/`# TYPE` lines and `name{labels} value` samples, label escapes,
every sample under a declared family, histogram buckets cumulative with `+Inf` equal
to `_count`. lean runs for real against the fake upstream; the counters are read
over HTTP after real clients did real things.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field

import aiohttp
import pytest

from lean.app import Server
from lean.metrics import Metrics
from tests.fakes import (
    DONE,
    FakeOpenAI,
    Reply,
    Stall,
    Stream,
    completion,
    error_body,
    sse,
    text_stream,
)
from tests.support import SECRET, chat_body, content_of, lean_config, read_sse_data, running

TEXT = "One two three four five."
URL = "/v1/chat/completions"
SCENES = """
[scene.chat]
model = default
template = {message}
"""

# --- a strict parser of the Prometheus text format 0.0.4 ----------------------------------

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_KINDS = {"counter", "gauge", "histogram", "summary", "untyped"}
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}

Labels = tuple[tuple[str, str], ...]


@dataclass
class Family:
    name: str
    kind: str = ""
    help: str = ""
    samples: dict[tuple[str, Labels], float] = field(default_factory=dict)


def _value(text: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    assert re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text), f"bad value {text!r}"
    return float(text)


def _labels(text: str) -> Labels:
    """`a="x",b="y\\"z"` -> (("a", "x"), ("b", 'y"z')); anything malformed fails."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(text):
        match = _LABEL.match(text, i)
        assert match, f"bad label name at {text[i:]!r}"
        name = match.group()
        i = match.end()
        assert text[i : i + 2] == '="', f'expected =" after {name} in {text!r}'
        i += 2
        value: list[str] = []
        while True:
            assert i < len(text), f"unterminated label value in {text!r}"
            c = text[i]
            if c == "\\":
                assert text[i + 1 : i + 2] in _ESCAPES, f"bad escape in {text!r}"
                value.append(_ESCAPES[text[i + 1]])
                i += 2
            elif c == '"':
                i += 1
                break
            else:
                assert c != "\n"
                value.append(c)
                i += 1
        assert name not in dict(out), f"label {name} twice in {text!r}"
        out.append((name, "".join(value)))
        if i < len(text):
            assert text[i] == ",", f"expected , in {text!r}"
            i += 1
            assert i < len(text), f"trailing comma in {text!r}"
    return tuple(out)


def _family_of(sample: str, families: dict[str, Family]) -> Family:
    if sample in families:
        return families[sample]
    for suffix in ("_bucket", "_sum", "_count"):
        base = sample.removesuffix(suffix)
        if base != sample and base in families and families[base].kind == "histogram":
            return families[base]
    raise AssertionError(f"sample {sample} has no # TYPE before it")


def parse(text: str) -> dict[str, Family]:
    assert text.endswith("\n"), "the exposition ends with a newline"
    families: dict[str, Family] = {}
    for line in text[:-1].split("\n"):
        assert line, "no blank lines"
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert _NAME.fullmatch(name) and help_text, line
            family = families.setdefault(name, Family(name))
            assert not family.help and not family.samples, f"HELP {name} twice or late"
            family.help = help_text
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert _NAME.fullmatch(name) and kind in _KINDS, line
            family = families.setdefault(name, Family(name))
            assert not family.kind and not family.samples, f"TYPE {name} twice or late"
            family.kind = kind
        else:
            assert not line.startswith("#"), f"unknown comment {line!r}"
            match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
            assert match, f"bad sample line {line!r}"
            name, labels, value = match.groups()
            family = _family_of(name, families)
            key = (name, _labels(labels or ""))
            assert key not in family.samples, f"duplicate series {line!r}"
            family.samples[key] = _value(value)
            if family.kind == "counter":
                assert family.samples[key] >= 0, line
    for family in families.values():
        assert family.kind, f"{family.name} has HELP but no TYPE"
        if family.kind == "histogram":
            _check_histogram(family)
    return families


def _check_histogram(family: Family) -> None:
    buckets = [
        (dict(labels)["le"], v)
        for (n, labels), v in family.samples.items()
        if n.endswith("_bucket")
    ]
    assert buckets and buckets[-1][0] == "+Inf", f"{family.name}: last bucket must be +Inf"
    bounds = [_value(le) for le, _ in buckets]
    assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds), bounds
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), f"{family.name}: buckets are not cumulative: {counts}"
    total = family.samples[(family.name + "_count", ())]
    assert counts[-1] == total, f"{family.name}: +Inf {counts[-1]} != _count {total}"
    assert family.samples[(family.name + "_sum", ())] >= 0


def sample(families: dict[str, Family], name: str, **labels: str) -> float:
    """The sample's value; 0 for a labelled counter series not written yet."""
    family = _family_of(name, families)
    key = (name, tuple(sorted(labels.items())))
    for (n, got), value in family.samples.items():
        if (n, tuple(sorted(got))) == key:
            return value
    assert labels, f"{name} has no sample"
    return 0.0


async def scrape(http: aiohttp.ClientSession, lean: Server) -> dict[str, Family]:
    async with http.get(lean.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        return parse(await resp.text())


async def until(
    http: aiohttp.ClientSession, lean: Server, name: str, want: float, **labels: str
) -> dict[str, Family]:
    """Scrape until the sample reaches `want` (a handler's `finally` may still be running)."""
    async with asyncio.timeout(3):
        while True:
            families = await scrape(http, lean)
            if sample(families, name, **labels) == want:
                return families
            await asyncio.sleep(0.02)


# --- the parser itself --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "x 1\n",  # no TYPE
        '# TYPE x counter\nx{a="1"} 1\nx{a="1"} 2\n',  # duplicate series
        "# TYPE x counter\nx{a=1} 1\n",  # unquoted label value
        '# TYPE x counter\nx{a="\\t"} 1\n',  # unknown escape
        "# TYPE h histogram\n"
        'h_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 0\nh_count 1\n',  # not cumulative
        '# TYPE h histogram\nh_bucket{le="1"} 1\nh_bucket{le="+Inf"} 1\nh_sum 0\nh_count 2\n',
        "# TYPE x gauge\nx 1",  # no final newline
    ],
)
def test_the_parser_rejects_what_prometheus_would(text: str) -> None:
    with pytest.raises(AssertionError):
        parse(text)


# --- lean's exposition --------------------------------------------------------------------


async def test_metrics_count_runs_errors_fallbacks_rejections_and_active_streams() -> None:
    async with FakeOpenAI() as fake:
        # commit_wait: the held stream's headers go out while its upstream is silent.
        config = lean_config(
            fake.base_url, limits="max_streams = 1", server="commit_wait = 0.1", extra=SCENES
        )
        async with running(config) as lean, aiohttp.ClientSession() as http:
            families = await scrape(http, lean)
            assert sample(families, "lean_active_streams") == 0
            assert sample(families, "lean_time_to_first_token_seconds_count") == 0
            assert sample(families, "lean_events_relayed_total") == 0
            assert sample(families, "lean_resident_memory_bytes") > 10_000_000

            # 1. a streaming chat completion, answered
            fake.push(text_stream(TEXT))
            async with http.post(lean.url + URL, json=chat_body()) as resp:
                assert content_of(await read_sse_data(resp)) == TEXT
            chat = {"route": "chat.completions", "scene": ""}
            families = await until(http, lean, "lean_runs_total", 1, **chat, status="complete")
            assert sample(families, "lean_time_to_first_token_seconds_count") == 1
            relayed = sample(families, "lean_events_relayed_total")
            assert relayed >= len(TEXT.split())

            # 2. a scene run, answered
            fake.push(text_stream(TEXT))
            async with http.post(f"{lean.url}/v1/scenes/chat/stream", json={"message": "Hi"}) as r:
                assert r.status == 200
                assert "event: done" in await r.text()
            scene = {"route": "scene", "scene": "chat"}
            families = await until(http, lean, "lean_runs_total", 1, **scene, status="complete")
            assert sample(families, "lean_runs_total", **chat, status="complete") == 1
            assert sample(families, "lean_time_to_first_token_seconds_count") == 2
            assert sample(families, "lean_events_relayed_total") > relayed

            # 3. an upstream 500 before any content, answered by the non-streaming path
            fake.push(
                Reply(status=500, body=error_body("boom", type="server_error")),
                Reply(body=completion(TEXT)),
            )
            async with http.post(lean.url + URL, json=chat_body()) as resp:
                assert content_of(await read_sse_data(resp)) == TEXT
            families = await until(http, lean, "lean_runs_total", 2, **chat, status="complete")
            assert (
                sample(families, "lean_upstream_errors_total", provider="up", code="upstream_error")
                >= 1
            )
            assert sample(families, "lean_fallbacks_total") >= 1
            assert sample(families, "lean_time_to_first_token_seconds_count") == 3

            # 4. one stream held open (the upstream stalls): a second one is refused
            fake.push(Stall(seconds=10))
            held = await http.post(lean.url + URL, json=chat_body())
            try:
                assert held.status == 200
                await fake.wait_request(4)
                families = await scrape(http, lean)
                assert sample(families, "lean_active_streams") == 1
                async with http.post(lean.url + URL, json=chat_body()) as refused:
                    assert refused.status == 503
                families = await scrape(http, lean)
                assert sample(families, "lean_admission_rejections_total", reason="overloaded") == 1
                assert sample(families, "lean_active_streams") == 1
            finally:
                held.close()
            families = await until(http, lean, "lean_active_streams", 0)
            families = await until(http, lean, "lean_runs_total", 1, **chat, status="cancelled")

    # Everything at the end, once more: nothing counted twice, nothing lost.
    assert sample(families, "lean_runs_total", **chat, status="complete") == 2
    assert sample(families, "lean_runs_total", **scene, status="complete") == 1
    assert sample(families, "lean_admission_rejections_total", reason="overloaded") == 1
    assert sample(families, "lean_active_scene_runs") == 0
    # Only the answered runs have a time to first token; the cancelled one has none.
    assert sample(families, "lean_time_to_first_token_seconds_count") == 3
    assert sample(families, "lean_time_to_first_token_seconds_bucket", le="+Inf") == 3
    assert sample(families, "lean_time_to_first_token_seconds_sum") > 0
    assert sample(families, "lean_resident_memory_bytes") > 10_000_000
    assert len(fake.requests) == 5  # the refused request never reached the upstream


BIG_ANSWER = [sse({"choices": [{"index": 0, "delta": {"content": "x" * 4000}}]})] * 5000  # 20 MB


async def raw_request(lean: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A streaming chat completion sent by hand, so that nothing reads the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", lean.port)
    body = json.dumps(chat_body()).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    await writer.drain()
    return reader, writer


async def never_read(slow_client_timeout: float = 0.5) -> dict[str, Family]:
    """The metrics once lean cut a client that never read a 20 MB answer."""
    async with FakeOpenAI() as fake:
        config = lean_config(fake.base_url, limits=f"slow_client_timeout = {slow_client_timeout}")
        async with running(config) as lean, aiohttp.ClientSession() as http:
            fake.push(Stream(events=[*BIG_ANSWER, DONE]))
            _, writer = await raw_request(lean)
            try:
                await fake.wait_disconnect(0, timeout=5)
                await until(http, lean, "lean_slow_client_evictions_total", 1)
                return await until(http, lean, "lean_active_streams", 0)
            finally:
                writer.close()


async def test_a_client_that_never_reads_is_counted_as_an_eviction() -> None:
    families = await never_read()
    assert sample(families, "lean_slow_client_evictions_total") == 1
    incomplete = {"route": "chat.completions", "scene": "", "status": "incomplete"}
    assert sample(families, "lean_runs_total", **incomplete) == 1
    assert sample(families, "lean_runs_total", **{**incomplete, "status": "complete"}) == 0


async def test_a_client_that_pauses_then_reads_is_counted_as_a_backpressure_wait() -> None:
    async with FakeOpenAI() as fake:
        config = lean_config(fake.base_url, limits="slow_client_timeout = 5")
        async with running(config) as lean, aiohttp.ClientSession() as http:
            fake.push(Stream(events=[*BIG_ANSWER, DONE]))
            reader, writer = await raw_request(lean)
            try:
                await fake.wait_request(0)
                # Long enough for lean's writes to block on the full socket buffers; far
                # less than slow_client_timeout, so the client is not cut.
                await asyncio.sleep(0.3)
                received = 0
                async with asyncio.timeout(5):
                    while data := await reader.read(1 << 20):
                        received += len(data)
            finally:
                writer.close()
            families = await until(http, lean, "lean_active_streams", 0)
    assert received > 20_000_000
    assert sample(families, "lean_backpressure_waits_total") >= 1
    assert sample(families, "lean_slow_client_evictions_total") == 0
    complete = {"route": "chat.completions", "scene": "", "status": "complete"}
    assert sample(families, "lean_runs_total", **complete) == 1


async def test_a_client_that_never_reads_is_counted_as_a_backpressure_wait() -> None:
    families = await never_read()
    assert sample(families, "lean_backpressure_waits_total") >= 1


async def test_with_client_tokens_metrics_needs_the_bearer_token() -> None:
    config = lean_config(extra="[auth]\ntokens_env = LEAN_TOKENS\n", environ={"LEAN_TOKENS": "t1"})
    async with running(config) as lean, aiohttp.ClientSession() as http:
        async with http.get(lean.url + "/metrics") as resp:
            assert resp.status == 401
            assert "lean_" not in await resp.text()
        bad = {"Authorization": "Bearer t2"}
        async with http.get(lean.url + "/metrics", headers=bad) as resp:
            assert resp.status == 401
        good = {"Authorization": "Bearer t1"}
        async with http.get(lean.url + "/metrics", headers=good) as resp:
            assert resp.status == 200
            families = parse(await resp.text())
    assert sample(families, "lean_active_streams") == 0


async def test_no_secret_and_no_prompt_in_the_exposition() -> None:
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url)) as lean:
        fake.push(Reply(status=500, body=error_body(f"bad key {SECRET}")), Reply(status=500))
        async with aiohttp.ClientSession() as http:
            async with http.post(lean.url + URL, json=chat_body("my private words")) as resp:
                await resp.read()
            async with http.get(lean.url + "/metrics") as resp:
                text = await resp.text()
    assert parse(text)
    assert "upstream_error" in text
    assert SECRET not in text and "private" not in text


# --- the renderer, directly --------------------------------------------------------------


def test_label_values_are_escaped() -> None:
    metrics = Metrics()
    metrics.upstream_errors[('a"b\\c', "upstream_error")] += 1
    metrics.upstream_errors[("line\nbreak", "rate_limited")] += 2
    text = metrics.render().decode()
    assert 'provider="a\\"b\\\\c"' in text
    assert 'provider="line\\nbreak"' in text
    families = parse(text)
    assert (
        sample(families, "lean_upstream_errors_total", provider='a"b\\c', code="upstream_error")
        == 1
    )
    assert (
        sample(families, "lean_upstream_errors_total", provider="line\nbreak", code="rate_limited")
        == 2
    )


@pytest.mark.parametrize(
    ("seconds", "le"), [(0.05, "0.05"), (0.051, "0.1"), (120.0, "120"), (121.0, "+Inf")]
)
def test_a_time_to_first_token_lands_in_the_first_bucket_that_holds_it(
    seconds: float, le: str
) -> None:
    metrics = Metrics()
    metrics.run_ended("chat.completions", "", "complete", 3, seconds)
    metrics.run_ended("scene", "chat", "error", 1, None)  # no first token: not observed
    families = parse(metrics.render().decode())
    family = families["lean_time_to_first_token_seconds"]
    first = next(
        dict(labels)["le"]
        for (name, labels), value in family.samples.items()
        if name.endswith("_bucket") and value == 1
    )
    assert first == le
    assert sample(families, "lean_time_to_first_token_seconds_count") == 1
    assert math.isclose(
        sample(families, "lean_time_to_first_token_seconds_sum"), seconds, rel_tol=1e-6
    )
    assert sample(families, "lean_events_relayed_total") == 4


def test_rendering_300_series_is_cheap() -> None:
    """A sanity bound, not a benchmark (bench/ measures): ~50 µs is expected, 5 ms allowed."""
    metrics = Metrics()
    for i in range(50):
        for status in ("complete", "error", "cancelled", "incomplete"):
            metrics.run_ended("scene", f"scene-{i}", status, 10, 0.3)
        metrics.upstream_errors[(f"provider-{i}", "upstream_error")] += 1
        metrics.upstream_errors[(f"provider-{i}", "rate_limited")] += 1
    gauges = [("lean_active_streams", "Streams in progress.", 7.0)]
    families = parse(metrics.render(gauges).decode())
    assert sum(len(f.samples) for f in families.values()) >= 300
    times = []
    for _ in range(20):
        started = time.perf_counter()
        metrics.render(gauges)
        times.append(time.perf_counter() - started)
    assert statistics.median(times) < 0.005
