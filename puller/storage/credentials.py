"""Fetch credentials by reference: a ModelSpec names them (credentials_ref), the pod reads them.

Credentials never live in a storage URI (the router refuses userinfo and signed query strings,
mesh/uripolicy.py): they would be stored in etcd and shown to every client that lists models.
The pod reads `<MESH_RUNTIME_CREDENTIALS_DIR>/<tenant>/<ref>` (`_default` for the default
tenant), so one tenant cannot name another's: either a file (JSON {"headers": {...}} or
{"token": "..."}, else the whole file is a bearer token) or a folder, e.g. a Kubernetes Secret
mounted there, with keys `token` and/or `headers.json` (http(s)), or `AWS_ACCESS_KEY_ID` /
`AWS_SECRET_ACCESS_KEY` (s3, `s3_keys`). The folder is the operator's, so
symlinks in it are followed (Secret volumes are made of them); the ref and tenant are checked
against a strict charset before any path is built. No error, log line or status repeats a
credential or the folder's path.
"""

from __future__ import annotations

import json
import os
import re

from mesh.errors import LoadFailed, quote_id

_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")
_HEADER = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}")
MAX_BYTES = 64 * 1024
_S3_KEYS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")


class Credentials:
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def s3_keys(self, tenant: str, ref: str) -> dict[str, str]:
        """The S3 keys `ref` of `tenant` stands for ({} without a ref: the pod's own): a folder
        (a mounted Secret) with keys AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and optionally
        AWS_SESSION_TOKEN (or the same in lower case), or a JSON file of them. Raises LoadFailed."""
        if not ref:
            return {}
        path, shown = self._path(tenant, ref)
        try:
            if os.path.isdir(path):
                raw: dict[str, object] = {}
                for name in _S3_KEYS:
                    for spelled in (name.upper(), name):
                        if os.path.exists(os.path.join(path, spelled)):
                            raw[name] = _read(os.path.join(path, spelled)).decode("utf-8").strip()
            else:
                loaded = json.loads(_read(path).decode("utf-8"))
                raw = {k.lower(): v for k, v in loaded.items()} if isinstance(loaded, dict) else {}
        except FileNotFoundError:
            raise LoadFailed(f"credentials_ref {shown} is not known to this pod (no such Secret for "
                             "the model's tenant)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise LoadFailed(f"credentials_ref {shown} cannot be read on this pod as S3 keys") from None
        keys = {k: v for k, v in raw.items() if k in _S3_KEYS and isinstance(v, str) and v}
        if "aws_access_key_id" not in keys or "aws_secret_access_key" not in keys:
            raise LoadFailed(f"credentials_ref {shown} has no AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                             "(see docs/OPERATIONS.md \"S3\")")
        return keys

    def _path(self, tenant: str, ref: str) -> tuple[str, str]:
        shown = quote_id(ref, 80)
        if not self.folder:
            raise LoadFailed(f"credentials_ref {shown} cannot be used: this pod has no credentials "
                             "folder (MESH_RUNTIME_CREDENTIALS_DIR)")
        owner = tenant or "_default"
        if not _NAME.fullmatch(ref) or not _NAME.fullmatch(owner.lstrip("_")):
            raise LoadFailed(f"credentials_ref {shown} is not a valid name")
        return os.path.join(self.folder, owner, ref), shown

    def headers(self, tenant: str, ref: str) -> dict[str, str]:
        """The HTTP headers `ref` of `tenant` stands for ({} without a ref); raises LoadFailed."""
        if not ref:
            return {}
        shown = quote_id(ref, 80)
        if not self.folder:
            raise LoadFailed(f"credentials_ref {shown} cannot be used: this pod has no credentials "
                             "folder (MESH_RUNTIME_CREDENTIALS_DIR)")
        owner = tenant or "_default"
        if not _NAME.fullmatch(ref) or not _NAME.fullmatch(owner.lstrip("_")):
            raise LoadFailed(f"credentials_ref {shown} is not a valid name")
        path = os.path.join(self.folder, owner, ref)
        try:
            if os.path.isdir(path):
                return self._from_folder(path, shown)
            return _parse(_read(path), shown)
        except FileNotFoundError:
            raise LoadFailed(f"credentials_ref {shown} is not known to this pod (no such Secret for "
                             "the model's tenant)") from None
        except OSError:
            raise LoadFailed(f"credentials_ref {shown} cannot be read on this pod") from None

    def _from_folder(self, path: str, shown: str) -> dict[str, str]:
        headers: dict[str, str] = {}
        found = False
        if os.path.exists(os.path.join(path, "headers.json")):
            headers.update(_parse(_read(os.path.join(path, "headers.json")), shown, want_object=True))
            found = True
        if os.path.exists(os.path.join(path, "token")):
            headers.update(_parse(_read(os.path.join(path, "token")), shown))
            found = True
        if not found:
            raise LoadFailed(f"credentials_ref {shown} has neither a `token` nor a `headers.json` key")
        return headers


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise OSError("too large")
    return data


def _parse(data: bytes, shown: str, want_object: bool = False) -> dict[str, str]:
    bad = LoadFailed(f"credentials_ref {shown} is malformed (see docs/SECURITY.md for its format)")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise bad from None
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError:
            raise bad from None
        if want_object or "headers" in raw:
            pairs = raw.get("headers", {}) if "headers" in raw else raw
        elif isinstance(raw.get("token"), str):
            pairs = {"Authorization": f"Bearer {raw['token']}"}
        else:
            raise bad
    elif want_object:
        raise bad
    else:
        pairs = {"Authorization": f"Bearer {text}"}
    if not isinstance(pairs, dict) or not pairs:
        raise bad
    out: dict[str, str] = {}
    for name, value in pairs.items():
        # No CR/LF or other control characters: a header value cannot add a request line.
        if not isinstance(value, str) or not _HEADER.fullmatch(str(name)) or re.search(r"[\x00-\x1f\x7f]", value):
            raise bad
        out[str(name)] = value
    return out
