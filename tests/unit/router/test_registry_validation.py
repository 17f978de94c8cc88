"""Registration rules: malformed specs are InvalidArgument, storage the policy refuses
(mesh/uripolicy.py: file roots, non-public hosts, tenant prefixes) PermissionDenied; each with
an actionable message that names no configured folder and repeats no credential."""

from __future__ import annotations

import os
import pathlib

import pytest

from mesh.errors import InvalidArgument, PermissionDenied
from mesh.settings import RouterSettings
from mesh.types import ModelSpec
from router.registry import validate

GOOD_SHA = "ab" * 32


def _spec(**kw: object) -> ModelSpec:
    base: dict[str, object] = {"model_id": "m1", "storage_uri": "file:///models/m1.onnx"}
    base.update(kw)
    return ModelSpec(**base)  # type: ignore[arg-type]


def _settings(**kw: object) -> RouterSettings:
    kw.setdefault("file_roots", "/models")
    return RouterSettings(**kw)  # type: ignore[arg-type]


def test_good_spec_is_normalised() -> None:
    out = validate(_spec(format="ONNX", sha256=GOOD_SHA.upper(), tenant="t-1", labels={"team": "a"}),
                   _settings())
    assert out.format == "onnx" and out.sha256 == GOOD_SHA and out.labels == {"team": "a"}
    assert validate(_spec(format=""), _settings()).format == "onnx"


@pytest.mark.parametrize("model_id", ["a", "A.b_c-1", "9" * 128])
def test_model_id_accepted(model_id: str) -> None:
    validate(_spec(model_id=model_id), _settings())


@pytest.mark.parametrize(
    "model_id", ["", ".", "..", "-a", "_a", "a/b", "a b", "a\n", "é", "9" * 129, "a:b"]
)
def test_model_id_rejected(model_id: str) -> None:
    with pytest.raises(InvalidArgument, match="model_id"):
        validate(_spec(model_id=model_id), _settings())


@pytest.mark.parametrize("tenant", ["-t", "t/x", "t" * 64, "t\n"])
def test_tenant_rejected(tenant: str) -> None:
    with pytest.raises(InvalidArgument, match="tenant"):
        validate(_spec(tenant=tenant), _settings())


