"""The Python client (sync and async), the CLI client commands, TranslateStream and overload, end to end."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from typer.testing import CliRunner

from gateway.cli import app
from gateway.client import (
    AsyncPolyglotClient,
    Call,
    PolyglotClient,
    PolyglotError,
    Retry,
    translate_request,
    vectors,
)
from gateway.config import BatchingConfig, ModelConfig, ServerConfig
from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc
from gateway.server import GatewayServer
from tests.e2e.conftest import free_port, hold

runner = CliRunner()


async def test_sync_client(gateway: GatewayServer) -> None:
    def calls() -> None:
        with PolyglotClient(f"127.0.0.1:{gateway.port}") as client:
            assert client.health() == "SERVING"
            assert client.health("polyglot.v1.Polyglot/sat-demo") == "SERVING"
            reply = client.translate("Good morning.", "de", beam_size=2, max_new_tokens=4)
            assert reply.target_lang == "deu_Latn"
            assert len(reply.translations[0].hypotheses[0].token_ids) <= 4
            embeddings = vectors(client.embed(["a", "b"], normalize=True))
            np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
            assert client.classify("Hi there. Bye.", format="bio").results[0].tokens
            long = " ".join(f"Sentence number {i} is here." for i in range(300))
            whole = client.classify(long, long_input="chunk").results[0]
            assert not whole.truncated
            assert whole.tokens[-1].end == len(long)  # up to the final period
            assert client.classify(long).results[0].truncated
            assert client.segment("Hi there. Bye.").results[0].sentences
            assert client.fill_mask("A [MASK] day.", top_k=2).results[0].masks[0].predictions
            assert len(client.list_models().models) == 4
            with pytest.raises(grpc.RpcError) as caught:
                client.translate("Hello", "xx_Yyyy")
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(ValueError, match="format must be one of labels, bio, bioes"):
                client.classify("x", format="iob")

    await asyncio.to_thread(calls)


async def test_async_client_and_translate_stream(gateway: GatewayServer) -> None:
    async with AsyncPolyglotClient(f"127.0.0.1:{gateway.port}") as client:
        requests = [
            translate_request(f"Sentence {i}.", "fra_Latn", max_new_tokens=3, request_id=f"r{i}")
            for i in range(6)
        ]
        requests.append(translate_request("Bad target.", "xx", request_id="bad"))
        replies = {r.request_id: r async for r in client.translate_stream(requests)}
        assert set(replies) == {*(f"r{i}" for i in range(6)), "bad"}
        assert replies["bad"].error.code == "INVALID_ARGUMENT"
        assert "unknown language code 'xx'" in replies["bad"].error.message
        for i in range(6):
            alone = await client.translate(f"Sentence {i}.", "fra_Latn", max_new_tokens=3)
            streamed = replies[f"r{i}"].translations
            assert [list(h.token_ids) for t in streamed for h in t.hypotheses] == [
                list(h.token_ids) for t in alone.translations for h in t.hypotheses
            ]
            scores = [h.score for t in alone.translations for h in t.hypotheses]
            assert [h.score for t in streamed for h in t.hypotheses] == pytest.approx(scores, rel=1e-5)
        reply = await client.embed("x", pooling="cls")
        assert reply.dimensions > 0


async def test_cli_commands(gateway: GatewayServer) -> None:
    server = f"127.0.0.1:{gateway.port}"

    def invoke(*args: str) -> str:
        result = runner.invoke(app, [*args, "--server", server])
        assert result.exit_code == 0, result.output
        return result.output

    output = await asyncio.to_thread(
        invoke, "translate", "Hello", "--to", "fra_Latn", "--max-new-tokens", "3"
    )
    assert "eng_Latn: Hello" in output
    assert "fra_Latn:" in output
    table = await asyncio.to_thread(invoke, "classify", "One. Two.", "--format", "bio")
    assert "┃ label" in table
    assert "SENTENCE [" in table
    assert "1  " in (await asyncio.to_thread(invoke, "segment", "One sentence. Another one."))
    assert "dims" in (await asyncio.to_thread(invoke, "embed", "vector please"))
    assert "nllb-demo" in (await asyncio.to_thread(invoke, "models", "list"))
    # User text and model output print verbatim, never as markup, one line each even through a pipe.
    text = "see [/x] here, " * 12 + "[bold]Hi[/bold]"
    output = await asyncio.to_thread(invoke, "translate", text, "--to", "fra_Latn", "--max-new-tokens", "3")
    assert f"eng_Latn: {text}\n" in output
    lines = (await asyncio.to_thread(invoke, "segment", text)).splitlines()
    numbered = [re.match(r" *\d+  (.*)$", line) for line in lines]
    assert all(numbered), f"a sentence was wrapped: {lines}"
    assert "".join(m.group(1) for m in numbered if m).replace(" ", "") == text.replace(" ", "")
    # --server wins over PGW_SERVER, which wins over the default
    elsewhere = {"PGW_SERVER": "127.0.0.1:9"}  # nothing listens there
    flag = await asyncio.to_thread(runner.invoke, app, ["embed", "x", "--server", server], env=elsewhere)
    assert flag.exit_code == 0, flag.output
    env = await asyncio.to_thread(runner.invoke, app, ["embed", "x"], env={"PGW_SERVER": server})
    assert env.exit_code == 0, env.output
    failed = await asyncio.to_thread(
        runner.invoke, app, ["translate", "Hi", "--to", "zz", "--server", server]
    )
    assert failed.exit_code == 1
    assert re.search(r"INVALID_ARGUMENT: .*unknown language code 'zz'.* \(request id \S+\)", failed.output)


async def test_cli_json_on_every_client_command(gateway: GatewayServer) -> None:
    """`--json` prints the whole reply, every field, verbatim: what the Python client returns."""
    server = f"127.0.0.1:{gateway.port}"

    def invoke(*args: str) -> dict[str, Any]:
        result = runner.invoke(app, [*args, "--json", "--server", server])
        assert result.exit_code == 0, result.output
        parsed: dict[str, Any] = json.loads(result.output)
        return parsed

    text = "[bold]Ünïcode[/bold] stays."
    translated = await asyncio.to_thread(invoke, "translate", text, "--to", "fr", "--max-new-tokens", "3")
    assert translated["targetLang"] == "fra_Latn"
    assert len(translated["translations"][0]["hypotheses"][0]["tokenIds"]) <= 3
    segmented = await asyncio.to_thread(invoke, "segment", "One.\n\nTwo.", "--wtpsplit-compat")
    sentences = segmented["results"][0]["sentences"]
    assert "".join(s["text"] for s in sentences) == "One.Two."  # newlines dropped, as wtpsplit
    assert sentences[0]["start"] == 0  # zero fields are printed too
    stripped = await asyncio.to_thread(invoke, "segment", " One. \n Two. ", "--strip-whitespace")
    assert all(s["text"] == s["text"].strip() for s in stripped["results"][0]["sentences"])
    classified = await asyncio.to_thread(invoke, "classify", text, "--format", "bio")
    assert classified["labels"] == ["BOUNDARY"]
    assert text[: classified["results"][0]["tokens"][0]["end"]].startswith("[")
    embedded = await asyncio.to_thread(invoke, "embed", "x", "--normalize")
    assert len(embedded["embeddings"][0]["values"]) == embedded["dimensions"]
    filled = await asyncio.to_thread(invoke, "fill-mask", "A [MASK] day.", "--top-k", "2")
    assert len(filled["results"][0]["masks"][0]["predictions"]) == 2
    detected = await asyncio.to_thread(invoke, "detect", "Bonjour tout le monde, comment allez-vous ?")
    assert detected["results"][0]["best"]["language"] == "fra_Latn"
    assert len(detected["results"][0]["candidates"]) == 3
    listed = await asyncio.to_thread(invoke, "models", "list")
    assert {m["name"] for m in listed["models"]} >= {"nllb-demo", "sat-demo"}


async def test_full_queue_is_resource_exhausted(exported) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("translation")
    config = ServerConfig.load(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        models=(ModelConfig(name="nllb", path=out, variant="fp32"),),
        batching=BatchingConfig(max_batch_size=1, max_queue_size=2),
    )
    server = GatewayServer(config)
    await server.start()
    try:
        async with AsyncPolyglotClient(f"127.0.0.1:{server.port}") as client:
            # Three texts never fit a queue of two at once: they are admitted in parts and all answered.
            whole = await client.translate(["One.", "Two.", "Three."], "fra_Latn", max_new_tokens=2)
            assert len(whole.translations) == 3
            with hold(server, "nllb") as held:
                running = asyncio.ensure_future(client.translate("Held.", "fra_Latn", max_new_tokens=2))
                await held.started.wait()
                queued = asyncio.ensure_future(client.translate(["A.", "B."], "fra_Latn", max_new_tokens=2))
                await held.queued(2)
                with pytest.raises(PolyglotError) as refused:
                    await client.translate("One too many.", "fra_Latn", max_new_tokens=2)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "max_queue_size 2" in (refused.value.details() or "")
                # a request that fits but not now is refused whole: none of its texts waits for nothing
                with pytest.raises(PolyglotError, match="this request adds 2"):
                    await client.translate(["C.", "D."], "fra_Latn", max_new_tokens=2)
            assert len((await running).translations) == 1
            assert len((await queued).translations) == 2
            reply = await client.translate("Still there?", "fra_Latn", max_new_tokens=2)
            assert reply.translations
    finally:
        await server.stop(grace=1)


@pytest.mark.slow
def _wait_until_serving(server: subprocess.Popen[bytes], port: int, seconds: float) -> None:
    """Poll health (once a second) until the server in `server` answers SERVING; fail if it exits."""
    deadline = time.monotonic() + seconds
    while True:
        assert server.poll() is None, server.stdout.read().decode() if server.stdout else ""
        with PolyglotClient(f"127.0.0.1:{port}", timeout=2) as client:
            try:
                if client.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(1)


def test_serve_takes_each_models_variant(exported) -> None:  # type: ignore[no-untyped-def]
    """`--model NAME=DIR:VARIANT`, and `--variant` for the entries without one."""
    out, _ = exported("embedding")
    port = free_port()
    command = [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--metrics-port", "0"]
    command += ["--model", f"exact={out}:fp32", "--model", f"small={out}", "--variant", "fp16"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_until_serving(server, port, 120)
        with PolyglotClient(f"127.0.0.1:{port}") as client:
            variants = {m.name: m.variant for m in client.list_models().models}
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert variants == {"exact": "fp32", "small": "fp16"}
    refused = runner.invoke(app, ["serve", "--model", f"x={out}", "--variant", "fp8"])
    assert refused.exit_code == 2
    assert "variant 'fp8': choose fp32, fp16 or int8" in refused.output
    missing = runner.invoke(app, ["serve", "--model", "x"])
    assert "--model takes NAME=EXPORT_DIR[:VARIANT], not 'x'" in missing.output


def test_readme_first_commands_on_a_fresh_cache(tmp_path: Path) -> None:
    """`pgw serve --demo` builds, exports and serves the demo models; `pgw translate` prints a result."""
    port = free_port()
    env = os.environ | {
        "PGW_DEMO_DIR": str(tmp_path / "demo"),
        "PGW_PORT": str(port),
        "PGW_METRICS_PORT": "0",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--demo"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_until_serving(server, port, 240)
        translate = [
            "translate",
            "Hello",
            "--to",
            "fra_Latn",
            "--server",
            f"127.0.0.1:{port}",
            "--max-new-tokens",
            "5",
        ]
        result = subprocess.run(
            [sys.executable, "-m", "gateway", *translate],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "fra_Latn:" in result.stdout
        assert (tmp_path / "demo" / "exports" / "nllb-demo" / "manifest.json").is_file()
    finally:
        server.terminate()
        server.wait(timeout=30)


# ------------------------------------------------------------------------------------- client options


async def test_request_ids_metadata_and_trailers(gateway: GatewayServer) -> None:
    await asyncio.to_thread(_request_ids_metadata_and_trailers, f"127.0.0.1:{gateway.port}")


def _request_ids_metadata_and_trailers(target: str) -> None:
    with PolyglotClient(target) as client:
        mine = Call()
        client.embed("x", metadata={"x-request-id": "mine-1"}, call=mine)
        assert mine.request_id == mine.trailers["x-request-id"] == "mine-1"
        generated = Call()
        client.segment("One. Two.", call=generated)
        assert generated.request_id
        assert generated.request_id != "mine-1"
        failed = Call()
        with pytest.raises(PolyglotError) as caught:
            client.translate("Hi", "zz", metadata=[("x-request-id", "bad-1")], call=failed)
        error = caught.value
        assert isinstance(error, grpc.RpcError)
        assert error.status == error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown language code 'zz'" in error.message
        assert error.details() == error.message
        assert error.request_id == failed.request_id == "bad-1"
        assert str(error).startswith("INVALID_ARGUMENT: ")
        with pytest.raises(TypeError):
            client.translate("Hi", "fr", beam=2)  # type: ignore[call-arg]  # options are typed keywords
    with PolyglotClient(target, metadata={"x-request-id": "every-call"}) as client:
        call = Call()
        client.list_models(call=call)
        assert call.request_id == "every-call"


async def test_async_client_health_tokens_and_errors(gateway: GatewayServer) -> None:
    async with AsyncPolyglotClient(f"127.0.0.1:{gateway.port}") as client:
        assert await client.health() == "SERVING"
        assert await client.health("polyglot.v1.Polyglot/nllb-demo") == "SERVING"
        request = translate_request("Good morning.", "fra_Latn", max_new_tokens=5)
        messages = [m async for m in client.translate_tokens(request)]
        result = messages[-1].result
        streamed = [t for m in messages[:-1] for t in m.token_ids]
        assert streamed == list(result.translations[0].hypotheses[0].token_ids)
        with pytest.raises(ValueError, match="pooling must be one of mean, cls"):  # refused before calling
            await client.embed("x", pooling="max")  # type: ignore[arg-type]
        call = Call()
        with pytest.raises(PolyglotError) as caught:
            await client.translate("Hi", "zz", call=call)
        assert caught.value.request_id == call.request_id
        assert call.request_id
        with pytest.raises(PolyglotError) as caught:
            await client.health("polyglot.v1.Polyglot/no-such-model")
        assert caught.value.status == grpc.StatusCode.NOT_FOUND
        detected = await client.detect_language(["Guten Morgen, wie geht es dir?", ""], top_k=1)
        assert detected.results[0].best.language == "deu_Latn"
        assert not detected.results[1].HasField("best")


async def test_translate_stream_takes_a_timeout(gateway: GatewayServer) -> None:
    """A stream whose caller never closes its requests ends at its deadline, in both clients."""
    never = asyncio.Event()

    async def requests() -> AsyncIterator[pb.TranslateRequest]:
        yield translate_request("One.", "fra_Latn", max_new_tokens=2, request_id="r1")
        await never.wait()

    async with AsyncPolyglotClient(f"127.0.0.1:{gateway.port}") as client:
        with pytest.raises(PolyglotError) as caught:
            [r async for r in client.translate_stream(requests(), timeout=2)]
    assert caught.value.status == grpc.StatusCode.DEADLINE_EXCEEDED

    stop = threading.Event()

    def blocking() -> Iterator[pb.TranslateRequest]:
        yield translate_request("One.", "fra_Latn", max_new_tokens=2, request_id="r1")
        stop.wait()

    def sync_stream() -> grpc.StatusCode:
        with PolyglotClient(f"127.0.0.1:{gateway.port}") as sync_client:
            try:
                list(sync_client.translate_stream(blocking(), timeout=2))
            except PolyglotError as exc:
                return exc.status
            finally:
                stop.set()
        return grpc.StatusCode.OK

    assert await asyncio.to_thread(sync_stream) == grpc.StatusCode.DEADLINE_EXCEEDED


class _Flaky(polyglot_pb2_grpc.PolyglotServicer):
    """Embed fails with `code` for its first `failures` calls, then answers."""

    def __init__(self, code: grpc.StatusCode, failures: int) -> None:
        self.code, self.failures, self.calls = code, failures, 0

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort(self.code, "not yet")
        return pb.EmbedResponse(model="flaky", dimensions=1)


async def _flaky_server(servicer: _Flaky) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    polyglot_pb2_grpc.add_PolyglotServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("code", "retry", "calls", "answered"),
    [
        (grpc.StatusCode.UNAVAILABLE, Retry(), 3, True),  # retried by gRPC, from the service config
        (grpc.StatusCode.UNAVAILABLE, Retry(attempts=1), 1, False),  # retries off
        (grpc.StatusCode.RESOURCE_EXHAUSTED, Retry(), 1, False),  # overload is the caller's to back off
        (grpc.StatusCode.RESOURCE_EXHAUSTED, Retry(codes=("RESOURCE_EXHAUSTED",)), 3, True),
    ],
)
async def test_unavailable_is_retried_by_the_channel(
    code: grpc.StatusCode, retry: Retry, calls: int, answered: bool
) -> None:
    servicer = _Flaky(code, failures=2)
    server, target = await _flaky_server(servicer)
    try:
        async with AsyncPolyglotClient(target, retry=retry) as client:
            if answered:
                assert (await client.embed("x")).model == "flaky"
            else:
                with pytest.raises(PolyglotError) as caught:
                    await client.embed("x")
                assert caught.value.status == code
        with PolyglotClient(target, retry=retry) as sync_client:  # the sync client's channel, the same
            servicer.calls = 0
            if answered:
                assert (await asyncio.to_thread(sync_client.embed, "x")).model == "flaky"
            else:
                with pytest.raises(PolyglotError):
                    await asyncio.to_thread(sync_client.embed, "x")
    finally:
        await server.stop(0)
    assert servicer.calls == calls


async def test_wait_for_ready_waits_for_the_server_to_come_up(exported) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    target = f"127.0.0.1:{port}"
    async with AsyncPolyglotClient(target, timeout=120, retry=Retry(attempts=1)) as client:
        with pytest.raises(PolyglotError) as caught:
            await client.embed("x")  # nothing listens: fails at once
        assert caught.value.status == grpc.StatusCode.UNAVAILABLE
        waiting = asyncio.ensure_future(client.embed("x", wait_for_ready=True))
        state = client.channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.TRANSIENT_FAILURE:  # it tried, and found nothing
            await client.channel.wait_for_state_change(state)
            state = client.channel.get_state()
        assert not waiting.done()
        config = ServerConfig.load(
            host="127.0.0.1",
            port=port,
            metrics_port=0,
            models=(ModelConfig(name="embed", path=exported("embedding")[0]),),
        )
        server = GatewayServer(config)
        await server.start()
        try:
            assert (await waiting).model == "embed"
        finally:
            await server.stop(grace=1, drain=0)
