"""The size prior for models never measured (placement/prior.py): (artifact + a session's
overhead) x a learned ratio per kind of pod, conservative until enough models are measured; a default when the artifact size is
unknown too; never 0."""

from __future__ import annotations

from mesh import types
from mesh.settings import PlacementSettings
from placement.prior import DEFAULT_OVERHEAD, Prior
from tests.unit.placement.fakes import World


def world_with(samples: list[tuple[str, int, int, str]]) -> World:
    """samples: (model, artifact bytes, measured footprint, pod)."""
    w = World()
    w.put(w.keys.instance("cpu-pod"), types.InstanceRecord("cpu-pod", "x", 1 << 30, device="cpu"))
    w.put(w.keys.instance("gpu-pod"), types.InstanceRecord("gpu-pod", "x", 1 << 30, device="cuda"))
    for model_id, artifact, size, pod in samples:
        w.put(w.keys.model(model_id), types.ModelSpec(model_id, "file:///m", artifact_bytes=artifact))
        w.loaded(model_id, pod, size)
    return w


async def test_measured_models_are_booked_at_their_measurement() -> None:
    w = world_with([])
    w.model("m", size=1234)
    size = Prior(w.state, PlacementSettings()).size("m")
    assert (size.bytes, size.is_prior, size.how) == (1234, False, "measured")


async def test_the_default_ratio_holds_until_enough_models_are_measured() -> None:
    w = world_with([("s1", 100, 150, "cpu-pod")])
    w.put(w.keys.model("new"), types.ModelSpec("new", "file:///m", artifact_bytes=1000))
    size = Prior(w.state, PlacementSettings(prior_ratio=3.0, prior_min_samples=3)).size("new")
    assert size.bytes == (1000 + 50) * 3 and size.is_prior  # overhead: 150 measured - 100 artifact
    assert "MESH_PLACEMENT_PRIOR_RATIO: 1 of 3 models measured on cpu pods" in size.how


async def test_the_learned_ratio_is_a_high_percentile_per_kind_of_pod() -> None:
    samples = [(f"c{i}", 100, 100 + 10 * i, "cpu-pod") for i in range(10)]  # ratios 1.0 .. 1.9
    w = world_with(samples)
    w.put(w.keys.model("new"), types.ModelSpec("new", "file:///m", artifact_bytes=1000))
    prior = Prior(w.state, PlacementSettings(prior_ratio=3.0, prior_percentile=0.9))
    size = prior.size("new", {"cpu"})
    assert size.bytes == 1800 and "p90 of 10 models measured on cpu pods" in size.how
    # Nothing measured on GPU pods yet: the default ratio there; a mixed fleet books the larger.
    gpu_default = (1000 + DEFAULT_OVERHEAD) * 3  # nothing measured on GPU pods: default overhead too
    assert prior.size("new", {"cuda"}).bytes == gpu_default
    assert prior.size("new", {"cpu", "cuda"}).bytes == gpu_default
    # A ratio below 1 (smaller in memory than on disk) is never trusted.
    w2 = world_with([(f"c{i}", 1000, 500, "cpu-pod") for i in range(5)])
    w2.put(w2.keys.model("new"), types.ModelSpec("new", "file:///m", artifact_bytes=1000))
    assert Prior(w2.state, PlacementSettings()).size("new").bytes == 1000


async def test_the_pulled_artifact_size_counts_too_and_unknown_is_never_zero() -> None:
    w = world_with([])
    w.put(w.keys.model("pulled"), types.ModelSpec("pulled", "https://x/m.onnx"))
    w.put(w.keys.stats("pulled"), types.ModelStats("pulled", artifact_bytes=500))
    w.put(w.keys.model("unknown"), types.ModelSpec("unknown", "https://x/u.onnx"))
    prior = Prior(w.state, PlacementSettings(prior_ratio=2.0, default_model_bytes=4096))
    assert prior.size("pulled").bytes == (500 + DEFAULT_OVERHEAD) * 2
    unknown = prior.size("unknown")
    assert unknown.bytes == 4096 and "artifact size unknown" in unknown.how
    assert PlacementSettings().default_model_bytes > 0


async def test_unknown_artifacts_follow_the_footprints_measured_when_larger() -> None:
    w = world_with([(f"big{i}", 0, 10_000 * (i + 1), "cpu-pod") for i in range(5)])
    w.put(w.keys.model("unknown"), types.ModelSpec("unknown", "https://x/u.onnx"))
    size = Prior(w.state, PlacementSettings(default_model_bytes=100, prior_min_samples=3)).size("unknown")
    assert size.bytes == 50_000 and "footprints measured on cpu pods" in size.how


async def test_a_tiny_model_does_not_inflate_the_ratio() -> None:
    """Regression (fault suite F19): footprint / artifact of a 200-byte model is ~1,400 (its
    session costs ~0.28 MB whatever its weights), and the p90 of plain ratios then booked a 3 MB
    model at ~4 GB, the whole pod, so every load evicted everything. The session's overhead is
    now learned apart and the ratio taken over artifact + overhead."""
    w = world_with([("tiny", 200, 280_000, "cpu-pod"), ("m1", 3_000_000, 3_300_000, "cpu-pod"),
                    ("m2", 1_000_000, 1_300_000, "cpu-pod")])
    w.put(w.keys.model("new"), types.ModelSpec("new", "file:///m", artifact_bytes=3_000_000))
    size = Prior(w.state, PlacementSettings(prior_min_samples=3)).size("new")
    assert 3_000_000 < size.bytes < 1.2 * 3_300_000, size
