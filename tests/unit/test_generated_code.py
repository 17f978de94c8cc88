"""The committed generated code under mesh/pb/ matches proto/, and the V2 protocol keeps the
standard message and field numbers that tritonclient relies on."""

from __future__ import annotations

import filecmp
import pathlib
import subprocess
import sys

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path: pathlib.Path) -> None:
    """Fails when someone edited proto/ without running `make proto` (tools/genproto.py)."""
    subprocess.run([sys.executable, str(ROOT / "tools" / "genproto.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    fresh = sorted(p.relative_to(tmp_path) for p in (tmp_path / "mesh" / "pb").rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(ROOT) for p in (ROOT / "mesh" / "pb").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert fresh == committed, "generated file set differs: run `make proto`"
    stale = [str(rel) for rel in fresh if not filecmp.cmp(tmp_path / rel, ROOT / rel, shallow=False)]
    assert not stale, f"stale generated code (run `make proto`): {stale}"


def _descriptor_set(tmp_path: pathlib.Path) -> descriptor_pb2.FileDescriptorSet:
    # Built with protoc rather than imported: our `inference` package and tritonclient's
    # cannot live in one descriptor pool.
    out = tmp_path / "v2.pb"
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--descriptor_set_out={out}",
                      "mesh/pb/inference/grpc_predict_v2.proto"])
    assert rc == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _fields(message: descriptor_pb2.DescriptorProto, prefix: str = "") -> dict[str, tuple[int, int]]:
    out = {f"{prefix}{message.name}.{f.name}": (f.number, f.type) for f in message.field}
    for nested in message.nested_type:
        if not nested.options.map_entry:
            out.update(_fields(nested, f"{prefix}{message.name}."))
    return out


def test_v2_protocol_matches_tritonclient(tmp_path: pathlib.Path) -> None:
    from tritonclient.grpc import service_pb2

    ours = _descriptor_set(tmp_path).file[0]
    assert ours.package == "inference"
    theirs = descriptor_pb2.FileDescriptorProto()
    service_pb2.DESCRIPTOR.CopyToProto(theirs)
    their_messages = {m.name: m for m in theirs.message_type}
    for message in ours.message_type:
        assert message.name in their_messages, message.name
        assert _fields(message) == _fields(their_messages[message.name]), message.name
    # The extension RPCs' messages are in package mesh.inference (proto/.../extensions.proto
    # says why); package names never reach the wire, so they compare by their Triton names.
    def triton(name: str) -> str:
        return name.replace(".mesh.inference.", ".inference.")

    ours_service = {m.name: (triton(m.input_type), triton(m.output_type), m.client_streaming, m.server_streaming)
                    for m in ours.service[0].method}
    their_service = {m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
                     for m in theirs.service[0].method}
    assert ours.service[0].name == theirs.service[0].name == "GRPCInferenceService"
    for name, signature in ours_service.items():
        assert their_service[name] == signature, name
    assert {"ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata",
            "ModelInfer", "ModelStreamInfer"} <= ours_service.keys()
