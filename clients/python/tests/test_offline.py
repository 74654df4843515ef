"""Parts that need no stepstream server: callback helpers, tensors, the token and TLS on the
channel (against a small Python gRPC server that records what it receives)."""

import shutil
import subprocess
from concurrent import futures
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from stepstream import (
    MultiPipelineCallbacks,
    RemotePipeline,
    SDCFGCutoffCallback,
    SDXLCFGCutoffCallback,
    TensorArray,
)
from stepstream import tensors as T
from stepstream.pipeline import map_scheduler, scheduler_settings
from stepstream.v1 import stepstream_pb2 as pb
from stepstream.v1 import stepstream_pb2_grpc as rpc


def fake_pipe(n=10, g=7.5):
    return SimpleNamespace(num_timesteps=n, _guidance_scale=g, do_classifier_free_guidance=g > 1)


def test_cutoff_helpers_keep_the_conditional_half_at_any_batch():
    cb = SDCFGCutoffCallback(cutoff_step_ratio=0.4)
    assert cb.tensor_inputs == ["prompt_embeds"]
    assert cb.step_indices(10) == {4} and cb.step_indices(100) == {40}
    pe = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)  # [neg, neg, pos, pos]
    p = fake_pipe()
    kw = cb(p, 3, 0, {"prompt_embeds": pe})
    assert kw["prompt_embeds"] is pe and p._guidance_scale == 7.5
    kw = cb(p, 4, 0, {"prompt_embeds": pe})
    np.testing.assert_array_equal(kw["prompt_embeds"], pe[2:])
    assert p._guidance_scale == 0.0
    # CFG already off: nothing to halve.
    p = fake_pipe(g=1.0)
    kw = cb(p, 4, 0, {"prompt_embeds": pe[2:]})
    assert kw["prompt_embeds"].shape[0] == 2

    xl = SDXLCFGCutoffCallback(cutoff_step_index=2)
    p = fake_pipe()
    kw = {"prompt_embeds": pe, "add_text_embeds": np.zeros((4, 5)), "add_time_ids": np.ones((4, 6))}
    kw = xl(p, 2, 0, kw)
    assert [kw[n].shape[0] for n in xl.tensor_inputs] == [2, 2, 2]
    assert xl.step_indices(50) == {2}


def test_pipeline_callback_arguments_as_in_diffusers():
    with pytest.raises(ValueError):
        SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=None)
    with pytest.raises(ValueError):
        SDCFGCutoffCallback(cutoff_step_ratio=0.4, cutoff_step_index=3)
    with pytest.raises(ValueError):
        SDCFGCutoffCallback(cutoff_step_ratio=1.5)
    assert SDCFGCutoffCallback(cutoff_step_ratio=0.29).step_indices(100) == {28}  # int(28.999...)


def test_multi_pipeline_callbacks_chain_and_union():
    order = []

    def plain(p, i, t, kw):
        order.append("plain")
        return kw

    a = SDCFGCutoffCallback(cutoff_step_index=1)
    b = SDXLCFGCutoffCallback(cutoff_step_index=3)
    m = MultiPipelineCallbacks([a, b])
    assert m.tensor_inputs == ["prompt_embeds", "add_text_embeds", "add_time_ids"]
    assert m.step_indices(10) == {1, 3}
    assert MultiPipelineCallbacks([a, plain]).step_indices(10) is None
    kw = MultiPipelineCallbacks([plain, plain])(fake_pipe(), 0, 0, {"x": 1})
    assert kw == {"x": 1} and order == ["plain", "plain"]


def test_tensor_array_chunk_follows_torch():
    a = np.arange(10).view(TensorArray)
    assert [len(c) for c in a.chunk(3)] == [4, 4, 2]  # torch.chunk, not numpy.array_split
    assert [len(c) for c in a.chunk(2)] == [5, 5]
    m = np.arange(12).reshape(2, 6).view(TensorArray)
    assert [c.shape for c in m.chunk(4, dim=1)] == [(2, 2)] * 3
    c = m.clone()
    c[0, 0] = 99
    assert m[0, 0] == 0 and m.dim() == 2 and type(m.numpy()) is np.ndarray


def test_wire_round_trips():
    x = np.array([[1.5, -2.0], [0.25, 3.0]], dtype=np.float32)
    for dt, np_dt in ((pb.DTYPE_F32, np.float32), (pb.DTYPE_F16, np.float16), (pb.DTYPE_BF16, np.float32)):
        w = T.encode(x, dt)
        assert list(w.shape) == [2, 2] and w.dtype == dt
        back = T.decode(w, "numpy")
        assert back.dtype == np_dt
        np.testing.assert_array_equal(back.astype(np.float32), x)
        assert T.same(T.encode(back, dt), w)
    # bf16 rounds to nearest even
    w = T.encode(np.array([1.00390625], dtype=np.float32), pb.DTYPE_BF16)
    assert T.decode(w, "numpy")[0] == 1.0


