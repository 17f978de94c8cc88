"""atheris (libFuzzer for Python) over the raw request bytes the router and the pod parse.

Each input goes through tests/fuzz/targets.everything: the router's ModelInfer wire check and
model id (router/wire.py, router/modelid.py), its ModelReady/ModelMetadata parse (router/v2.py),
and the pod's tolerant deserializer (the pod's own mesh.pb.inference classes) and codec decode
(puller/codec.py). Any exception other than a refusal with InvalidArgument, a message that is
too long or names a path, or the router and the pod disagreeing on the model is a crash.

    python -m bench.fuzz.atheris_target --make-corpus /tmp/fuzz-corpus       # seed inputs
    python -m bench.fuzz.atheris_target /tmp/fuzz-corpus -max_total_time=1800 -rss_limit_mb=1024 \\
        -max_len=4096 -print_final_stats=1

libFuzzer's own flags follow; it prints "Done N runs in S second(s)" and the peak RSS at the
end. docs/SECURITY.md ("Fuzzing") has the figures of the last long run.
"""

from __future__ import annotations

import pathlib
import sys
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def make_corpus(folder: pathlib.Path, count: int = 300) -> None:
    """Seed inputs: valid-ish requests from the Hypothesis strategies, so mutation starts
    from the structure of real traffic rather than from nothing."""
    from hypothesis.errors import NonInteractiveExampleWarning

    from mesh.pb.inference import grpc_predict_v2_pb2 as pb
    from tests.fuzz import strategies

    folder.mkdir(parents=True, exist_ok=True)
    strategy = strategies.infer_request(pb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonInteractiveExampleWarning)
        for i in range(count):
            (folder / f"seed-{i:04d}").write_bytes(strategy.example())


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "--make-corpus":
        make_corpus(pathlib.Path(sys.argv[2]))
        return
    import atheris

    with atheris.instrument_imports(include=["router", "puller", "mesh.errors", "mesh.rpc", "tests.fuzz"]):
        from mesh.pb.inference import grpc_predict_v2_pb2 as pb
        from tests.fuzz import targets

    def one_input(data: bytes) -> None:
        targets.everything(data, pb)

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
