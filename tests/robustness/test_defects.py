"""One test per defect found by trying to hurt the demo server, each on `pgw serve` with the default limits
(or the small ones where a limit is the point)."""

from __future__ import annotations

import concurrent.futures
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.manifest import Manifest, Task
from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc
from tests.robustness.conftest import Served, running, still_serving

Exported = Callable[[Task], tuple[Path, Manifest]]
Stub = polyglot_pb2_grpc.PolyglotStub
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def default_server(exported: Exported, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The default limits (20,000 characters a text, 1,000,000 a request), a small queue for parts."""
    settings = {"limits": {}, "batching": {"max_queue_size": 64, "max_batch_size": 8}}
    with running(exported, tmp_path_factory.mktemp("defaults"), settings) as served:
        yield served


@pytest.fixture(scope="module")
def big(default_server: Served) -> Iterator[Stub]:
    with grpc.insecure_channel(default_server.target) as channel:
        yield polyglot_pb2_grpc.PolyglotStub(channel)


def _refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def _health_waits(target: str, work: Callable[[], object], checks: int = 5) -> tuple[float, object]:
    """Run `work` over and over on another thread while `checks` health checks, 20 ms apart, go over
    another connection: the longest check, and the result of the first `work`. The work repeats until the
    checks are done, so each check is made while the work is running however fast it is."""
    waits: list[float] = []
    results: list[object] = []
    done = threading.Event()

    def repeat() -> None:
        results.append(work())
        while not done.is_set():
            work()

    with concurrent.futures.ThreadPoolExecutor(1) as pool, grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connected before timing
        running = pool.submit(repeat)
        try:
            while len(waits) < checks and not running.done():
                started = time.perf_counter()
                health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                waits.append(time.perf_counter() - started)
                time.sleep(0.02)
        finally:
            done.set()
        running.result()  # raises what the work raised
    return max(waits), results[0]


# 1. ------------------------------------------------------------------------------- Segment's newlines


def test_a_text_of_newlines_is_segmented_without_freezing_the_server(
    default_server: Served, big: Stub
) -> None:
    text = "\n" * 19999 + "x"
    longest, reply = _health_waits(
        default_server.target,
        lambda: big.Segment(pb.SegmentRequest(texts=[text]), timeout=60),
    )
    sentences = reply.results[0].sentences  # type: ignore[attr-defined]
    assert [s.text for s in sentences] == ["\n" * 19999, "x"]
    assert longest < 0.5, f"a health check waited {longest:.3f} s"


def test_the_worst_requests_within_the_limits_never_stall_health(default_server: Served, big: Stub) -> None:
    """The largest requests the default limits allow, on every rpc: health checks keep answering."""
    long_text = ("Ein Satz. " * 2000)[:20000]
    texts = [long_text] * 50  # 1,000,000 characters: the request limit
    calls: list[Callable[[], object]] = [
        lambda: big.Classify(pb.ClassifyRequest(texts=texts, return_scores=pb.SCORE_KIND_PROBABILITIES)),
        lambda: big.Embed(pb.EmbedRequest(texts=texts, truncate=True)),
        lambda: big.Segment(pb.SegmentRequest(texts=texts[:8], return_probabilities=True)),
        lambda: big.Translate(
            pb.TranslateRequest(
                texts=["A sentence to translate, of a few words."] * 16,
                source_lang="en",
                target_lang="fr",
                options=pb.TranslateOptions(beam_size=16, max_new_tokens=64, num_return=16),
            ),
            timeout=300,
        ),
    ]
    for call in calls:
        longest, _ = _health_waits(default_server.target, call)
        assert longest < 0.5, f"a health check waited {longest:.3f} s"


# 2. ----------------------------------------------------------------------------- FillMask amplification


def test_fill_mask_replies_are_bounded(big: Stub) -> None:
    many = _refused(lambda: big.FillMask(pb.FillMaskRequest(texts=["[MASK] " * 500], top_k=50)))
    assert many.code() == INVALID
    assert "limit of 16 per text" in (many.details() or "")
    text = "word " * 3900 + "[MASK]."  # 19.5 kB
    huge = _refused(
        lambda: big.FillMask(pb.FillMaskRequest(texts=[text.replace("word", "[MASK]", 15)], top_k=50))
    )
    assert huge.code() == INVALID
    assert "over the limit of 4000000" in (huge.details() or "")
    reply = big.FillMask(pb.FillMaskRequest(texts=["Paris is the [MASK] of France."], top_k=5))
    assert len(reply.results[0].masks[0].predictions) == 5


# 3./4. -------------------------------------------------------------------------------- decoding options


def _translate(**options: object) -> pb.TranslateRequest:
    return pb.TranslateRequest(
        texts=["Hello there."], source_lang="en", target_lang="fr", options=pb.TranslateOptions(**options)
    )


@pytest.mark.parametrize("count", [17, 20000, 2**32 - 1])
def test_sampled_num_return_is_bounded(big: Stub, count: int) -> None:
    sampling = pb.SamplingOptions(temperature=0.8, seed=1)
    error = _refused(lambda: big.Translate(_translate(num_return=count, sampling=sampling)))
    assert error.code() == INVALID
    assert f"num_return: {count} samples is outside 1..16" in (error.details() or "")


BAD_FLOATS = [float("nan"), float("inf"), float("-inf"), -1000.0, 3e38]


@pytest.mark.parametrize("value", BAD_FLOATS)
@pytest.mark.parametrize("field", ["temperature", "top_p", "length_penalty"])
def test_every_float_is_checked_at_the_edge(big: Stub, field: str, value: float) -> None:
    if field == "length_penalty":
        request = _translate(beam_size=4, length_penalty=value)
    else:
        request = _translate(sampling=pb.SamplingOptions(**{field: value}))
    if field == "temperature" and value == 3e38:  # a huge temperature is valid: near-uniform sampling
        assert big.Translate(request).translations
        return
    error = _refused(lambda: big.Translate(request))
    assert error.code() == INVALID, error.details()
    assert field in (error.details() or "")


def test_a_bad_request_never_fails_its_batch_neighbours(default_server: Served) -> None:
    good = [
        pb.TranslateRequest(texts=[f"Sentence {i}."], source_lang="en", target_lang="fr") for i in range(31)
    ]
    bad = _translate(sampling=pb.SamplingOptions(temperature=float("nan")))
    with grpc.insecure_channel(default_server.target) as channel:
        stub = polyglot_pb2_grpc.PolyglotStub(channel)
        calls = [stub.Translate.future(r, timeout=120) for r in [*good[:15], bad, *good[15:]]]
        outcomes = [call.exception() for call in calls]
    assert outcomes[15] is not None
    assert outcomes[15].code() == INVALID
    assert [o for i, o in enumerate(outcomes) if i != 15] == [None] * 31


# 5. ------------------------------------------------------------------------------------ TranslateStream


def test_every_stream_message_gets_a_reply(big: Stub) -> None:
    requests = [
        pb.TranslateRequest(texts=["Good."], source_lang="en", target_lang="fr", request_id="a"),
        pb.TranslateRequest(
            texts=["Bad."],
            source_lang="en",
            target_lang="fr",
            request_id="b",
            options=pb.TranslateOptions(sampling=pb.SamplingOptions(temperature=float("nan"))),
        ),
        pb.TranslateRequest(texts=["Good too."], source_lang="en", target_lang="fr", request_id="c"),
    ]
    replies = {r.request_id: r for r in big.TranslateStream(iter(requests), timeout=60)}
    assert sorted(replies) == ["a", "b", "c"]
    assert replies["b"].error.code == "INVALID_ARGUMENT"
    assert "temperature" in replies["b"].error.message
    for good in ("a", "c"):
        assert not replies[good].HasField("error")
        assert replies[good].translations


# 7. ------------------------------------------------------------------------------------ metrics labels


def test_clients_strings_never_become_metrics_labels(default_server: Served, big: Stub) -> None:
    url = f"http://127.0.0.1:{default_server.metrics_port}/metrics"
    for i in range(300):
        _refused(lambda i=i: big.Embed(pb.EmbedRequest(texts=["x"], model=f"made-up-{i}")))
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    assert "made-up" not in body
    labels = set(re.findall(r'model="([^"]*)"', body))
    assert labels <= {"sat-demo", "distilbert-demo", "distilbert-demo-fill-mask", "nllb-demo", "unknown", "-"}
    assert 'pgw_requests_total{code="INVALID_ARGUMENT",model="unknown",rpc="Embed"} 300.0' in body


# 9. --------------------------------------------------------------------------------- echoed bad values


def test_huge_bad_values_are_not_echoed_back(big: Stub) -> None:
    code = "x" * 20000
    error = _refused(
        lambda: big.Translate(pb.TranslateRequest(texts=["Hi."], source_lang=code, target_lang="fr"))
    )
    assert error.code() == INVALID
    assert len(error.details() or "") < 300
    assert "20000 characters" in (error.details() or "")
    model = _refused(lambda: big.Embed(pb.EmbedRequest(texts=["Hi."], model="m" * 20000)))
    assert len(model.details() or "") < 300


# 10. ------------------------------------------------------------------------------ Segment's windows


def test_a_segment_request_larger_than_the_queue_is_answered_in_parts(big: Stub) -> None:
    """Eight texts of 20,000 characters need hundreds of windows; the queue holds 64: admitted in parts."""
    text = " ".join(f"Sentence number {i} is here." for i in range(800))[:20000]
    reply = big.Segment(pb.SegmentRequest(texts=[text] * 8), timeout=300)
    assert len(reply.results) == 8
    assert all("".join(s.text for s in r.sentences) == text for r in reply.results)
    assert reply.usage.input_tokens > 64 * 512  # more window tokens than the whole queue could hold


def test_segment_limits_are_named(big: Stub) -> None:
    over = _refused(lambda: big.Segment(pb.SegmentRequest(texts=["y" * 20000] * 64)))
    assert over.code() == INVALID
    assert "limit of 1000000 per request" in (over.details() or "")
    stride = _refused(lambda: big.Segment(pb.SegmentRequest(texts=["Some text."], stride=1)))
    assert stride.code() == INVALID
    assert "stride: 1 must be between 32 and 510" in (stride.details() or "")


# 12. ----------------------------------------------------------------------------- the receive limit


def test_requests_beyond_the_text_limits_are_not_parsed(big: Stub) -> None:
    error = _refused(lambda: big.Embed(pb.EmbedRequest(texts=["z" * 19000] * 300)))  # 5.7 MB
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    still_serving(big)
