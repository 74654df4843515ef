"""Turn classifier-free guidance off after 40% of the steps, from Python, over stepstream's
Generate stream: the remote form of diffusers' SDCFGCutoffCallback (correct at any batch size).

    python -m grpc_tools.protoc -I ../../proto --python_out=. --grpc_python_out=. \
        ../../proto/stepstream/v1/stepstream.proto
    python cfg_cutoff.py 127.0.0.1:50051 out.png
"""
import queue
import sys

import grpc

from stepstream.v1 import stepstream_pb2 as pb
from stepstream.v1 import stepstream_pb2_grpc as rpc


def main(addr: str, out: str, ratio: float = 0.4) -> None:
    outbox: "queue.Queue[pb.ClientMessage | None]" = queue.Queue()
    outbox.put(pb.ClientMessage(start=pb.GenerateRequest(
        prompt="a photo of an astronaut riding a horse on mars",
        num_inference_steps=10,
        seed=1,
        callback=pb.CallbackOptions(tensor_inputs=["prompt_embeds"]),
    )))

    def requests():
        # The request stream stays open until the generation completes: closing it cancels.
        while (msg := outbox.get()) is not None:
            yield msg

    stub = rpc.DiffusionStub(grpc.insecure_channel(addr))
    cutoff = None
    for msg in stub.Generate(requests()):
        kind = msg.WhichOneof("kind")
        if kind == "accepted":
            cutoff = int(len(msg.accepted.timesteps) * ratio)
        elif kind == "step_end":
            step = msg.step_end
            reply = pb.StepReply(step_index=step.step_index)
            if step.step_index == cutoff and step.do_classifier_free_guidance:
                pe = step.tensors["prompt_embeds"]  # [negative; positive], f32 bytes
                half = len(pe.data) // 2
                reply.guidance_scale = 0.0
                reply.tensors["prompt_embeds"].CopyFrom(pb.Tensor(
                    dtype=pe.dtype, shape=[pe.shape[0] // 2, *pe.shape[1:]], data=pe.data[half:]))
            outbox.put(pb.ClientMessage(reply=reply))
            print(f"step {step.step_index}: t={step.timestep:g} cfg={step.do_classifier_free_guidance}")
        elif kind == "reply_rejected":
            raise RuntimeError(f"{msg.reply_rejected.field}: {msg.reply_rejected.reason}")
        elif kind == "completed":
            outbox.put(None)
            with open(out, "wb") as f:
                f.write(msg.completed.images[0].data)
            print(f"wrote {out}; seed {msg.completed.seed}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051",
         sys.argv[2] if len(sys.argv) > 2 else "out.png")
