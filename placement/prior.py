"""Placement's size for a model: its measured footprint, else a PRIOR — never 0.

A model measured before (ModelStats.size_bytes) is booked at that size. One never measured is
booked at its artifact's size (ModelSpec.artifact_bytes, filled at registration when known, or
ModelStats.artifact_bytes, written by a pod after a pull) plus a per-session overhead, times a
footprint ratio learned from the models already measured on that kind of pod
(InstanceRecord.device): ratio = measured footprint / (artifact bytes + overhead) over the
LOADED copies on live pods of that kind. The overhead is the smallest excess of a footprint over
its artifact measured on that kind (what a session costs on top of its weights;
DEFAULT_OVERHEAD before any is measured): a session costs a fixed few hundred KiB, so footprint
/ artifact alone is ~1,000 for a 200-byte model and would book every later model at a thousand
times its size. Taken
conservatively: the `prior_percentile` (a high one) of those ratios, never below 1, and while
fewer than `prior_min_samples` models are measured on that kind, the larger of that and
`prior_ratio`. A model whose artifact size is unknown too gets `default_model_bytes`, or the
same percentile of the footprints measured on that kind when that is larger.

Pure bookkeeping over MeshState, kept current by its change hook: per kind of pod the sorted
footprints, excesses (whose smallest is the overhead) and ratios are updated per change by
bisection, so a size costs O(log n) and a new measurement O(n) at worst in list moves (never a
scan or a sort of every copy per miss); only a change of the overhead re-sorts the ratios.
"""

from __future__ import annotations

import bisect
import dataclasses
import math

from mesh.kv import keys as k
from mesh.settings import PlacementSettings
from mesh.state import MeshState
from mesh.types import CopyState
from mesh.units import format_bytes

DEFAULT_OVERHEAD = 1 << 20  # a session's fixed cost assumed before any model is measured


@dataclasses.dataclass(frozen=True)
class Size:
    """The bytes placement books for a model, and how they were arrived at."""

    bytes: int
    how: str  # for decisions' reasons: "measured", "prior: artifact 1 MiB x 2.5 (...)"
    is_prior: bool = True