@pytest.mark.parametrize(
    "uri, match",
    [
        ("", "storage_uri"),
        ("gs://bucket/m.onnx", "scheme 'gs'"),
        ("s3://Bucket_1/m.onnx", "not an S3 bucket name"),
        ("s3://bucket:9000/m.onnx", "not an S3 bucket name"),  # the endpoint is the pods' setting
        ("s3://bucket/a//m.onnx", "empty, '.' or '..' segments"),
        ("s3://bucket/m.onnx?versionId=3", "no query"),
        ("http://h/models/m/", "names one file"),
        ("/models/m.onnx", "scheme"),
        ("ftp://h/m.onnx", "scheme"),
        ("file://models/m.onnx", "absolute"),
        ("file:relative/m.onnx", "absolute"),
        ("file:///models/../etc/passwd", r"'\.\.'"),
        ("file:///models/%2e%2e/etc/passwd", r"'\.\.'"),
        ("file:///models/m.onnx?x=1", "query"),
        ("http:///m.onnx", "host"),
        ("https://h/m onnx", "spaces"),
        ("file:///a\x00b", "control"),
        ("http://h/" + "a" * 5000, "characters"),
    ],
)
def test_storage_uri_rejected(uri: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        validate(_spec(storage_uri=uri), _settings())


def test_schemes_are_configurable() -> None:
    validate(_spec(storage_uri="s3://bucket/m.onnx"), _settings(allowed_schemes="s3"))
    with pytest.raises(InvalidArgument, match="MESH_ROUTER_ALLOWED_SCHEMES"):
        validate(_spec(storage_uri="file:///models/m.onnx"), _settings(allowed_schemes="s3"))


def test_file_roots_compare_canonical_paths(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "models"
    (root / "sub").mkdir(parents=True)
    sibling = tmp_path / "models-evil"
    sibling.mkdir()
    settings = _settings(file_roots=str(root))
    validate(_spec(storage_uri=f"file://{root}/sub/m.onnx"), settings)
    validate(_spec(storage_uri=f"file://{root}"), settings)
    # a string-prefix check would accept the sibling folder
    with pytest.raises(PermissionDenied, match="MESH_ROUTER_FILE_ROOTS") as err:
        validate(_spec(storage_uri=f"file://{sibling}/m.onnx"), settings)
    assert str(root) not in err.value.message.split("refused:", 1)[1]  # the roots are not disclosed
    # a symlink inside the root pointing outside it is resolved before the check
    os.symlink("/etc", root / "escape")
    with pytest.raises(PermissionDenied, match="MESH_ROUTER_FILE_ROOTS"):
        validate(_spec(storage_uri=f"file://{root}/escape/passwd"), settings)


@pytest.mark.parametrize("uri", ["file:///etc/shadow", "file:///proc/self/environ", "file:///dev/zero",
                                 "file:///models/m.onnx"])
def test_file_uris_refused_without_roots(uri: str) -> None:
    """Issue 10 regression: file:///etc/shadow was accepted with the default settings."""
    with pytest.raises(PermissionDenied, match="no file roots are configured"):
        validate(_spec(storage_uri=uri), _settings(file_roots=""))


@pytest.mark.parametrize("uri", ["file:///etc/shadow", "file:///proc/self/environ", "file:///dev/zero"])
def test_system_files_refused_with_roots(uri: str) -> None:
    with pytest.raises(PermissionDenied, match="must lie under"):
        validate(_spec(storage_uri=uri), _settings())


@pytest.mark.parametrize("roots", ["/", "/etc", "/proc", "/proc/self", "/dev", "/sys/fs", "relative/x"])
def test_system_folders_cannot_be_roots(roots: str) -> None:
    with pytest.raises(ValueError):
        _settings(file_roots=roots)


SSRF = [
    "http://169.254.169.254/latest/meta-data/",
    "http://127.0.0.1:2379/v3/kv/range",
    "http://[::1]/m.onnx",
    "http://2130706433/m.onnx",
    "http://0x7f.1/m.onnx",
    "http://0177.0.0.1/m.onnx",
    "http://127.1/m.onnx",
    "http://[::ffff:127.0.0.1]/m.onnx",
    "http://[::ffff:7f00:1]/m.onnx",
    "http://[fd00:ec2::254]/m.onnx",
    "http://[64:ff9b::a9fe:a9fe]/m.onnx",  # NAT64 of the metadata address
    "http://[2002:7f00:1::]/m.onnx",  # 6to4 of loopback
    "http://0.0.0.0/m.onnx",
    "http://0/m.onnx",
    "http://10.0.0.1/m.onnx",
    "http://192.168.1.1/m.onnx",
    "http://172.16.0.1/m.onnx",
    "http://100.64.0.1/m.onnx",
    "http://224.0.0.1/m.onnx",
    "https://[fe80::1]/m.onnx",
    "http://127.0.0.1./m.onnx",
]


@pytest.mark.parametrize("uri", SSRF)
def test_non_public_address_literals_refused(uri: str) -> None:
    """Issue 10 regression: metadata, etcd's port, [::1] and 2130706433 were accepted."""
    with pytest.raises(PermissionDenied, match="refused: its host is a"):
        validate(_spec(storage_uri=uri), _settings())


def test_allowed_networks_and_hosts() -> None:
    validate(_spec(storage_uri="http://10.1.2.3/m.onnx"), _settings(allowed_networks="10.0.0.0/8"))
    validate(_spec(storage_uri="http://[::ffff:10.1.2.3]/m.onnx"), _settings(allowed_networks="10.0.0.0/8"))
    for uri in ("http://172.16.0.1/x", "http://169.254.169.254/", "http://127.0.0.1/"):
        with pytest.raises(PermissionDenied):
            validate(_spec(storage_uri=uri), _settings(allowed_networks="10.0.0.0/8"))
    # an allowed host may be private, never the metadata address
    validate(_spec(storage_uri="http://10.9.9.9/m.onnx"), _settings(allowed_hosts="10.9.9.9"))
    with pytest.raises(PermissionDenied):
        validate(_spec(storage_uri="http://169.254.169.254/"), _settings(allowed_hosts="169.254.169.254"))
    validate(_spec(storage_uri="http://169.254.169.254/"), _settings(allowed_networks="169.254.169.254/32"))
    with pytest.raises(PermissionDenied, match="metadata"):  # a wider range never covers metadata
        validate(_spec(storage_uri="http://169.254.169.254/"), _settings(allowed_networks="169.254.0.0/16"))
    validate(_spec(storage_uri="https://8.8.8.8/m.onnx"), _settings())  # public: accepted


@pytest.mark.parametrize("uri, word", [
    ("https://user:password@models.example.com/m.onnx", "userinfo"),
    ("https://user@models.example.com/m.onnx", "userinfo"),
    ("https://b.s3.amazonaws.com/m.onnx?X-Amz-Signature=abc&X-Amz-Credential=k", "X-Amz-Signature"),
    ("https://storage.googleapis.com/b/m.onnx?X-Goog-Signature=abc", "X-Goog-Signature"),
    ("https://a.blob.core.windows.net/c/m.onnx?sv=2020&sig=abc", "'sig'"),
    ("https://h/m.onnx?AWSAccessKeyId=AKIA&Signature=x", "AWSAccessKeyId"),
    ("https://h/m.onnx?token=s3cr3t", "'token'"),
    ("https://h/m.onnx?access_token=s3cr3t", "access_token"),
    ("https://h/m.onnx?my_api_token=s3cr3t", "my_api_token"),
])
def test_credentials_in_uris_refused(uri: str, word: str) -> None:
    """Issue 10 regression: user:password@ and X-Amz-Signature were stored and shown to all."""
    with pytest.raises(InvalidArgument, match="credentials_ref") as err:
        validate(_spec(storage_uri=uri), _settings())
    assert word in err.value.message
    for secret in ("password", "abc", "s3cr3t", "AKIA"):
        assert f"={secret}" not in err.value.message and f":{secret}@" not in err.value.message


def test_credentials_ref() -> None:
    spec = validate(_spec(storage_uri="https://models.example.com/m.onnx", credentials_ref="team-a.s3"), _settings())
    assert spec.credentials_ref == "team-a.s3"
    for bad in ("../x", "a/b", "A" * 300, "-a", "a b"):
        with pytest.raises(InvalidArgument, match="credentials_ref"):
            validate(_spec(storage_uri="https://h.example.com/m.onnx", credentials_ref=bad), _settings())
    with pytest.raises(InvalidArgument, match="only used with http"):
        validate(_spec(credentials_ref="x"), _settings())


@pytest.mark.parametrize("uri", ["https://h.example.com/a/%2e%2e/b", "https://h.example.com/a/../b",
                                 "https://h.example.com/a%2fb", "https://h.example.com/a\\b",
                                 "https://h.example.com/m.onnx#@evil", "s3://b/../x"])
def test_path_tricks_refused(uri: str) -> None:
    with pytest.raises(InvalidArgument):
        validate(_spec(storage_uri=uri), _settings(allowed_schemes="s3,https"))


def test_tenant_prefixes() -> None:
    prefixes = ('{"team-a": ["https://models.example.com/team-a/", "file:///models/team-a"],'
                ' "*": ["https://public.example.com/"]}')
    settings = _settings(tenant_storage_prefixes=prefixes)
    validate(_spec(tenant="team-a", storage_uri="https://models.example.com/team-a/m.onnx"), settings)
    validate(_spec(tenant="team-a", storage_uri="file:///models/team-a/x/m.onnx"), settings)
    validate(_spec(tenant="other", storage_uri="https://public.example.com/m.onnx"), settings)
    for tenant, uri in [("team-a", "https://models.example.com/team-b/m.onnx"),
                        ("team-a", "https://models.example.com/team-a-evil/m.onnx"),  # segment boundary
                        ("team-a", "https://evil.example.com/team-a/m.onnx"),
                        ("team-a", "file:///models/team-b/m.onnx"),
                        ("other", "https://models.example.com/team-a/m.onnx")]:
        with pytest.raises(PermissionDenied, match="MESH_ROUTER_TENANT_STORAGE_PREFIXES"):
            validate(_spec(tenant=tenant, storage_uri=uri), settings)
    with pytest.raises(ValueError):
        _settings(tenant_storage_prefixes='{"a": "not-a-list"}')


@pytest.mark.parametrize("fmt", ["pytorch", "onnx2", "tensorflow"])
def test_format_rejected(fmt: str) -> None:
    with pytest.raises(InvalidArgument, match="format"):
        validate(_spec(format=fmt), _settings())


@pytest.mark.parametrize("sha", ["abc", "g" * 64, "a" * 63, "a" * 65, " " + "a" * 63])
def test_sha256_rejected(sha: str) -> None:
    with pytest.raises(InvalidArgument, match="sha256"):
        validate(_spec(sha256=sha), _settings())


def test_labels_rules() -> None:
    validate(_spec(labels={f"k{i}": "v" for i in range(64)}), _settings())
    with pytest.raises(InvalidArgument, match="too many labels"):
        validate(_spec(labels={f"k{i}": "v" for i in range(65)}), _settings())
    for key in ("", "-k", "k" * 64, "k k"):
        with pytest.raises(InvalidArgument, match="label key"):
            validate(_spec(labels={key: "v"}), _settings())
    for value in ("v" * 257, "a\nb"):
        with pytest.raises(InvalidArgument, match="value of label"):
            validate(_spec(labels={"k": value}), _settings())
