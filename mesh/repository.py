"""Triton-style model repositories: what `mesh register --repository` and `mesh up --repository`
(and its poll) register.

A repository is a folder (or an s3 prefix) of models, each `<name>/config.pbtxt` (optional) and
`<name>/<version>/model.onnx` (plus any external-data files beside it), as
`tritonserver --model-repository` reads it. `scan` turns it into one registration per model:

- the versions: every one the config's version_policy selects (latest N: the newest N, the
  default N = 1; all; specific: those listed that exist), each registered as that version of the
  model (`mesh register --version N`, router/versions.py), so a V2 request's model_version picks
  one and "" the highest, as in Triton; a listed version that does not exist is a warning;
- the artifact: the version folder (file:///repo/name/3/ or s3://bucket/prefix/name/3/) when it
  holds more than model.onnx, else its model.onnx;
- max_batch_size and dynamic_batching.max_queue_delay_microseconds: the spec's dynamic
  batching (only with dynamic_batching in the config; Triton's max_batch_size alone just says
  the model has a batch dimension); instance_group counts (summed): max_copies, the most copies
  placement keeps of the model across the mesh (copies are loaded on demand, never pinned);
- labels `repository` (the repository's URI) and `repository-digest` (of every file's path,
  size and modification time or ETag), so a changed file changes the spec (an update reloads
  it) and the poll knows which registered models came from this repository (a version the
  policy no longer selects is unregistered by the poll, as Triton unloads it).

Every other config field is ignored, with one warning per model naming them. config.pbtxt is
parsed with protobuf's text format into Triton's ModelConfig (mesh/pb/inference/model_config.proto).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
import urllib.parse
from collections.abc import Iterable
from typing import Any

from mesh.types import ModelSpec

ARTIFACT = "model.onnx"
CONFIG = "config.pbtxt"
LABEL = "repository"
DIGEST_LABEL = "repository-digest"
VERSION_LABEL = "repository-version"
MAX_OBJECTS = 100_000  # keys listed under an s3 repository
MAX_CONFIG_BYTES = 1 << 20
_MAPPED = {"name", "platform", "backend", "version_policy", "max_batch_size", "dynamic_batching",
           "instance_group", "default_model_filename"}
_ONNX = {"", "onnxruntime_onnx", "onnxruntime", "onnx"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclasses.dataclass(frozen=True)
class Entry:
    """A file of the repository: its path below the repository root, size and a change mark."""

    path: str
    size: int
    mark: str  # mtime_ns (folder) or ETag (s3)


@dataclasses.dataclass(frozen=True)
class Found:
    """One model of the repository: its registration, or why it cannot be registered."""

    name: str
    spec: ModelSpec | None
    version: int = 0
    warnings: tuple[str, ...] = ()
    error: str = ""


class RepositoryError(Exception):
    """The repository itself cannot be read (no such folder, bucket, access denied)."""


def scan(location: str, s3_client: Any = None) -> list[Found]:
    """Every model version of the repository at `location` (a folder path, file:// URI or
    s3://bucket/prefix), ordered by name, then version (a model that cannot be registered: one
    Found with its error). `s3_client`: a boto3 S3 client (default: one from the environment)."""
    base, entries = list_repository(location, s3_client)
    return models_of(base, entries, lambda path: _read(location, base, path, s3_client))


def base_uri(location: str) -> str:
    """The URI the repository's artifacts are under, ending in /."""
    if location.startswith("s3://"):
        parts = urllib.parse.urlsplit(location)
        prefix = parts.path.lstrip("/")
        return f"s3://{parts.netloc}/{prefix.rstrip('/') + '/' if prefix else ''}"
    return _folder(location).as_uri() + "/"


def base_label(location: str, found: Iterable[Found] = ()) -> str:
    """The value of the `repository` label of the models registered from `location`."""
    return base_uri(location).rstrip("/")[-256:]


def _folder(location: str) -> pathlib.Path:
    return pathlib.Path(urllib.parse.unquote(urllib.parse.urlsplit(location).path)
                        if location.startswith("file://") else location).resolve()


def list_repository(location: str, s3_client: Any = None) -> tuple[str, list[Entry]]:
    """(the URI models' artifacts are under, ending in /; every file below it)."""
    if location.startswith("s3://"):
        return _list_s3(location, s3_client)
    path = _folder(location)
    if not path.is_dir():
        raise RepositoryError(f"model repository {location!r} is not a folder")
    entries = []
    for dirpath, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            full = pathlib.Path(dirpath) / name
            info = full.stat()
            entries.append(Entry(full.relative_to(path).as_posix(), info.st_size, str(info.st_mtime_ns)))
    return base_uri(location), entries


