"""API tokens as clients and the router share them: minting, hashing, the token file, metadata.

A token is `msh_` + 32 random bytes (URL-safe base64); the router stores and compares only its
sha256 (router/auth.py, router/tokens.py). `mesh up` writes its admin token to
<state dir>/token (mode 0600); the CLI finds a token in --token, then MESH_TOKEN, then the
file named by MESH_TOKEN_FILE or ./.mesh/token (`mesh up`'s default state folder).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import secrets

PREFIX = "msh_"
METADATA_KEY = "authorization"
TOKEN_FILE = "token"  # under a state folder
DEFAULT_STATE_DIR = ".mesh"


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    """sha256 hex of a token: what etcd and the settings hold, never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


def metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata carrying `token` (empty without one)."""
    return ((METADATA_KEY, f"Bearer {token}"),) if token else ()


def write_token_file(path: pathlib.Path, token: str) -> None:
    """Writes `token` to `path` readable by its owner only (created 0600, never widened)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)


def read_token_file(path: pathlib.Path) -> str:
    """The token in `path`, or "" when there is no such file."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def state_token(state_dir: pathlib.Path) -> str:
    """The admin token of a local mesh's state folder, minted and written on first use."""
    path = state_dir / TOKEN_FILE
    token = read_token_file(path)
    if not token:
        token = new_token()
        write_token_file(path, token)
    return token


def client_token(explicit: str = "", env: dict[str, str] | None = None) -> str:
    """The token a CLI command sends: --token, else MESH_TOKEN, else the token file
    (MESH_TOKEN_FILE, default ./.mesh/token); "" when there is none (anonymous)."""
    environ = os.environ if env is None else env
    if explicit:
        return explicit
    if environ.get("MESH_TOKEN"):
        return environ["MESH_TOKEN"].strip()
    file = environ.get("MESH_TOKEN_FILE") or str(pathlib.Path(DEFAULT_STATE_DIR) / TOKEN_FILE)
    return read_token_file(pathlib.Path(file))
