"""Retrying a generation the server refused before ``Accepted``, against an in-process fake
Diffusion server (no stepstream server needed).

The fake refuses its first attempts as a draining or full replica would (UNAVAILABLE, or
RESOURCE_EXHAUSTED with or without ``grpc-retry-pushback-ms``), then serves a small generation:
Accepted, a StepEnd per step when the request subscribed, Completed with a PNG. The policy's
``sleep`` records the waits, so the tests assert on what was asked, never on wall time."""

from __future__ import annotations

import io
import logging
import threading
from concurrent import futures
from typing import List, Optional, Sequence, Tuple

import grpc
import pytest

from stepstream import (
    DeadlineExceededError,
    InvalidRequestError,
    QueueFullError,
    RemotePipeline,
    RetryPolicy,
    ServerUnavailableError,
    StatusError,
)
from stepstream import errors
from stepstream.retry import pushback_ms, retryable
from stepstream.v1 import stepstream_pb2 as pb
from stepstream.v1 import stepstream_pb2_grpc as rpc

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

#: One refusal: (code, grpc-retry-pushback-ms or None, send a Queued event first).
Refusal = Tuple[grpc.StatusCode, Optional[str], bool]


def png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


class Flaky(rpc.DiffusionServicer):
    """Refuses the first ``len(refusals)`` attempts (Generate and GenerateOnce alike), then serves.

    ``fail_after_steps``: once admitted, end the stream with UNAVAILABLE after that many steps."""

    def __init__(self, refusals: Sequence[Refusal] = (), steps: int = 3, fail_after_steps: Optional[int] = None,
                 code_details: str = "replica draining"):
        self.refusals = list(refusals)
        self.steps = steps
        self.fail_after_steps = fail_after_steps
        self.details = code_details
        self.attempts = {"Generate": 0, "GenerateOnce": 0}
        self.lock = threading.Lock()

    def _count(self, rpc_name: str) -> int:
        with self.lock:
            self.attempts[rpc_name] += 1
            return sum(self.attempts.values())

    def _refuse(self, n: int, context) -> None:
        code, push, _ = self.refusals[n - 1]
        if push is not None:
            context.set_trailing_metadata((("grpc-retry-pushback-ms", push),))
        context.abort(code, self.details)

    def _completed(self, req: pb.GenerateRequest) -> pb.Completed:
        return pb.Completed(images=[pb.Image(data=png(), mime_type="image/png", width=8, height=8)],
                            seed=req.seed, request_id="r1")

    def ListModels(self, request, context):
        return pb.ListModelsResponse(default_model="m", models=[pb.ModelInfo(id="m", default_steps=self.steps)])

    def GenerateOnce(self, request, context):
        n = self._count("GenerateOnce")
        if n <= len(self.refusals):
            self._refuse(n, context)
        return self._completed(request)

    def Generate(self, request_iterator, context):
        req = next(request_iterator).start
        n = self._count("Generate")
        if n <= len(self.refusals):
            if self.refusals[n - 1][2]:
                yield pb.ServerMessage(queued=pb.Queued(position=2))
            self._refuse(n, context)
        yield pb.ServerMessage(accepted=pb.Accepted(
            request_id="r1", model="m", seed=req.seed, timesteps=[float(999 - 100 * i) for i in range(self.steps)],
            callback_tensor_inputs=["latents"], width=8, height=8, guidance_scale=7.5))
        cb = req.callback if req.HasField("callback") else None
        for i in range(self.steps):
            if self.fail_after_steps is not None and i == self.fail_after_steps:
                context.abort(UNAVAILABLE, "replica went away")
            if cb is not None:
                reply = not cb.observe_only
                yield pb.ServerMessage(step_end=pb.StepEnd(step_index=i, timestep=999 - 100 * i,
                                                           num_timesteps=self.steps, guidance_scale=7.5,
                                                           reply_required=reply))
                if reply:
                    msg = next(request_iterator)
                    assert msg.reply.step_index == i
        yield pb.ServerMessage(completed=self._completed(req))
        for _ in request_iterator:  # the client half-closes after Completed
            pass


@pytest.fixture
def serve():
    servers: List[grpc.Server] = []

    def start(servicer: Flaky) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        rpc.add_DiffusionServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop(None)


def policy(sleeps: list, **kw) -> RetryPolicy:
    """The default policy without jitter, recording its waits."""
    kw.setdefault("jitter", 0.0)
    return RetryPolicy(sleep=sleeps.append, **kw)


def callback(pipe, i, t, kwargs):
    return kwargs


#: The three ways a call starts a generation: a steering callback, observe-only, GenerateOnce.
PATHS = ("callback", "observe", "once")


def run(pipe: RemotePipeline, path: str, **kw):
    if path == "callback":
        return pipe("p", callback_on_step_end=callback, seed=7, **kw)
    if path == "observe":
        return pipe("p", callback_on_step_end=callback, observe_only=True, seed=7, **kw)
    pipe.set_progress_bar_config(disable=True)  # without a bar, a call without callback is GenerateOnce
    return pipe("p", seed=7, **kw)