class Recording(rpc.DiffusionServicer):
    def __init__(self):
        self.metadata = []

    def ListModels(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        return pb.ListModelsResponse(default_model="m", models=[pb.ModelInfo(id="m", default_steps=3)])


def serve(creds=None):
    rec = Recording()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rpc.add_DiffusionServicer_to_server(rec, server)
    port = server.add_secure_port("127.0.0.1:0", creds) if creds else server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, rec, port


def test_the_token_travels_as_a_bearer_header():
    server, rec, port = serve()
    try:
        pipe = RemotePipeline(f"127.0.0.1:{port}", token="s3cret")
        assert pipe.list_models().default_model == "m"
        assert pipe.model_info.default_steps == 3
        assert rec.metadata[0]["authorization"] == "Bearer s3cret"
        RemotePipeline(f"http://127.0.0.1:{port}").list_models()
        assert "authorization" not in rec.metadata[1]
    finally:
        server.stop(None)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_with_given_root_certificates(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    server, rec, port = serve(creds)
    try:
        pipe = RemotePipeline(f"localhost:{port}", token="t", tls=str(cert))
        assert pipe.list_models().default_model == "m"
        assert rec.metadata[0]["authorization"] == "Bearer t"
        from stepstream import ServerUnavailableError

        with pytest.raises(ServerUnavailableError):  # plaintext to a TLS port
            RemotePipeline(f"localhost:{port}").list_models(timeout=5)
    finally:
        server.stop(None)


# ---- scheduler objects → names, against a hand-made ListModels answer ----------------------------
# (Stand-ins for diffusers schedulers: a class name and a `config` dict, which is all the client
# reads; diffusers itself is not installed for the tests.)


def infos(*entries):
    return [pb.SchedulerInfo(name=n, diffusers_class=c, config_json=__import__("json").dumps(cfg))
            for n, c, cfg in entries]


class FancyScheduler:
    def __init__(self, **config):
        self.config = config


def test_the_first_name_that_agrees_on_every_set_key_wins():
    table = infos(
        ("a", "FancyScheduler", {"x": 1, "y": "u"}),
        ("b", "FancyScheduler", {"x": 2, "y": "u"}),
        ("c", "FancyScheduler", {"x": 2, "y": "v"}),
        ("o", "OtherScheduler", {"x": 3}),
    )
    assert map_scheduler(FancyScheduler(), table) == "a"  # sets nothing
    assert map_scheduler(FancyScheduler(x=2), table) == "b"
    assert map_scheduler(FancyScheduler(x=2, y="v"), table) == "c"
    assert map_scheduler(FancyScheduler(y="v", zz=9), table) == "c"  # keys no name lists are not compared
    assert map_scheduler(FancyScheduler, table) == "a"  # a class sets nothing
    # diffusers' record of the arguments left at their defaults: those are not settings.
    assert map_scheduler(FancyScheduler(x=1, y="v", _use_default_values=["x"]), table) == "c"


def test_what_cannot_be_honoured_is_named_with_what_is_offered():
    table = infos(("a", "FancyScheduler", {"x": 1, "y": "u"}), ("b", "FancyScheduler", {"x": 2, "y": "v"}))
    with pytest.raises(ValueError) as e:
        map_scheduler(FancyScheduler(y="w", x=7), table, "m")
    msg = str(e.value)
    assert msg.startswith("FancyScheduler(y='w') cannot be honoured by the server on model `m`"), msg
    assert "`a` has y='u'; `b` has y='v'" in msg
    # Each value alone is offered, but not together.
    with pytest.raises(ValueError, match=r"FancyScheduler\(x=1, y='v'\).*no name has these settings together"):
        map_scheduler(FancyScheduler(x=1, y="v"), table)
    with pytest.raises(ValueError, match="no scheduler for OtherScheduler.*offers FancyScheduler"):
        map_scheduler(type("OtherScheduler", (), {"config": {}})(), table)


def test_values_compare_as_diffusers_holds_them():
    table = infos(("a", "FancyScheduler", {"f": 0.00085, "n": 2, "b": False, "inf": "-inf", "l": [0.1, 0.2],
                                           "z": None}))
    ok = FancyScheduler(f=np.float64(0.00085), n=np.int64(2), b=np.bool_(False), inf=-float("inf"),
                        l=np.array([0.1, 0.2]), z=None)
    assert map_scheduler(ok, table) == "a"
    for bad in (dict(b=0), dict(n=True), dict(inf=-5.0), dict(l=[0.1]), dict(z=0.0), dict(f=0.0009)):
        with pytest.raises(ValueError):
            map_scheduler(FancyScheduler(**bad), table)
    assert scheduler_settings(FancyScheduler(a=1, _class_name="X", b=2, _use_default_values=["b"])) == {"a": 1}
