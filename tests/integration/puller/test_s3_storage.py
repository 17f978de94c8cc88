"""s3:// and multi-file artifacts through the pod's cache, against a real S3-compatible server
(moto's server mode, tests/integration/s3server.py): single objects, prefixes with ONNX external
data, checksums, clear errors, tenant prefixes; a model folder from file:// too."""

from __future__ import annotations

import hashlib
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from mesh import demo
from mesh.errors import LoadFailed
from mesh.metrics import Metrics
from mesh.uripolicy import FileRoots, TenantPrefixes
from puller import onnxcheck
from puller.cache import ArtifactCache
from puller.cachefiles import tree_sha256
from puller.storage import Auth
from puller.storage.credentials import Credentials
from puller.storage.file import FileProvider
from puller.storage.s3 import S3Config, S3Provider
from tests.integration.s3server import REGION, S3Server, s3_server  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration
BUCKET = "models"


def save_external(folder: pathlib.Path, seed: int = 3, weight_bytes: int = 256 * 1024) -> pathlib.Path:
    """model.onnx with its weights in an external-data file beside it (and a config.pbtxt)."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(demo.linear_model(seed, weight_bytes=weight_bytes), str(folder / "model.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
                    size_threshold=1024)
    (folder / "config.pbtxt").write_text('name: "m"\nplatform: "onnxruntime_onnx"\n')
    return folder


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> S3Server:  # noqa: F811
    s3 = s3_server.client()
    s3.create_bucket(Bucket=BUCKET)
    folder = tmp_path_factory.mktemp("s3src")
    demo.save(demo.linear_model(1), folder / "single.onnx")
    s3.upload_file(str(folder / "single.onnx"), BUCKET, "team-a/single/model.onnx")
    s3_server.upload_folder(BUCKET, "team-a/external/", save_external(folder / "external"))
    s3.put_object(Bucket=BUCKET, Key="team-a/nomodel/weights.bin", Body=b"x" * 10)
    s3.put_object(Bucket=BUCKET, Key="team-b/secret/model.onnx", Body=(folder / "single.onnx").read_bytes())
    return s3_server


def cache_for(tmp: pathlib.Path, server: S3Server, prefixes: TenantPrefixes | None = None,
              file_roots: str = "") -> ArtifactCache:
    s3 = S3Provider(S3Config(endpoint_url=server.endpoint, region=REGION, addressing_style="path",
                             max_attempts=2, timeout_s=60), Credentials(""), prefixes)
    table = {"s3": s3, "file": FileProvider(1 << 30, FileRoots.parse(file_roots, "X"))}
    return ArtifactCache(tmp / "cache", 1 << 30, table, Metrics(service="runtime"))  # type: ignore[dict-item]


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch, bucket: S3Server) -> None:
    for name, value in bucket.env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)


def run(session: ort.InferenceSession) -> np.ndarray:
    return session.run(None, {"input": np.ones((2, 4), np.float32)})[0]  # type: ignore[no-any-return]


async def test_single_object_is_pulled_and_verified(tmp_path: pathlib.Path, bucket: S3Server, keys: None) -> None:
    cache = cache_for(tmp_path, bucket)
    await cache.start()
    data = bucket.client().get_object(Bucket=BUCKET, Key="team-a/single/model.onnx")["Body"].read()
    art = await cache.acquire(f"s3://{BUCKET}/team-a/single/model.onnx", hashlib.sha256(data).hexdigest())
    assert art.path.read_bytes() == data and art.size_bytes == len(data)
    cache.release(art.key)
    with pytest.raises(LoadFailed, match="expected"):
        await cache.acquire(f"s3://{BUCKET}/team-a/single/model.onnx", "0" * 64)
    assert not list((tmp_path / "cache" / "tmp").iterdir()), "a failed download left its folder"


async def test_prefix_with_external_data_is_one_cache_entry(tmp_path: pathlib.Path, bucket: S3Server,
                                                            keys: None) -> None:
    cache = cache_for(tmp_path, bucket)
    await cache.start()
    art = await cache.acquire(f"s3://{BUCKET}/team-a/external/")
    folder = art.path.parent
    assert sorted(p.name for p in folder.iterdir()) == ["config.pbtxt", "model.onnx", "weights.bin"]
    assert art.size_bytes == sum(p.stat().st_size for p in folder.iterdir()) > 256 * 1024
    assert onnxcheck.check_model(art.path, 1 << 30).locations == ("weights.bin",)
    out = run(ort.InferenceSession(str(art.path)))  # external data resolved beside model.onnx
    assert out.shape == (2, 3)
    digest = tree_sha256(folder)
    cache.release(art.key)
    # the tree digest verifies the folder as a unit; a restart indexes the folder with its size
    again = cache_for(tmp_path, bucket)
    await again.start()
    assert again.size_bytes == art.size_bytes
    art2 = await again.acquire(f"s3://{BUCKET}/team-a/external/", digest)
    assert tree_sha256(art2.path.parent) == digest
    again.release(art2.key)
    again.discard(art.key)  # eviction / discard removes the whole folder
    assert not (tmp_path / "cache" / "objects" / art.key).exists()


@pytest.mark.parametrize(("uri", "reason"), [
    (f"s3://{BUCKET}/team-a/missing/model.onnx", "no such object in the bucket"),
    ("s3://no-such-bucket/team-a/model.onnx", "bucket 'no-such-bucket' does not exist"),
    (f"s3://{BUCKET}/team-a/empty/", "no objects under the prefix"),
    (f"s3://{BUCKET}/team-a/nomodel/", "no model.onnx at its top"),
])
async def test_errors_a_user_can_act_on(tmp_path: pathlib.Path, bucket: S3Server, keys: None,
                                        uri: str, reason: str) -> None:
    cache = cache_for(tmp_path, bucket)
    await cache.start()
    with pytest.raises(LoadFailed, match=reason) as err:
        await cache.acquire(uri)
    text = str(err.value)
    assert bucket.endpoint not in text and "meshtest" not in text and str(tmp_path) not in text


async def test_access_denied_says_so(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key S3 refuses (an IAM user without a policy): FAILED with the reason, no key shown."""
    import boto3

    from mesh.cli import procs
    from tests.integration.s3server import start_s3

    server = start_s3(tmp_path / "moto.log", auth_after=4)  # bucket, object, user, key: then IAM
    try:
        anyone = {"endpoint_url": server.endpoint, "region_name": REGION, "aws_access_key_id": "setup",
                  "aws_secret_access_key": "setup"}
        s3 = boto3.client("s3", **anyone)
        s3.create_bucket(Bucket="locked-models")
        s3.put_object(Bucket="locked-models", Key="m/model.onnx", Body=b"onnx" * 100)
        iam = boto3.client("iam", **anyone)
        iam.create_user(UserName="no-policy")
        key = iam.create_access_key(UserName="no-policy")["AccessKey"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        cache = cache_for(tmp_path, server)
        await cache.start()
        with pytest.raises(LoadFailed, match="S3 denied access") as err:
            await cache.acquire("s3://locked-models/m/model.onnx")
        text = str(err.value)
        assert key["AccessKeyId"] not in text and key["SecretAccessKey"] not in text and server.endpoint not in text
        assert not list((tmp_path / "cache" / "tmp").iterdir())
    finally:
        procs.stop(server.proc)


async def test_tenant_prefixes_hold_on_the_pod(tmp_path: pathlib.Path, bucket: S3Server, keys: None) -> None:
    prefixes = TenantPrefixes.parse(f'{{"a": ["s3://{BUCKET}/team-a"]}}', "MESH_RUNTIME_TENANT_STORAGE_PREFIXES")
    cache = cache_for(tmp_path, bucket, prefixes)
    await cache.start()
    art = await cache.acquire(f"s3://{BUCKET}/team-a/single/model.onnx", tenant="a")
    cache.release(art.key)
    with pytest.raises(LoadFailed, match="outside the storage prefixes"):
        await cache.acquire(f"s3://{BUCKET}/team-b/secret/model.onnx", tenant="a")


async def test_credentials_ref_names_s3_keys(tmp_path: pathlib.Path, bucket: S3Server) -> None:
    """No keys in the environment: the model's credentials_ref (a Secret folder) gives them."""
    secret = tmp_path / "creds" / "a" / "store"
    secret.mkdir(parents=True)
    (secret / "AWS_ACCESS_KEY_ID").write_text("meshtestkey")
    (secret / "AWS_SECRET_ACCESS_KEY").write_text("meshtestsecret")
    s3 = S3Provider(S3Config(endpoint_url=bucket.endpoint, region=REGION, addressing_style="path"),
                    Credentials(str(tmp_path / "creds")))
    client = s3.client("s3://x")
    target = tmp_path / "out"
    target.mkdir()
    await client.pull_tree(f"s3://{BUCKET}/team-a/single/model.onnx", str(target), None, Auth("a", "store"))
    assert (target / "model.onnx").stat().st_size > 0
    with pytest.raises(LoadFailed, match="not known to this pod"):
        await client.pull_tree(f"s3://{BUCKET}/team-a/single/model.onnx", str(target), None, Auth("a", "other"))


async def test_file_folder_with_external_data(tmp_path: pathlib.Path, bucket: S3Server) -> None:
    src = save_external(tmp_path / "models" / "ext" / "1")
    cache = cache_for(tmp_path, bucket, file_roots=str(tmp_path / "models"))
    await cache.start()
    art = await cache.acquire(src.as_uri())
    assert sorted(p.name for p in art.path.parent.iterdir()) == ["config.pbtxt", "model.onnx", "weights.bin"]
    assert run(ort.InferenceSession(str(art.path))).shape == (2, 3)
    cache.release(art.key)
    (src / "link").symlink_to(src / "weights.bin")
    with pytest.raises(Exception, match="symbolic link"):
        await cache.acquire(src.as_uri() + "/", "")


def test_external_data_escaping_the_folder_is_refused(tmp_path: pathlib.Path) -> None:
    from tests import badmodels

    for location, reason in (("../weights.bin", "'..'"), ("/etc/passwd", "absolute")):
        folder = tmp_path / location.strip("./").replace("/", "_")
        folder.mkdir()
        demo.save(badmodels.external_model(location), folder / "model.onnx")
        with pytest.raises(LoadFailed, match=reason):
            onnxcheck.check_model(folder / "model.onnx", 1 << 20)