def attempts(fake: Flaky, path: str) -> int:
    return fake.attempts["GenerateOnce" if path == "once" else "Generate"]


@pytest.mark.parametrize("path", PATHS)
def test_unavailable_before_accepted_is_retried_with_exponential_backoff(serve, path):
    fake = Flaky([(UNAVAILABLE, None, False)] * 3)
    sleeps: list = []
    out = run(RemotePipeline(serve(fake), retry=policy(sleeps)), path)
    assert out.images[0].size == (8, 8) and out.seed == 7
    assert attempts(fake, path) == 4
    assert sleeps == pytest.approx([0.05, 0.1, 0.2])


@pytest.mark.parametrize("path", PATHS)
def test_pushback_is_waited_exactly_then_backoff_starts_again(serve, path):
    fake = Flaky([(EXHAUSTED, "700", False), (UNAVAILABLE, None, False), (EXHAUSTED, "0", False),
                  (UNAVAILABLE, None, False)])
    sleeps: list = []
    out = run(RemotePipeline(serve(fake), retry=policy(sleeps)), path)
    assert out.images and attempts(fake, path) == 5
    assert sleeps == pytest.approx([0.7, 0.05, 0.0, 0.05])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("push", ["-1", "soon", ""])
def test_negative_or_unparsable_pushback_is_not_retried(serve, path, push):
    fake = Flaky([(EXHAUSTED, push, False)])
    sleeps: list = []
    with pytest.raises(QueueFullError) as e:
        run(RemotePipeline(serve(fake), retry=policy(sleeps)), path)
    assert attempts(fake, path) == 1 and sleeps == []
    assert e.value.attempts == 1 and "says not to" in str(e.value)


def test_a_queued_event_before_the_refusal_still_retries(serve):
    fake = Flaky([(UNAVAILABLE, None, True), (EXHAUSTED, "300", True)])
    sleeps: list = []
    out = run(RemotePipeline(serve(fake), retry=policy(sleeps)), "callback")
    assert out.images and fake.attempts["Generate"] == 3
    assert sleeps == pytest.approx([0.05, 0.3])


@pytest.mark.parametrize("path", PATHS)
def test_exhausting_the_attempts_raises_the_last_error_with_the_count(serve, path):
    fake = Flaky([(UNAVAILABLE, None, False)] * 4 + [(EXHAUSTED, None, False)] * 3)
    sleeps: list = []
    with pytest.raises(QueueFullError) as e:
        run(RemotePipeline(serve(fake), retry=policy(sleeps, max_backoff=0.15)), path)
    assert attempts(fake, path) == 5
    assert sleeps == pytest.approx([0.05, 0.1, 0.15, 0.15])  # capped at max_backoff
    err = e.value
    assert err.code == EXHAUSTED and err.attempts == 5 and err.steps_completed in (0, None)
    assert str(err) == "RESOURCE_EXHAUSTED: replica draining (gave up after 5 attempts)"


@pytest.mark.parametrize("path", ("callback", "observe"))
def test_a_failure_after_accepted_is_raised_once_with_the_steps_run(serve, path):
    fake = Flaky(steps=10, fail_after_steps=2)
    sleeps: list = []
    with pytest.raises(ServerUnavailableError) as e:
        run(RemotePipeline(serve(fake), retry=policy(sleeps)), path)
    assert fake.attempts["Generate"] == 1 and sleeps == []
    err = e.value
    assert err.steps_completed == 2 and err.num_steps == 10 and err.attempts == 1
    assert str(err) == "failed after 2 of 10 steps: UNAVAILABLE: replica went away"


def test_a_failure_after_accepted_that_followed_refusals_is_not_retried_either(serve):
    fake = Flaky([(UNAVAILABLE, None, False)], steps=10, fail_after_steps=3)
    sleeps: list = []
    with pytest.raises(ServerUnavailableError) as e:
        run(RemotePipeline(serve(fake), retry=policy(sleeps)), "callback")
    assert fake.attempts["Generate"] == 2 and sleeps == pytest.approx([0.05])
    assert e.value.steps_completed == 3 and e.value.attempts == 2
    assert str(e.value) == "failed after 3 of 10 steps: UNAVAILABLE: replica went away (after 2 attempts)"


@pytest.mark.parametrize("path", PATHS)
def test_invalid_argument_is_never_retried(serve, path):
    fake = Flaky([(grpc.StatusCode.INVALID_ARGUMENT, None, False)] * 3, code_details="invalid `start.width`: 7")
    sleeps: list = []
    with pytest.raises(InvalidRequestError) as e:
        run(RemotePipeline(serve(fake), retry=policy(sleeps)), path)
    assert attempts(fake, path) == 1 and sleeps == []
    assert e.value.field == "start.width" and str(e.value) == "INVALID_ARGUMENT: invalid `start.width`: 7"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("off", [None, RetryPolicy(max_attempts=1)])