class Prior:
    def __init__(self, state: MeshState, settings: PlacementSettings) -> None:
        self.state = state
        self.settings = settings
        # (model, instance) -> (device kind, footprint bytes, artifact bytes) of a measured copy
        self._samples: dict[tuple[str, str], tuple[str, int, int]] = {}
        self._sizes: dict[str, list[int]] = {}  # kind -> sorted footprints
        self._excess: dict[str, list[int]] = {}  # kind -> sorted footprint - artifact (artifact known)
        self._ratios: dict[str, tuple[int, list[float]]] = {}  # kind -> (overhead used, sorted ratios)
        self._devices = {i: inst.device for i, inst in state.instances.items()}
        state.on_change(self._on_change)
        for model_id, copies in state.copies.items():
            for instance_id in copies:
                self._resample(model_id, instance_id)

    def _artifact(self, model_id: str) -> int:
        spec = self.state.models.get(model_id)
        stats = self.state.stats.get(model_id)
        return (spec.artifact_bytes if spec else 0) or (stats.artifact_bytes if stats else 0)

    def _resample(self, model_id: str, instance_id: str) -> None:
        key = (model_id, instance_id)
        copy = self.state.copies.get(model_id, {}).get(instance_id)
        inst = self.state.instances.get(instance_id)
        new = None
        if copy is not None and inst is not None and copy.state is CopyState.LOADED and copy.size_bytes > 0:
            new = (inst.device, copy.size_bytes, self._artifact(model_id))
        old = self._samples.get(key)
        if old == new:
            return
        if old is not None:
            del self._samples[key]
            self._account(*old, sign=-1)
        if new is not None:
            self._samples[key] = new
            self._account(*new, sign=1)

    def _account(self, kind: str, size: int, art: int, sign: int) -> None:
        """Adds (sign 1) or removes (-1) one sample from its kind's sorted lists."""
        _sorted_change(self._sizes.setdefault(kind, []), size, sign)
        if art <= 0:
            return
        before = self.overhead(kind)
        _sorted_change(self._excess.setdefault(kind, []), max(size - art, 0), sign)
        cached = self._ratios.get(kind)
        if cached is None:
            return
        if self.overhead(kind) != before:
            del self._ratios[kind]  # every ratio moves with the overhead: re-sorted when next asked
        else:
            _sorted_change(cached[1], size / (art + before), sign)

    def _on_change(self, section: str, ids: tuple[str, ...]) -> None:
        if section == k.COPIES and len(ids) == 2:
            self._resample(ids[0], ids[1])
        elif section in (k.MODELS, k.STATS) and len(ids) == 1:
            for instance_id in self.state.copies.get(ids[0], {}):
                self._resample(ids[0], instance_id)
        elif section == k.INSTANCES and len(ids) == 1:
            # A pod that appears (again) or changes its device kind re-files its copies' samples
            # (before, a pod's record arriving after its copies' left them unsampled); its
            # other record updates (used bytes, on every load) change nothing here.
            inst = self.state.instances.get(ids[0])
            device = inst.device if inst is not None else None
            if self._devices.get(ids[0]) == device:
                return
            if device is None:
                self._devices.pop(ids[0], None)
            else:
                self._devices[ids[0]] = device
            for model_id, copies in self.state.copies.items():
                if ids[0] in copies:
                    self._resample(model_id, ids[0])
            for key in [key for key in self._samples if key[1] == ids[0] and device is None]:
                self._account(*self._samples.pop(key), sign=-1)

    def overhead(self, kind: str) -> int:
        """A session's fixed cost on pods of `kind`: the smallest excess of a measured footprint
        over its artifact there."""
        excess = self._excess.get(kind)
        return excess[0] if excess else DEFAULT_OVERHEAD

    def _learned(self, kind: str) -> tuple[list[float], list[int]]:
        cached = self._ratios.get(kind)
        if cached is None:
            base = self.overhead(kind)
            ratios = sorted(size / (art + base) for (knd, size, art) in self._samples.values()
                            if knd == kind and art > 0)
            cached = self._ratios[kind] = (base, ratios)
        return cached[1], self._sizes.get(kind, [])

    def _percentile(self, values: list[float] | list[int]) -> float:
        index = min(len(values) - 1, max(0, math.ceil(self.settings.prior_percentile * len(values)) - 1))
        return float(values[index])

    def ratio(self, kind: str) -> tuple[float, str]:
        """The footprint / (artifact + overhead) ratio assumed on pods of `kind`, and where it
        comes from."""
        s = self.settings
        ratios, _ = self._learned(kind)
        pct = f"p{s.prior_percentile * 100:g}"
        if len(ratios) >= s.prior_min_samples:
            return max(1.0, self._percentile(ratios)), f"{pct} of {len(ratios)} models measured on {kind} pods"
        if ratios:
            learned = self._percentile(ratios)
            if learned > s.prior_ratio:
                return learned, f"{pct} of only {len(ratios)} models measured on {kind} pods"
        return max(1.0, s.prior_ratio), (f"MESH_PLACEMENT_PRIOR_RATIO: {len(ratios)} of "
                                         f"{s.prior_min_samples} models measured on {kind} pods yet")

    def size(self, model_id: str, kinds: set[str] | frozenset[str] = frozenset({"cpu"})) -> Size:
        """What to book for `model_id` on pods of any of `kinds` (the largest if they differ)."""
        stats = self.state.stats.get(model_id)
        if stats is not None and stats.size_bytes > 0:
            return Size(stats.size_bytes, "measured", is_prior=False)
        artifact = self._artifact(model_id)
        best: Size | None = None
        for kind in sorted(kinds) or ["cpu"]:
            if artifact > 0:
                ratio, source = self.ratio(kind)
                base = self.overhead(kind)
                guess = Size(math.ceil((artifact + base) * ratio),
                             f"prior: (artifact {format_bytes(artifact)} + session {format_bytes(base)}) "
                             f"x {ratio:.2f} ({source})")
            else:
                guess = self._unknown_artifact(kind)
            if best is None or guess.bytes > best.bytes:
                best = guess
        assert best is not None
        return best

    def _unknown_artifact(self, kind: str) -> Size:
        s = self.settings
        default = Size(s.default_model_bytes, f"prior: artifact size unknown, "
                       f"MESH_PLACEMENT_DEFAULT_MODEL_BYTES {format_bytes(s.default_model_bytes)}")
        _, sizes = self._learned(kind)
        if len(sizes) >= s.prior_min_samples:
            learned = int(self._percentile(sizes))
            if learned > default.bytes:
                return Size(learned, f"prior: artifact size unknown, p{s.prior_percentile * 100:g} of "
                            f"{len(sizes)} footprints measured on {kind} pods")
        return default


def _sorted_change(values: list, value: float, sign: int) -> None:
    """Inserts (sign 1) or removes (-1) `value` in the sorted list `values`."""
    if sign > 0:
        bisect.insort(values, value)
        return
    index = bisect.bisect_left(values, value)
    if index < len(values) and values[index] == value:
        del values[index]
