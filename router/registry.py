"""The model registry: validation of specs, registration in etcd, status from MeshState.

Every rule a spec breaks is answered with InvalidArgument naming the field and what is
accepted. Storage URIs are checked against the configured schemes and, for file URIs, against
the configured roots on realpath-canonical paths (symlinks and `..` resolved), never by string
prefix of the raw input. Reads come from the watched MeshState; writes go to etcd and are
answered OK only once this router's view shows them (read your writes), so a registration
answered OK is routable here at once; when the view cannot confirm it within the caller's
deadline the answer is UNAVAILABLE, saying the write was made. Retrying a registration of the
identical spec answers OK (not ALREADY_EXISTS), so a client can always retry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import os
import re
import stat
import urllib.parse
from collections.abc import Callable, Mapping

from mesh import errors, types
from mesh.clock import Clock
from mesh.errors import AlreadyExists, Conflict, InvalidArgument, MeshError, Unavailable
from mesh.kv.etcd import EtcdClient
from mesh.kv.keys import Keys
from mesh.settings import RouterSettings
from mesh.state import MeshState
from mesh.types import CopyRecord, CopyState, Decision, ModelSpec, ModelStats

_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
MAX_COPIES = 64
MAX_BATCH = 4096
MAX_QUEUE_DELAY_US = 1_000_000
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_URI = 4096
MAX_LABELS = 64
MAX_LABEL_VALUE = 256
DEFAULT_PAGE = 100
MAX_PAGE = 1000
STAT_TIMEOUT_S = 2.0  # longest wait for a file:// artifact's size (a slow network filesystem)


class ModelState(enum.Enum):
    NOT_LOADED = "NOT_LOADED"
    LOADING = "LOADING"
    LOADED = "LOADED"
    FAILED = "FAILED"


@dataclasses.dataclass(frozen=True)
class ModelStatus:
    spec: ModelSpec
    state: ModelState
    copies: tuple[CopyRecord, ...] = ()
    stats: ModelStats | None = None
    decision: Decision | None = None


# -- validation ---------------------------------------------------------------------------------


def unknown_model(state: MeshState, model_id: str) -> MeshError:
    """The error for a model this router's view does not have. NOT_FOUND tells clients not to
    retry, so it is only said while the view is connected to etcd; before its first list or
    while its watch is broken the model may well exist: UNAVAILABLE."""
    if not state.view.connected:
        return Unavailable(f"model '{model_id}' is not known to this router right now (its view of "
                           "etcd is not connected); retry")
    return errors.model_not_found(model_id)


def check_model_id(model_id: str) -> str:
    if not _MODEL_ID.fullmatch(model_id) or model_id in (".", ".."):
        raise InvalidArgument(
            f"invalid model_id {model_id[:140]!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return model_id


def _check_file_path(uri: str, parts: urllib.parse.SplitResult, roots: list[str]) -> None:
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise InvalidArgument(
            f"invalid storage_uri {uri!r}: a file URI needs an absolute path, file:///abs/path/model.onnx"
        )
    path = urllib.parse.unquote(parts.path)
    if "\x00" in path or ".." in path.split("/"):
        raise InvalidArgument(f"invalid storage_uri {uri!r}: '..' segments are not allowed")
    if parts.query or parts.fragment:
        raise InvalidArgument(f"invalid storage_uri {uri!r}: a file URI takes no query or fragment")
    if not roots:
        return
    real = os.path.realpath(path)
    for root in roots:
        real_root = os.path.realpath(root)
        if os.path.commonpath([real, real_root]) == real_root:
            return
    raise InvalidArgument(
        f"invalid storage_uri {uri!r}: file URIs must lie under the configured roots "
        "(MESH_ROUTER_FILE_ROOTS)"
    )


def check_storage_uri(uri: str, settings: RouterSettings) -> str:
    if not uri or len(uri) > MAX_URI or _CONTROL.search(uri) or " " in uri:
        raise InvalidArgument(
            f"invalid storage_uri: give 1-{MAX_URI} characters without spaces or control characters"
        )
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    allowed = settings.schemes()
    if scheme not in allowed:
        raise InvalidArgument(
            f"invalid storage_uri {uri[:200]!r}: scheme {scheme or '(none)'!r} is not accepted; "
            f"use one of {', '.join(sorted(allowed))} (MESH_ROUTER_ALLOWED_SCHEMES)"
        )
    if scheme == "file":
        _check_file_path(uri, parts, settings.roots())
    elif not parts.netloc:
        raise InvalidArgument(f"invalid storage_uri {uri[:200]!r}: a {scheme} URI needs a host")
    return uri


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"too many labels ({len(labels)}): at most {MAX_LABELS}")
    for key, value in labels.items():
        if not _LABEL_KEY.fullmatch(key):
            raise InvalidArgument(
                f"invalid label key {key[:80]!r}: use 1-63 characters from A-Z a-z 0-9 . _ - /, "
                "starting with a letter or digit"
            )
        if len(value) > MAX_LABEL_VALUE or _CONTROL.search(value):
            raise InvalidArgument(
                f"invalid value of label {key!r}: at most {MAX_LABEL_VALUE} characters, "
                "no control characters"
            )
    return dict(labels)


def validate(spec: ModelSpec, settings: RouterSettings) -> ModelSpec:
    """The spec as it will be stored (format and sha256 normalised); raises InvalidArgument."""
    check_model_id(spec.model_id)
    if spec.tenant and not _TENANT.fullmatch(spec.tenant):
        raise InvalidArgument(
            f"invalid tenant {spec.tenant[:80]!r}: use 1-63 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit, or leave it empty"
        )
    check_storage_uri(spec.storage_uri, settings)
    fmt = spec.format.lower()
    if fmt not in ("", "onnx"):
        raise InvalidArgument(f"invalid format {spec.format[:40]!r}: only 'onnx' is supported")
    if spec.sha256 and not _SHA256.fullmatch(spec.sha256):
        raise InvalidArgument("invalid sha256: give the artifact's digest as 64 hex characters, or leave it empty")
    labels = check_labels(spec.labels)
    check_serving_options(spec)
    return dataclasses.replace(spec, format="onnx", sha256=spec.sha256.lower(), labels=labels)


def check_serving_options(spec: ModelSpec) -> None:
    if spec.max_copies and spec.min_copies > spec.max_copies:
        raise InvalidArgument(
            f"min_copies ({spec.min_copies}) is larger than max_copies ({spec.max_copies})")
    if spec.min_copies > MAX_COPIES or spec.max_copies > MAX_COPIES:
        raise InvalidArgument(f"copy bounds are limited to {MAX_COPIES}")
    if spec.max_batch_size > MAX_BATCH:
        raise InvalidArgument(f"max_batch_size is limited to {MAX_BATCH}")
    if spec.max_queue_delay_us > MAX_QUEUE_DELAY_US:
        raise InvalidArgument(f"max_queue_delay_us is limited to {MAX_QUEUE_DELAY_US} (1 s)")


# -- the registry -------------------------------------------------------------------------------


class Registry:
    def __init__(
        self, client: EtcdClient, keys: Keys, state: MeshState, settings: RouterSettings, clock: Clock
    ) -> None:
        self.client = client
        self.keys = keys
        self.state = state
        self.settings = settings
        self.clock = clock

    async def register(self, spec: ModelSpec, budget_s: float | None = None) -> ModelStatus:
        """Creates models/<id>; OK once this router's view shows it. `budget_s`: the caller's
        remaining time (None: the default deadline)."""
        deadline = self._deadline(budget_s)
        spec = validate(spec, self.settings)
        model_id = spec.model_id
        spec = dataclasses.replace(spec, registered_unix_ms=self.clock.unix_ms(),
                                   artifact_bytes=await artifact_bytes(spec.storage_uri, deadline))
        key = self.keys.model(model_id)
        try:
            try:
                revision = await self.client.create(key, types.encode(spec))
            except Conflict:
                revision = await self._same_spec_revision(key, spec)
        except Unavailable as exc:
            raise Unavailable(
                f"etcd did not confirm the registration of model '{model_id}' ({exc.message}); it may "
                "or may not have been written: retry RegisterModel with the same spec (that is safe)"
            ) from None
        view = self.state.view
        await self._until_visible(
            lambda: view.revision >= revision, deadline,
            f"model '{model_id}' is registered, but this router does not show it yet; retry GetModel "
            "(or RegisterModel with the same spec) shortly")
        return self.status_of(self.state.models.get(model_id, spec))

    async def _same_spec_revision(self, key: str, spec: ModelSpec) -> int:
        """The revision of the registration already at `key` when it is `spec` (a retried
        RegisterModel); raises AlreadyExists when it is another spec."""
        kv = await self.client.get(key)
        if kv is None:
            raise Unavailable(f"model '{spec.model_id}' was unregistered while registering it; retry")
        existing = types.decode(ModelSpec, kv.value)
        if _as_registered(existing) != _as_registered(spec):
            raise AlreadyExists(f"model '{spec.model_id}' is already registered")
        return kv.mod_revision

    async def unregister(self, model_id: str, budget_s: float | None = None) -> bool:
        """Deletes the model's key (placement removes its copies); unknown ids succeed. OK once
        this router's view no longer shows the model."""
        check_model_id(model_id)
        deadline = self._deadline(budget_s)
        try:
            existed = await self.client.delete(self.keys.model(model_id)) > 0
        except Unavailable as exc:
            raise Unavailable(
                f"etcd did not confirm the unregistration of model '{model_id}' ({exc.message}); it "
                "may or may not have happened: retry UnregisterModel (that is safe)") from None
        await self._until_visible(
            lambda: model_id not in self.state.models, deadline,
            f"model '{model_id}' is unregistered, but this router still shows it; retry shortly")
        return existed

    def get(self, model_id: str) -> ModelStatus:
        spec = self.state.models.get(model_id)
        if spec is None:
            raise unknown_model(self.state, model_id)
        return self.status_of(spec)

    def list(
        self, page_size: int, page_token: str, tenant: str, labels: Mapping[str, str]
    ) -> tuple[list[ModelStatus], str]:
        """A page of models ordered by id, after `page_token`; returns it with the next token."""
        size = min(page_size or DEFAULT_PAGE, MAX_PAGE)
        page: list[ModelSpec] = []
        more = False
        for model_id in sorted(self.state.models):
            if page_token and model_id <= page_token:
                continue
            spec = self.state.models[model_id]
            if tenant and spec.tenant != tenant:
                continue
            if any(spec.labels.get(k) != v for k, v in labels.items()):
                continue
            if len(page) == size:
                more = True
                break
            page.append(spec)
        token = page[-1].model_id if more else ""
        return [self.status_of(spec) for spec in page], token

    def status_of(self, spec: ModelSpec) -> ModelStatus:
        copies = tuple(self.state.copies.get(spec.model_id, {}).values())
        stats = self.state.stats.get(spec.model_id)
        if self.state.ready_copies(spec.model_id):
            state = ModelState.LOADED
        elif any(c.state is CopyState.LOADING for c in copies):
            state = ModelState.LOADING
        elif any(c.state is CopyState.FAILED for c in copies) or (stats and stats.last_error):
            state = ModelState.FAILED
        else:
            state = ModelState.NOT_LOADED
        return ModelStatus(spec=spec, state=state, copies=copies, stats=stats,
                           decision=self.state.decisions.get(spec.model_id))

    def _deadline(self, budget_s: float | None) -> float:
        budget = self.settings.default_deadline_s if budget_s is None else budget_s
        return asyncio.get_running_loop().time() + budget

    async def _until_visible(self, done: Callable[[], bool], deadline: float, not_yet: str) -> None:
        """Read your writes: returns once `done()` holds in this router's view; raises
        Unavailable(`not_yet`) when it does not before `deadline` (a little before, so the
        answer reaches the caller in time)."""
        if done():
            return
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            await self.state.wait_for(done, max(remaining - min(0.2, remaining / 10), 0.001))
        except TimeoutError:
            raise Unavailable(not_yet) from None


def _as_registered(spec: ModelSpec) -> ModelSpec:
    """What a user registered, without what the router adds (time, measured size)."""
    return dataclasses.replace(spec, registered_unix_ms=0, artifact_bytes=0)


async def artifact_bytes(uri: str, deadline: float) -> int:
    """Size of a file:// artifact (placement's first guess at its footprint); 0 when unknown:
    another scheme, no such file yet, or the filesystem too slow to answer (stat runs in a
    thread, never on the event loop)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme.lower() != "file":
        return 0
    path = urllib.parse.unquote(parts.path)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(min(deadline, loop.time() + STAT_TIMEOUT_S)):
            info = await asyncio.to_thread(os.stat, path)
    except (OSError, TimeoutError, ValueError):
        return 0
    return info.st_size if stat.S_ISREG(info.st_mode) else 0