def test_retry_can_be_turned_off(serve, path, off):
    fake = Flaky([(UNAVAILABLE, None, False)])
    with pytest.raises(ServerUnavailableError) as e:
        run(RemotePipeline(serve(fake), retry=off), path)
    assert attempts(fake, path) == 1 and e.value.attempts == 1
    assert str(e.value) == "UNAVAILABLE: replica draining"


@pytest.mark.parametrize("path", PATHS)
def test_the_calls_timeout_bounds_the_waits(serve, path):
    fake = Flaky([(EXHAUSTED, "5000", False)])
    sleeps: list = []
    with pytest.raises(QueueFullError) as e:
        run(RemotePipeline(serve(fake), retry=policy(sleeps)), path, timeout=2.0)
    assert attempts(fake, path) == 1 and sleeps == []
    assert "would pass the call's timeout" in str(e.value)
    # Within the timeout, the same pushback is waited.
    fake = Flaky([(EXHAUSTED, "500", False)])
    out = run(RemotePipeline(serve(fake), retry=policy(sleeps)), path, timeout=30.0)
    assert out.images and attempts(fake, path) == 2 and sleeps == pytest.approx([0.5])


def test_the_default_policy_and_its_jitter():
    p = RetryPolicy()
    assert (p.max_attempts, p.initial_backoff, p.max_backoff, p.multiplier) == (5, 0.05, 2.0, 2.0)
    assert [p.backoff(n) for n in range(1, 8)] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0])
    for n in range(1, 10):
        d = p.delay(n)
        assert (1 - p.jitter) * p.backoff(n) <= d <= p.backoff(n)
    half = RetryPolicy(jitter=0.5, random=lambda: 0.5)
    assert half.delay(1) == pytest.approx(0.05 * 0.75)
    for bad in (dict(max_attempts=0), dict(max_attempts=1.5), dict(multiplier=0.5), dict(jitter=2),
                dict(initial_backoff=-1)):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)
    with pytest.raises(TypeError):
        RemotePipeline("127.0.0.1:1", retry=3)


def test_jittered_waits_are_what_the_policy_drew(serve):
    fake = Flaky([(UNAVAILABLE, None, False)] * 2)
    sleeps: list = []
    out = run(RemotePipeline(serve(fake), retry=RetryPolicy(sleep=sleeps.append, random=lambda: 1.0)), "callback")
    assert out.images and sleeps == pytest.approx([0.05 * 0.8, 0.1 * 0.8])


def test_each_retry_is_logged_at_debug(serve, caplog):
    fake = Flaky([(UNAVAILABLE, None, False), (EXHAUSTED, "700", False)])
    with caplog.at_level(logging.DEBUG, logger="stepstream.retry"):
        run(RemotePipeline(serve(fake), retry=policy([])), "callback")
    records = [r for r in caplog.records if r.name == "stepstream.retry"]
    assert len(records) == 2 and all(r.levelno == logging.DEBUG for r in records)
    assert "attempt 1 of 5" in records[0].getMessage() and "UNAVAILABLE" in records[0].getMessage()
    assert "grpc-retry-pushback-ms=700" in records[1].getMessage()


def test_an_unreachable_server_is_retried_then_raised():
    sleeps: list = []
    pipe = RemotePipeline("127.0.0.1:1", retry=policy(sleeps, max_attempts=3))
    with pytest.raises(ServerUnavailableError) as e:
        run(pipe, "callback", timeout=20)
    assert e.value.attempts == 3 and sleeps == pytest.approx([0.05, 0.1])


def test_pushback_parsing_and_what_counts_as_retryable():
    key = "grpc-retry-pushback-ms"
    assert pushback_ms(((key, "700"),)) == 700
    assert pushback_ms(((key, b" 0 "),)) == 0
    assert pushback_ms(((key, "-5"),)) == -1 and pushback_ms(((key, "1.5"),)) == -1
    assert pushback_ms((("other", "1"),)) is None and pushback_ms(None) is None

    def refused(code, details="x"):
        err = errors._BY_CODE.get(code, StatusError)(code, details)
        err._before_admission = True
        return err

    assert retryable(refused(UNAVAILABLE)) and retryable(refused(EXHAUSTED))
    assert not retryable(refused(grpc.StatusCode.INTERNAL))
    assert not retryable(refused(grpc.StatusCode.DEADLINE_EXCEEDED))
    # The client's own message-size limit: trying again cannot help.
    assert not retryable(refused(EXHAUSTED, "Received message larger than max (300 vs. 100)"))
    assert not retryable(ServerUnavailableError(UNAVAILABLE, "x"))  # not known to be before admission
    assert isinstance(refused(grpc.StatusCode.DEADLINE_EXCEEDED), DeadlineExceededError)
