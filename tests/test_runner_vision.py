"""Vision models in runner mode: the encoder runs in the model's runner process, and
pixels and embeddings cross the socket through shared memory (``models.runner.shm``).

Greedy output with an image (a tiling projector, pruned embeddings) is the in-process
server's token for token; the HTTP process holds no libmtmd context; no block outlives
a request; errors raised in the runner arrive as the same HTTP errors; a runner killed
while it encodes ends the request with 503 ``model_crashed`` and the next image request
is served after the restart.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import psutil
import pytest

from bench.tinymodels import tiny_vlm
from models.registry import LoadedModel, ModelSpec, load_model, model_id_for
from models.runner import RestartPolicy
from models.runner.client import ModelCrashed
from models.runner.shm import SHM_DIR, Channel, remove_blocks
from models.runner.vision import RemoteVision
from models.vision import VisionEncoder, VisionError
from tests.browser import wait_for
from tests.conftest import LiveServer
from tests.test_vision_api import image_message, png_uri

# 256-wide embeddings: an image's 64+ rows are >= 64 KiB, so they travel through shm.
LLM = {"n_embd": 256}


@pytest.fixture(scope="module")
def vlms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("runner-vlm")
    return {
        "mlp": tiny_vlm(d, "mlp", llm=LLM, mmproj={"image_size": 128}),  # 256 tokens per image
        "tiling": tiny_vlm(d, "mlp", llm=LLM, mmproj={"grid_pinpoints": [128, 128, 192, 128, 128, 192, 192, 192]}),
        # M-RoPE: each kept row's (t, y, x) positions cross too; with wrong positions this
        # model's output changes (tests/test_mrope.py guards that), so equal output is a check
        "qwen2vl": tiny_vlm(d, "qwen2vl", llm={"attn_std": 0.3}),
    }


def blocks(*patterns: str) -> list[Path]:
    return [p for pattern in patterns for p in SHM_DIR.glob(pattern)]


def runner_blocks(pid: int) -> list[Path]:
    """Blocks a runner made, and blocks this process sent it."""
    return blocks(f"edgevlm-{pid}-*", f"edgevlm-{os.getpid()}-r{pid}-*")


def loaded(srv: LiveServer) -> LoadedModel:
    return srv.app.state.registry.loaded()[0]


def vlm_server(make_server: Any, files: tuple[Path, Path], runners: str) -> LiveServer:
    llm, mmproj = files
    srv = make_server(model=str(llm), mmproj=str(mmproj), runners=runners, ctx_size=4096, parallel=1,
                      speculative="off")
    srv.model_id = model_id_for(llm)  # type: ignore[attr-defined]
    return srv


def chat(srv: LiveServer, url: str, **edgevlm: Any) -> Any:
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0)
    return client.chat.completions.create(
        model=srv.model_id, messages=[image_message(url, "Describe.")], max_tokens=12, temperature=0,  # type: ignore[attr-defined]
        extra_body={"edgevlm": edgevlm} if edgevlm else None)


# --------------------------------------------------------------------------- shm


def channel_pair(tag: str = "t") -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    return Channel(Connection(a.detach()), tag), Channel(Connection(b.detach()), tag)


def test_large_arrays_cross_through_a_block_that_the_receiver_removes() -> None:
    sender, receiver = channel_pair("roundtrip")
    big = np.arange(300 * 256, dtype=np.float32).reshape(300, 256)
    big.flags.writeable = False  # as the embedding cache hands it out
    small = np.arange(16, dtype=np.int32)
    try:
        sender.send(("msg", big, {"small": small}))
        in_flight = blocks(f"edgevlm-{os.getpid()}-roundtrip-*")
        assert len(in_flight) == 1 and in_flight[0].stat().st_size == big.nbytes  # the small one is pickled
        kind, got, rest = receiver.recv()
        assert kind == "msg" and np.array_equal(got, big) and got.dtype == big.dtype
        assert not got.flags.writeable
        assert np.array_equal(rest["small"], small)
        assert not in_flight[0].exists()
    finally:
        sender.close()
        receiver.close()


def test_blocks_nobody_reads_are_removed_by_name() -> None:
    sender, receiver = channel_pair("lost")
    try:
        sender.send(np.ones((512, 512), dtype=np.uint8))
        sender.send(np.ones((512, 512), dtype=np.uint8))
        assert len(blocks(f"edgevlm-{os.getpid()}-lost-*")) == 2
        receiver.close()  # the receiver dies before reading them
        assert remove_blocks(os.getpid(), "lost") == 2
        assert not blocks(f"edgevlm-{os.getpid()}-lost-*")
        with pytest.raises(OSError):  # a send that fails leaves no block behind
            sender.send(np.ones((512, 512), dtype=np.uint8))
        assert not blocks(f"edgevlm-{os.getpid()}-lost-*")
    finally:
        sender.close()


# --------------------------------------------------------------------------- runner vision


def test_remote_vision_gives_the_in_process_encoders_chunks(vlms: dict[str, tuple[Path, Path]]) -> None:
    llm, mmproj = vlms["tiling"]
    spec = ModelSpec(id="tiling", path=str(llm), mmproj=str(mmproj), ctx_size=2048, parallel=1)
    local, remote = load_model(spec), load_model(spec, runner=RestartPolicy())
    try:
        assert isinstance(local.vision, VisionEncoder) and isinstance(remote.vision, RemoteVision)
        assert remote.vision.projector == local.vision.projector and remote.vision.projector.tiling
        assert remote.vision.media_marker == local.vision.media_marker
        assert remote.vision.n_embd == local.vision.n_embd == LLM["n_embd"]
        assert remote.vision.count_tokens(300, 200) == local.vision.count_tokens(300, 200)
        from models.images import ImageLimits, load_image

        image = load_image(png_uri(300, 200, seed=3), 0, ImageLimits())
        prompt = f"Look: {local.vision.media_marker} now."
        want, got = local.vision.tokenize(prompt, [image]), remote.vision.tokenize(prompt, [image])
        assert [type(c) for c in got] == [type(c) for c in want] and len(want) > 3
        for a, b in zip(want, got):
            if hasattr(a, "embeddings"):
                assert np.array_equal(a.embeddings, b.embeddings) and not b.embeddings.flags.writeable
                assert (a.image_hash, a.part, a.n_pos, a.cache_hit) == (b.image_hash, b.part, b.n_pos, b.cache_hit)
            else:
                assert a.tokens == b.tokens
        again = remote.vision.tokenize(prompt, [image])  # same pixel hash: the runner's cache answers
        assert all(c.cache_hit for c in again if hasattr(c, "embeddings"))
        assert remote.vision.cache.stats()["hits"] == sum(1 for c in again if hasattr(c, "embeddings"))
        # Errors raised in the runner arrive as the in-process encoder raises them.
        for vision in (local.vision, remote.vision):
            with pytest.raises(ValueError, match="media marker"):
                vision.tokenize("no marker here", [image])
        assert not runner_blocks(remote.runner.pid)
    finally:
        local.close()
        remote.close()


def test_an_exception_raised_in_the_runner_keeps_its_type_and_code(vlms: dict[str, tuple[Path, Path]]) -> None:
    llm, mmproj = vlms["mlp"]
    remote = load_model(ModelSpec(id="mlp", path=str(llm), mmproj=str(mmproj), ctx_size=1024, parallel=1),
                        runner=RestartPolicy())
    try:
        with pytest.raises(VisionError) as info:
            remote.runner.call("close")  # not a vision call the runner offers
        assert info.value.code == "vision_error" and info.value.status == 500
    finally:
        remote.close()


def test_greedy_image_chat_is_the_in_process_servers_token_for_token(
        make_server: Any, vlms: dict[str, tuple[Path, Path]]) -> None:
    for kind, files in vlms.items():
        local = vlm_server(make_server, files, "off")
        remote = vlm_server(make_server, files, "on")
        lm = loaded(remote)
        assert isinstance(lm.vision, RemoteVision) and isinstance(loaded(local).vision, VisionEncoder)
        pid = lm.runner.pid
        assert pid is not None and pid != os.getpid()
        assert lm.vision.uses_mrope == lm.engine.mrope == (kind == "qwen2vl")
        asks = [({}, png_uri(96, 64, seed=1)), ({"prune": {"method": "diverse", "keep": 0.75}}, png_uri(256, 192, seed=2))]
        for edgevlm, url in asks:
            a, b = chat(local, url, **edgevlm), chat(remote, url, **edgevlm)
            assert b.choices[0].message.content == a.choices[0].message.content, (kind, edgevlm)
            assert b.usage.prompt_tokens == a.usage.prompt_tokens
            assert b.model_extra["timings"]["images"][0]["tokens_after"] == \
                a.model_extra["timings"]["images"][0]["tokens_after"]
            if edgevlm:
                im = b.model_extra["timings"]["images"][0]
                assert im["prune_method"] == "diverse" and im["tokens_after"] < im["tokens_before"]
        assert not runner_blocks(pid)
        stats = lm.vision.cache.stats()
        assert stats["misses"] >= 2 and stats["bytes"] > 0
        metrics = httpx.get(remote.base_url + "/metrics").text
        label = f'{{gen_ai_request_model="{remote.model_id}"}}'  # type: ignore[attr-defined]
        line = next(ln for ln in metrics.splitlines() if ln.startswith(f"edgevlm_image_cache_bytes{label} "))
        assert float(line.split()[-1]) == stats["bytes"]
        assert lm.memory_bytes == lm.runner.memory_bytes  # the runner's RSS holds the cache


def test_a_bad_image_is_the_same_400_with_runners(make_server: Any, vlms: dict[str, tuple[Path, Path]]) -> None:
    local = vlm_server(make_server, vlms["mlp"], "off")
    remote = vlm_server(make_server, vlms["mlp"], "on")
    for url in ("data:image/png;base64,aGVsbG8=", png_uri(1, 400)):
        errors = []
        for srv in (local, remote):
            with pytest.raises(openai.BadRequestError) as info:
                chat(srv, url)
            errors.append((info.value.status_code, info.value.body["code"], info.value.body["message"]))
        assert errors[0] == errors[1]


def test_sigsegv_while_an_image_encodes_ends_it_with_model_crashed_and_the_next_is_served(
        make_server: Any, vlms: dict[str, tuple[Path, Path]]) -> None:
    srv = vlm_server(make_server, vlms["mlp"], "on")
    lm = loaded(srv)
    pid = lm.runner.pid
    url = png_uri(384, 384, seed=5)  # 432 KiB of pixels: a block
    os.kill(pid, signal.SIGSTOP)  # the runner takes the call but cannot answer it
    result: dict[str, Any] = {}

    def ask() -> None:
        try:
            chat(srv, url)
        except openai.APIStatusError as exc:
            result["error"] = exc

    thread = threading.Thread(target=ask)
    thread.start()
    try:
        sent = wait_for(lambda: blocks(f"edgevlm-{os.getpid()}-r{pid}-*"), 60, "the pixels sent to the runner")
    finally:
        os.kill(pid, signal.SIGSEGV)
        os.kill(pid, signal.SIGCONT)
    thread.join(120)
    error = result["error"]
    assert error.status_code == 503 and error.body["code"] == "model_crashed" and "SIGSEGV" in error.body["message"]
    assert not any(p.exists() for p in sent)  # the dead runner's unread pixels are removed
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

    answer = chat(srv, url)  # waits out the restart
    assert answer.model_extra["timings"]["images"][0]["tokens_after"] > 0
    assert lm.runner.pid not in (None, pid) and lm.runner.restarts == 1
    assert not runner_blocks(lm.runner.pid)


def test_the_crash_error_reaches_a_direct_vision_call(vlms: dict[str, tuple[Path, Path]]) -> None:
    llm, mmproj = vlms["mlp"]
    remote = load_model(ModelSpec(id="mlp", path=str(llm), mmproj=str(mmproj), ctx_size=1024, parallel=1),
                        runner=RestartPolicy(backoff_s=30))
    try:
        from models.images import ImageLimits, load_image

        image = load_image(png_uri(384, 384, seed=6), 0, ImageLimits())
        pid = remote.runner.pid
        os.kill(pid, signal.SIGSTOP)  # holds the call until the kill
        threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
        with pytest.raises(ModelCrashed) as info:
            remote.vision.tokenize(remote.vision.media_marker, [image])
        assert info.value.exit_reason == "SIGKILL"
        assert not runner_blocks(pid)
    finally:
        remote.close()
