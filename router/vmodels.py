"""VModels (aliases, as ModelMesh's vmodels): the pure pieces — validation and the per-request pick.

A vmodel names one or more concrete models of its tenant with integer weights, an optional
sticky header and optional tag routes (mesh/types.py VModelRecord; stored at
keys.vmodel(<internal name>), written by router/vmodel_store.py, read by every router from
its watched MeshState: no etcd read on a request path).

Per request (`pick`): a tag route whose header the request carries with that value wins;
else, with a sticky header present on the request, the target is chosen by a blake2b hash of
(vmodel name, header value) over the cumulative weights, so every router picks the same one
for the same key (Python's hash() is salted per process and would not be); else a weighted
random pick. Only `active` targets are picked: a `pending` switch is invisible to requests
until it completes.

Which name means a vmodel (router/tenancy.py Namespace.route): `mm-vmodel-id` names a vmodel
first (ModelMesh: it wins over mm-model-id), a model of that name when no vmodel has it (as
before vmodels existed); `mm-model-id` and `model_name` name a model first, then a vmodel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Iterable, Mapping
from typing import Any

from mesh import errors, rollout
from mesh.errors import InvalidArgument
from mesh.types import VModelRecord

MAX_TARGETS = 16
MAX_WEIGHT = 10_000
MAX_TAGS = 32
MAX_TAG_VALUE = 256
# gRPC metadata keys (lower case, no "-bin": values are text); not the mesh's own or transport ones.
_HEADER = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_RESERVED = frozenset({"authorization", "mm-vmodel-id", "mm-model-id", "content-type", "user-agent", "te", "host"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclasses.dataclass(frozen=True)
class Wanted:
    """A SetVModel request as the caller named it (public or admin ids), before validation."""

    name: str
    targets: tuple[tuple[str, int], ...]
    sticky_header: str = ""
    tags: tuple[tuple[str, str, str], ...] = ()  # (header, value, model id)


# -- validation ---------------------------------------------------------------------------------


def check_header(header: str, what: str) -> str:
    if not _HEADER.fullmatch(header) or header.endswith("-bin") or header.startswith("grpc-") \
            or header in _RESERVED:
        raise InvalidArgument(
            f"invalid {what} {errors.quote_id(header, 80)}: use 1-64 lower-case characters from a-z 0-9 . _ -, "
            "not a -bin, grpc- or mesh routing header, not authorization")
    return header


def check_shape(wanted: Wanted) -> None:
    """Everything about a SetVModel request that needs no lookup; raises InvalidArgument."""
    if not wanted.targets:
        raise InvalidArgument(f"vmodel {errors.quote_id(wanted.name)} needs at least one target model")
    if len(wanted.targets) > MAX_TARGETS:
        raise InvalidArgument(f"too many targets ({len(wanted.targets)}): at most {MAX_TARGETS}")
    seen: set[str] = set()
    for model_id, weight in wanted.targets:
        if not model_id:
            raise InvalidArgument("a target needs a model id")
        if model_id in seen:
            raise InvalidArgument(f"target {errors.quote_id(model_id)} is named twice: give it once, with one weight")
        seen.add(model_id)
        if not 0 <= weight <= MAX_WEIGHT:
            raise InvalidArgument(f"invalid weight {weight} of target {errors.quote_id(model_id)}: use 0-{MAX_WEIGHT}")
    if not any(weight > 0 for _, weight in wanted.targets):
        raise InvalidArgument("every target has weight 0: give at least one a positive weight")
    if wanted.sticky_header:
        check_header(wanted.sticky_header, "sticky_header")
    if len(wanted.tags) > MAX_TAGS:
        raise InvalidArgument(f"too many tag routes ({len(wanted.tags)}): at most {MAX_TAGS}")
    pairs: set[tuple[str, str]] = set()
    for header, value, model_id in wanted.tags:
        check_header(header, "tag header")
        if not value or len(value) > MAX_TAG_VALUE or _CONTROL.search(value):
            raise InvalidArgument(f"invalid value of tag header {header!r}: 1-{MAX_TAG_VALUE} characters, "
                                  "no control characters")
        if (header, value) in pairs:
            raise InvalidArgument(f"tag {header}={value[:80]!r} is given twice")
        pairs.add((header, value))
        if not model_id:
            raise InvalidArgument(f"tag {header}={value[:80]!r} needs a model id")


# -- the per-request pick -----------------------------------------------------------------------


def sticky_point(name: str, value: str, total: int) -> int:
    """A point in [0, total) fixed by (vmodel, key): blake2b, the same in every process."""
    digest = hashlib.blake2b(f"{name}\0{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % total


def weighted(targets: Mapping[str, int], point: int) -> str:
    """The target whose cumulative-weight interval (targets in id order) holds `point`."""
    upto = 0
    last = ""
    for model_id in sorted(targets):
        weight = targets[model_id]
        if weight <= 0:
            continue
        upto += weight
        last = model_id
        if point < upto:
            return model_id
    return last


def total_weight(targets: Mapping[str, int]) -> int:
    return sum(w for w in targets.values() if w > 0)


def pick(record: VModelRecord, headers: Mapping[str, str], rng: random.Random) -> str:
    """The internal id of the model this request goes to ("" when the vmodel has no target)."""
    for header, routes in record.tags.items():
        value = headers.get(header)
        if value is not None and value in routes:
            return routes[value]
    total = total_weight(record.active)
    if total <= 0:
        return ""
    key = headers.get(record.sticky_header) if record.sticky_header else None
    point = sticky_point(record.name, key, total) if key is not None else rng.randrange(total)
    return weighted(record.active, point)


def primary(record: VModelRecord, headers: Mapping[str, str]) -> str:
    """The target a control request (ModelReady, ModelMetadata) answers for: the tag or sticky
    pick when the request carries one, else the heaviest active target (ties: the lowest id),
    so repeated calls agree."""
    for header, routes in record.tags.items():
        value = headers.get(header)
        if value is not None and value in routes:
            return routes[value]
    if record.sticky_header and record.sticky_header in headers and total_weight(record.active):
        return weighted(record.active, sticky_point(record.name, headers[record.sticky_header],
                                                    total_weight(record.active)))
    live = [(-w, m) for m, w in record.active.items() if w > 0]
    return min(live)[1] if live else ""


def text_headers(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    """The request's text metadata by name (the last value of a repeated key wins)."""
    return {key: value for key, value in metadata or () if isinstance(value, str)}


