"""Build hook: compiles the project's wire contract into gRPC stubs before packaging.

The stubs (`stepstream/v1/stepstream_pb2.py`, `stepstream_pb2_grpc.py`, `.pyi`) are generated
with grpcio-tools from `stepstream/v1/stepstream.proto`, found in this order:

1. `$STEPSTREAM_PROTO_DIR` (a folder holding `stepstream/v1/stepstream.proto`);
2. `./proto` (where an sdist of this package carries its copy);
3. `../../proto` (the repository's own, for `pip install ./clients/python`).

The runtime requirements are pinned to the versions the stubs were generated for: protobuf's
generated code refuses an older runtime, and grpcio's refuses an older grpcio.
"""

import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PROTO = Path("stepstream") / "v1" / "stepstream.proto"


def proto_root() -> Path:
    candidates = []
    env = os.environ.get("STEPSTREAM_PROTO_DIR")
    if env:
        candidates.append(Path(env))
    candidates += [HERE / "proto", HERE.parent.parent / "proto"]
    for root in candidates:
        if (root / PROTO).is_file():
            return root
    tried = "\n".join(f"  {c / PROTO}" for c in candidates)
    sys.exit(
        "stepstream: cannot find the wire contract to generate the gRPC stubs from. Tried:\n"
        f"{tried}\n"
        "Install from a checkout of the repository (pip install ./clients/python), or set "
        "STEPSTREAM_PROTO_DIR to the repository's proto/ folder."
    )


def generate_stubs() -> Path:
    root = proto_root()
    try:
        from grpc_tools import protoc
    except ImportError:
        sys.exit(
            "stepstream: grpcio-tools is needed to build this package (it is a build requirement "
            "in pyproject.toml; with --no-build-isolation install it first: pip install grpcio-tools)"
        )
    try:
        from importlib.resources import files

        wkt = str(files("grpc_tools") / "_proto")
    except Exception:  # pragma: no cover - very old Pythons
        wkt = str(Path(protoc.__file__).parent / "_proto")
    out = HERE
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{wkt}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(root / PROTO),
    ]
    if protoc.main(args) != 0:
        sys.exit(f"stepstream: grpc_tools.protoc failed on {root / PROTO}")
    return root


def pinned_requirements() -> list:
    pb2 = (HERE / "stepstream" / "v1" / "stepstream_pb2.py").read_text()
    grpc = (HERE / "stepstream" / "v1" / "stepstream_pb2_grpc.py").read_text()
    reqs = ["numpy>=1.21", "pillow>=8"]
    m = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+)",
        pb2,
    )
    if m:
        major, minor, patch = (int(x) for x in m.groups())
        reqs.append(f"protobuf>={major}.{minor}.{patch},<{major + 1}")
    else:
        reqs.append("protobuf")
    m = re.search(r"GRPC_GENERATED_VERSION\s*=\s*'([0-9.]+)'", grpc)
    reqs.append(f"grpcio>={m.group(1)}" if m else "grpcio")
    return reqs


class SdistWithProto(sdist):
    """Carries the proto inside the sdist, so a wheel built from it finds the contract."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        dest = Path(base_dir) / "proto" / PROTO
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(proto_root() / PROTO, dest)


generate_stubs()
setup(install_requires=pinned_requirements(), cmdclass={"sdist": SdistWithProto})
