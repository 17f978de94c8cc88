"""Model versions: (model name, model_version) -> the concrete model that serves it.

Each version of a model is its own registered model inside the mesh, so placement, the pods
and the route table know nothing of versions: version 1 is stored under the model's id itself
(every model registered before versions existed is version 1, unchanged), version N ≥ 2 under
`<id>@<N>` ('@' is never part of a registered id or a tenant name, so the split is
unambiguous). The router translates at its edge (router/tenancy.py calls in here):

- a V2 request's model_version picks the version; "" picks the highest registered one
  (Triton's default policy, `latest { num_versions: 1 }`); a version the model lacks is
  NOT_FOUND, as Triton's "Request for unknown model: 'm' version 3 is not found";
- the forwarded request names the concrete id (field 1) and an empty model_version (field 2,
  so the pod, which serves one version of each id, accepts it);
- the response names the caller's model name and the version that answered.

Version strings are positive integers, as in Triton's repository layout; at registration ""
means "1", and "1" is stored as "" (the spec of a model registered before versions existed).
`Index` keeps name -> versions from the watched MeshState's model changes (no scan per request).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from mesh.errors import InvalidArgument, NotFound, quote_id
from mesh.kv import keys as k
from mesh.state import MeshState
from mesh.types import ModelSpec
from router import wire

SEP = "@"
FIRST = "1"
MAX_VERSION = 10**9  # a Triton-style version directory number; larger is surely a mistake
_EMPTY_VERSION = wire.tag(2, wire.LEN) + b"\x00"  # model_version = "" (a later field wins)


def check(version: str) -> str:
    """The version as stored: "" for version 1 (and for none given), else the integer's
    canonical text; InvalidArgument for anything but a positive integer."""
    if version in ("", FIRST):
        return ""
    if not version.isascii() or not version.isdigit() or not 0 < int(version) <= MAX_VERSION:
        raise InvalidArgument(f"invalid version {quote_id(version, 16)}: give a positive integer "
                              f"(at most {MAX_VERSION}), or leave it empty for version 1")
    number = str(int(version))
    return "" if number == FIRST else number


def concrete_id(model_id: str, version: str) -> str:
    """The id a version of `model_id` (an internal id) is stored and served under."""
    stored = check(version)
    return f"{model_id}{SEP}{stored}" if stored else model_id


def split(model_id: str) -> tuple[str, str]:
    """(the model's id without its version, the version): 'm@2' -> ('m', '2'), 'm' -> ('m', '1')."""
    base, sep, version = model_id.rpartition(SEP)
    if sep and version.isdigit():
        return base, version
    return model_id, FIRST


def version_of(model_id: str) -> str:
    return split(model_id)[1]


def forwarded(request: bytes, version: str) -> bytes:
    """The request bytes to forward once `version` was resolved: model_version emptied."""
    return request + _EMPTY_VERSION if version else request


def response(infer_response: bytes, internal: str) -> bytes:
    """A pod's ModelInferResponse with model_version (field 2) the version that answered."""
    version = version_of(internal)
    return infer_response if version == FIRST else infer_response + wire.string(2, version)


def unknown_version(name: str, version: str) -> NotFound:
    return NotFound(f"Request for unknown model: {quote_id(name)} version {quote_id(version, 16)} is not found")


class Index:
    """Registered versions per model id (internal, without the version), kept current from
    the MeshState's model changes."""

    def __init__(self, state: MeshState) -> None:
        self.state = state
        self._versions: dict[str, dict[int, str]] = {}
        for model_id in list(state.models):
            self._add(model_id)
        state.on_change(self._on_change)

    def _on_change(self, section: str, ids: tuple[str, ...]) -> None:
        if section != k.MODELS or len(ids) != 1:
            return
        if ids[0] in self.state.models:
            self._add(ids[0])
        else:
            base, version = split(ids[0])
            held = self._versions.get(base)
            if held is not None:
                held.pop(int(version), None)
                if not held:
                    del self._versions[base]

    def _add(self, model_id: str) -> None:
        base, version = split(model_id)
        self._versions.setdefault(base, {})[int(version)] = model_id

    def versions(self, base: str) -> list[str]:
        """The registered versions of `base`, ascending ("1" for a model without versions)."""
        return [str(v) for v in sorted(self._versions.get(base, ()))]

    def held(self, base: str) -> dict[int, str]:
        """version -> concrete id of every registered version of `base` (internal id)."""
        return self._versions.get(base, {})


def _number(version: str) -> int:
    return int(version) if version.isascii() and version.isdigit() and len(version) <= 10 else -1


def lookup(state: MeshState, index: Index, visible: Callable[[ModelSpec], bool], bases: Iterable[str],
           name: str, version: str) -> ModelSpec | None:
    """The spec serving `version` ("" = the highest) of the model the caller calls `name`,
    `bases` being the internal ids that name may stand for; None when none of them is a
    model the caller may see (absent and another tenant's alike). NotFound for a version a
    model the caller sees lacks."""
    for base in bases:
        held = index.held(base)
        if not held:
            continue
        latest = state.models.get(held[max(held)])
        if latest is None or not visible(latest):
            continue
        if not version:
            return latest
        found = held.get(_number(version))
        spec = state.models.get(found) if found is not None else None
        if spec is None:
            raise unknown_version(name, version)
        return spec
    return None