def targets_of(record: VModelRecord) -> set[str]:
    """Every model the vmodel may send a request to (active, pending and tag targets)."""
    out = {m for m, w in record.active.items() if w > 0} | {m for m, w in record.pending.items() if w > 0}
    for routes in record.tags.values():
        out.update(routes.values())
    return out


def header_names(record: VModelRecord) -> list[str]:
    """The request headers the vmodel's pick reads (sticky and tag headers)."""
    names = list(record.tags)
    if record.sticky_header and record.sticky_header not in names:
        names.append(record.sticky_header)
    return names


# -- rollouts (mesh/rollout.py) -----------------------------------------------------------------

MAX_STEPS = 20
MIN_DWELL_S = 1.0
MAX_MIN_REQUESTS = 1_000_000
DEFAULT_MAX_ERROR_RATE = 0.01


@dataclasses.dataclass(frozen=True)
class RolloutWanted:
    """A StartRollout request as the caller named it. Zero bounds mean the defaults:
    max_error_rate 0.01, min_requests 20; max_p99_ratio 0 means not checked."""

    vmodel: str
    candidate: str
    steps: tuple[int, ...]
    dwell_s: float
    max_error_rate: float = 0.0
    max_p99_ratio: float = 0.0
    min_requests: int = 0
    tag_header: str = ""
    tag_value: str = ""


def check_rollout(wanted: RolloutWanted) -> RolloutWanted:
    """Everything about a StartRollout request that needs no lookup (raises InvalidArgument);
    returns it with the defaults filled in."""
    if not wanted.candidate:
        raise InvalidArgument("a rollout needs a candidate model (the one traffic moves to)")
    if len(wanted.steps) > MAX_STEPS:
        raise InvalidArgument(f"too many steps ({len(wanted.steps)}): at most {MAX_STEPS}")
    problem = rollout.check_steps(wanted.steps)
    if problem:
        raise InvalidArgument(f"invalid steps {list(wanted.steps)[:MAX_STEPS]}: {problem}")
    if not MIN_DWELL_S <= wanted.dwell_s <= rollout.MAX_DWELL_S:  # NaN fails too
        raise InvalidArgument(f"invalid dwell {wanted.dwell_s!r}s: each step dwells {MIN_DWELL_S:g} to "
                              f"{rollout.MAX_DWELL_S} seconds")
    if not 0.0 <= wanted.max_error_rate <= 1.0:
        raise InvalidArgument(f"invalid max_error_rate {wanted.max_error_rate!r}: a fraction, 0 to 1 (0: the "
                              f"default, {DEFAULT_MAX_ERROR_RATE})")
    if not 0.0 <= wanted.max_p99_ratio <= 1000.0:
        raise InvalidArgument(f"invalid max_p99_ratio {wanted.max_p99_ratio!r}: candidate p99 / stable p99, "
                              "e.g. 1.5 (0: not checked)")
    if not 0 <= wanted.min_requests <= MAX_MIN_REQUESTS:
        raise InvalidArgument(f"invalid min_requests {wanted.min_requests}: 0 to {MAX_MIN_REQUESTS} (0: the "
                              f"default, {rollout.MIN_REQUESTS})")
    if bool(wanted.tag_header) != bool(wanted.tag_value):
        raise InvalidArgument("a rollout's tag route needs both a header and a value (e.g. x-canary=1)")
    if wanted.tag_header:
        check_header(wanted.tag_header, "tag header")
        if len(wanted.tag_value) > MAX_TAG_VALUE or _CONTROL.search(wanted.tag_value):
            raise InvalidArgument(f"invalid value of tag header {wanted.tag_header!r}: 1-{MAX_TAG_VALUE} "
                                  "characters, no control characters")
    elif wanted.steps[0] == 0:
        raise InvalidArgument("a step of 0 sends the candidate tagged requests only: give a tag route "
                              "(e.g. --tag x-canary=1), or start at a positive step")
    return dataclasses.replace(
        wanted, max_error_rate=wanted.max_error_rate or DEFAULT_MAX_ERROR_RATE,
        min_requests=wanted.min_requests or rollout.MIN_REQUESTS)