def s3_client_from_env() -> Any:
    """A boto3 S3 client as the CLI's environment configures it (AWS_* variables, a profile;
    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL for MinIO and other S3-compatible servers, then with
    path-style addressing)."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    return boto3.client("s3", endpoint_url=endpoint,
                        config=Config(s3={"addressing_style": "path" if endpoint else "auto"}))


def _list_s3(location: str, s3_client: Any) -> tuple[str, list[Entry]]:
    from botocore import exceptions as bx

    base = base_uri(location)
    parts = urllib.parse.urlsplit(base)
    bucket, prefix = parts.netloc, parts.path.lstrip("/")
    s3 = s3_client or s3_client_from_env()
    entries: list[Entry] = []
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", ()):
                rel = item["Key"][len(prefix):]
                if not rel or rel.endswith("/") or any(p.startswith(".") for p in rel.split("/")):
                    continue
                if len(entries) >= MAX_OBJECTS:
                    raise RepositoryError(f"model repository {location!r} holds more than {MAX_OBJECTS} objects")
                entries.append(Entry(rel, int(item["Size"]), str(item.get("ETag", ""))))
    except bx.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            raise RepositoryError(f"model repository {location!r}: the bucket does not exist") from None
        if code in ("AccessDenied", "403"):
            raise RepositoryError(f"model repository {location!r}: S3 denied listing it (AccessDenied)") from None
        raise RepositoryError(f"model repository {location!r}: S3 answered {code}") from None
    except bx.NoCredentialsError:
        raise RepositoryError("no S3 credentials: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE") from None
    except bx.BotoCoreError as exc:
        raise RepositoryError(f"model repository {location!r}: {type(exc).__name__}") from None
    return base, entries


def _read(location: str, base: str, path: str, s3_client: Any) -> str:
    if base.startswith("s3://"):
        parts = urllib.parse.urlsplit(base)
        s3 = s3_client or s3_client_from_env()
        body = s3.get_object(Bucket=parts.netloc, Key=parts.path.lstrip("/") + path)["Body"]
        data: bytes = body.read(MAX_CONFIG_BYTES + 1)
    else:
        with open(os.path.join(urllib.parse.unquote(urllib.parse.urlsplit(base).path), path), "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError("config.pbtxt is larger than 1 MiB")
    return data.decode("utf-8")


def models_of(base: str, entries: Iterable[Entry], read: Any) -> list[Found]:
    """The model versions of a listed repository (`read(path)` returns a config.pbtxt's text)."""
    by_model: dict[str, list[Entry]] = {}
    for e in entries:
        name, sep, rest = e.path.partition("/")
        if sep:
            by_model.setdefault(name, []).append(dataclasses.replace(e, path=rest))
    return [found for name, files in sorted(by_model.items()) for found in _model(base, name, files, read)]


def _model(base: str, name: str, files: list[Entry], read: Any) -> list[Found]:
    """One Found per version the policy selects (the model's warnings on the first), or one
    with the reason the model cannot be registered."""
    if not _NAME.fullmatch(name):
        return [Found(name, None, error="the folder name is not a valid model id (A-Z a-z 0-9 . _ -)")]
    warnings: list[str] = []
    config = None
    if any(f.path == CONFIG for f in files):
        try:
            config, unknown = parse_config(read(f"{name}/{CONFIG}"))
        except Exception as exc:  # a text-format or decoding error: this model only
            return [Found(name, None, error=f"config.pbtxt does not parse: {str(exc)[:200]}")]
        if unknown:
            warnings.append("config.pbtxt fields ignored (not used by meshserve): " + ", ".join(unknown))
        if config.name and config.name != name:
            warnings.append(f"config.pbtxt names the model {config.name!r}; the folder name {name!r} is used")
        if (config.platform or config.backend) not in _ONNX:
            return [Found(name, None, error=f"platform/backend {config.platform or config.backend!r} is not "
                                            "ONNX; meshserve serves onnxruntime_onnx models only")]
        if config.default_model_filename not in ("", ARTIFACT):
            return [Found(name, None, error=f"default_model_filename {config.default_model_filename!r}: "
                                            f"meshserve loads {ARTIFACT} only")]
    versions = sorted({int(f.path.split("/", 1)[0]) for f in files
                       if "/" in f.path and f.path.split("/", 1)[0].isdigit() and f.path.split("/", 1)[1] == ARTIFACT})
    if not versions:
        return [Found(name, None, error=f"no <version>/{ARTIFACT} (e.g. {name}/1/{ARTIFACT})")]
    selected, note = _versions(config, versions)
    if not selected:
        return [Found(name, None, error=note)]
    if note:
        warnings.append(note)
    batch = delay = copies = 0
    if config is not None:
        if config.HasField("dynamic_batching") and config.max_batch_size > 1:
            batch = config.max_batch_size
            delay = min(config.dynamic_batching.max_queue_delay_microseconds, 1_000_000)
        copies = min(sum(max(g.count, 1) for g in config.instance_group), 64)
    found: list[Found] = []
    for version in selected:
        folder = [f for f in files if f.path.startswith(f"{version}/")]
        multi = any(f.path != f"{version}/{ARTIFACT}" for f in folder)
        uri = f"{base}{name}/{version}/" if multi else f"{base}{name}/{version}/{ARTIFACT}"
        digest = hashlib.sha256("\n".join(f"{f.path} {f.size} {f.mark}" for f in sorted(
            [*folder, *(f for f in files if f.path == CONFIG)], key=lambda f: f.path)).encode()).hexdigest()[:32]
        spec = ModelSpec(model_id=name, storage_uri=uri, version=str(version), max_batch_size=batch,
                         max_queue_delay_us=delay, max_copies=copies,
                         labels={LABEL: base.rstrip("/")[-256:], DIGEST_LABEL: digest, VERSION_LABEL: str(version)})
        found.append(Found(name, spec, version, tuple(warnings) if not found else ()))
    return found


def _versions(config: Any, versions: list[int]) -> tuple[list[int], str]:
    """(the versions the config's version_policy selects among those present, ascending; a note
    on listed versions that are missing, or why none is selected)."""
    policy = config.version_policy.WhichOneof("policy_choice") if config is not None else None
    if policy == "all":
        return versions, ""
    if policy == "specific":
        listed = sorted(set(config.version_policy.specific.versions))
        selected = [v for v in listed if v in versions]
        missing = [v for v in listed if v not in versions]
        if not selected:
            return [], f"version_policy specific {listed}: none of them exists"
        return selected, f"version_policy specific: versions {missing} do not exist" if missing else ""
    n = max(config.version_policy.latest.num_versions, 1) if policy == "latest" else 1
    return versions[-n:], ""


def parse_config(text: str) -> tuple[Any, list[str]]:
    """Triton's ModelConfig from config.pbtxt, and the top-level fields meshserve ignores
    (known to Triton but not mapped, or unknown to the ModelConfig we carry). Top-level fields
    the ModelConfig does not know are cut out before parsing: protobuf's text parser cannot
    skip an unknown field written as a list (`model_warmup [ {...} ]`)."""
    from google.protobuf import text_format

    from mesh.pb.inference import model_config_pb2

    known = model_config_pb2.ModelConfig.DESCRIPTOR.fields_by_name
    fields = _top_level_fields(text)
    kept, at = [], 0
    for i, (name, begin) in enumerate(fields):
        if name not in known:
            kept.append(text[at:begin])
            at = fields[i + 1][1] if i + 1 < len(fields) else len(text)
    kept.append(text[at:])
    config = text_format.Parse("".join(kept), model_config_pb2.ModelConfig(), allow_unknown_field=True)
    ignored = sorted({n for n, _ in fields if n not in _MAPPED})
    return config, ignored


def _top_level_fields(text: str) -> list[tuple[str, int]]:
    """(name, offset) of the fields at the top level of a text-format message: identifiers
    followed by `:` `{` `<` or `[` outside any nesting (strings and comments skipped)."""
    tokens = [m for m in _TOKEN.finditer(text) if not m.group(0).isspace() and m.group(0)[0] != "#"]
    names, depth = [], 0
    for i, m in enumerate(tokens):
        tok = m.group(0)
        if tok in ("{", "[", "<"):
            depth += 1
        elif tok in ("}", "]", ">"):
            depth -= 1
        elif (depth == 0 and _IDENT.fullmatch(tok) and i + 1 < len(tokens)
              and tokens[i + 1].group(0) in (":", "{", "<", "[")):
            names.append((tok, m.start()))
    return names


_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|[A-Za-z_][A-Za-z0-9_]*|.', re.S)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
