"""Fleets in object stores: an s3:// prefix is searched like a directory, against a real S3 API on loopback (moto's
server), with only the needed bytes read and every listing or access failure one line with exit code 2."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BAD, GOOD, ROOT, run_process

pytest.importorskip("s3fs", reason="needs bncheck[s3]")
pytest.importorskip("moto.moto_server.werkzeug_app", reason="needs moto[server]")

# after the skips: it imports moto's server
from s3_server import S3Server

BUCKET = "fleet"
KEY_ID, SECRET = "testing", "testing"
# a user that may list and read the bucket but not the objects under registry/good/denied/
READER_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": ["s3:ListBucket", "s3:GetObject"],
            "Resource": ["arn:aws:s3:::fleet", "arn:aws:s3:::fleet/*"],
        },
        {"Effect": "Deny", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::fleet/registry/good/denied/*"},
    ],
}
# the checkpoint a Hugging Face config.json gives its BN014 finding: a URL's config.json is not read
NEEDS_CONFIG_JSON = "BN014-hf-efficientnet"


def checkpoint_files(folder: Path) -> list[Path]:
    """The files directly in a fixture folder that a search picks up: checkpoint suffixes only (an ONNX model's
    external data file is not one)."""
    from bncheck.loaders import checkpoint_suffixes

    return [p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(checkpoint_suffixes())]


def _registry(folder: Path) -> Path:
    """The fleet as a local folder: healthy and defective checkpoints under nested folders, a shard set, a
    non-checkpoint file, a dot-folder and a checkpoint whose reads will be denied."""
    for source, target in ((GOOD, folder / "good"), (BAD, folder / "bad" / "2026")):
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(NEEDS_CONFIG_JSON))
    (folder / "README.txt").write_text("the model registry\n")
    (folder / ".trash").mkdir()
    shutil.copy(GOOD / "mlp-state-dict.pt", folder / ".trash" / "old.pt")
    (folder / "good" / "denied").mkdir()
    shutil.copy(GOOD / "conv1d.safetensors", folder / "good" / "denied" / "conv1d.safetensors")
    return folder


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _registry(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="session")
def large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 134 MB checkpoints (.safetensors and .pt) of 8 BatchNorm1d layers between 2048x2048 linear layers."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "bench"))
    from checkpoints import big_state_dict

    folder = tmp_path_factory.mktemp("large")
    state = big_state_dict(layers=8, width=2048)
    save_file(state, str(folder / "big.safetensors"))
    torch.save(state, folder / "big.pt")
    return folder


@pytest.fixture(scope="session")
def s3(registry: Path, large: Path) -> Iterator[tuple[S3Server, dict[str, str]]]:
    """The loopback S3 server with the bucket filled, and the IAM keys of a reader and of a user with no rights."""
    import boto3

    with S3Server() as server:
        kwargs = {
            "endpoint_url": server.url,
            "region_name": "us-east-1",
            "aws_access_key_id": KEY_ID,
            "aws_secret_access_key": SECRET,
        }
        client = boto3.client("s3", **kwargs)
        client.create_bucket(Bucket=BUCKET)
        for prefix, folder in (("registry", registry), ("large", large)):
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                with path.open("rb") as body:
                    client.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=body)
        iam = boto3.client("iam", **kwargs)
        keys = {}
        for user, policy in (("reader", READER_POLICY), ("nobody", None)):
            iam.create_user(UserName=user)
            if policy is not None:
                iam.put_user_policy(UserName=user, PolicyName="fleet", PolicyDocument=json.dumps(policy))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = f"{key['AccessKeyId']}:{key['SecretAccessKey']}"
        yield server, keys


@pytest.fixture
def s3_env(s3: tuple[S3Server, dict[str, str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    """The environment a user of the loopback server has: keys in the environment, the endpoint in
    AWS_ENDPOINT_URL_S3 (read by botocore itself), no config files and no instance metadata to fall back on."""
    import s3fs

    server, _ = s3
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.url)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # fsspec keeps one S3 file system per process, with the credentials it found first
    s3fs.S3FileSystem.clear_instance_cache()
    yield server
    s3fs.S3FileSystem.clear_instance_cache()


def _files(result) -> dict[str, dict]:
    """The report's files by path, from the in-process CLI or a process."""
    document = result.json() if hasattr(result, "json") else json.loads(result.stdout)
    return {file["path"]: file for file in document["files"]}


def test_a_prefix_is_searched_like_a_directory_with_4_processes(s3_env: S3Server, registry: Path) -> None:
    """The whole registry, in 4 processes started as users start bncheck, gives what the local copy gives."""
    remote = run_process("inspect", f"s3://{BUCKET}/registry/", "-j", "4", "--json", env=dict(os.environ))
    local = run_process("inspect", registry, "--json")
    assert remote.returncode == local.returncode == 1, remote.stderr
    assert "Traceback" not in remote.stderr
    remote_files = {path.removeprefix(f"s3://{BUCKET}/registry/"): f for path, f in _files(remote).items()}
    local_files = {Path(path).relative_to(registry).as_posix(): f for path, f in _files(local).items()}
    assert list(remote_files) == list(local_files)
    assert "good/conv1d-sharded/model.safetensors.index.json" in remote_files  # the index stands for its shards
    assert not any("model-0000" in name or ".trash" in name or name.endswith(".txt") for name in remote_files)
    assert len(remote_files) == len(list(checkpoint_files(GOOD))) + 2 + len(list(checkpoint_files(BAD)))
    for name, file in remote_files.items():
        for key in ("format", "size_bytes", "error", "layers", "findings"):
            assert file[key] == local_files[name][key], (name, key)
    assert sum(len(file["findings"]) for file in remote_files.values()) > 25


def test_a_prefix_without_its_slash_and_exclude_globs(cli, s3_env: S3Server) -> None:
    # a name glob, and one on the path below the prefix: "*/*" matches every file in a subfolder
    result = cli("inspect", f"s3://{BUCKET}/registry/good", "--exclude", "mlp-*", "--exclude", "*/*", "--json")
    assert result.exit_code == 0, result.stderr
    names = sorted(path.rpartition("/")[2] for path in _files(result))
    expected = sorted(p.name for p in checkpoint_files(GOOD) if not p.name.startswith("mlp-"))
    assert names == expected


def _listings(log: list[str]) -> list[str]:
    return [line for line in log if "list-type=" in line]


def test_a_large_checkpoint_costs_under_1_percent_of_its_bytes(cli, s3_env: S3Server, large: Path) -> None:
    size = sum(path.stat().st_size for path in large.iterdir())
    s3_env.reset_counts()
    result = cli("inspect", f"s3://{BUCKET}/large/", "--json")
    served, requests, log = s3_env.bytes_served, s3_env.requests, list(s3_env.log)
    assert result.exit_code == 0, result.stderr
    assert [(len(file["layers"]), file["size_bytes"]) for file in result.json()["files"]] == [
        (8, (large / "big.pt").stat().st_size),
        (8, (large / "big.safetensors").stat().st_size),
    ]
    assert served < 0.01 * size, f"read {served} of {size} bytes ({served / size:.3%})"
    assert _listings(log) == [f"GET /{BUCKET}?list-type=2&prefix=large%2F&delimiter=&encoding-type=url"]
    # then per file its size, its header (or zip directory and data.pkl) and about one prefetched block per layer
    assert requests < 50, log


def test_a_checkpoint_url_is_read_without_listing(cli, s3_env: S3Server) -> None:
    from bncheck.loaders import SNIFF_BYTES

    path = GOOD / "conv1d.safetensors"
    s3_env.reset_counts()
    assert cli("inspect", f"s3://{BUCKET}/registry/good/conv1d.safetensors").exit_code == 0
    # its size, the first bytes, the header's length and the header, the BatchNorm tensors
    assert s3_env.log == [f"HEAD /{BUCKET}/registry/good/conv1d.safetensors"] + 4 * [
        f"GET /{BUCKET}/registry/good/conv1d.safetensors"
    ]
    assert s3_env.bytes_served == path.stat().st_size + SNIFF_BYTES  # the first bytes twice: to sniff, as the header


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://no-such-bucket/models/", "not found: s3://no-such-bucket/models/ (The specified bucket does not exist)"),
        (
            "s3://no-such-bucket/model.pt",
            "not found: s3://no-such-bucket/model.pt (The specified bucket does not exist)",
        ),
        (f"s3://{BUCKET}/registry/missing.pt", f"not found: s3://{BUCKET}/registry/missing.pt"),
        (f"s3://{BUCKET}/registry/missing", f"not found: s3://{BUCKET}/registry/missing"),
        (f"s3://{BUCKET}/nothing/", "no checkpoint files under this prefix"),
    ],
)
def test_a_missing_bucket_object_or_prefix_is_one_line(cli, s3_env: S3Server, url: str, message: str) -> None:
    result = cli("inspect", url, "--json")
    assert result.exit_code == 2
    assert result.stderr == f"bncheck: {url}: {message}\n"  # the JSON holds it too; a person reads it here


def _as(monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    import s3fs

    key_id, _, secret = key.partition(":")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def iam_enforced() -> Iterator[None]:
    """moto checks signatures and IAM policies (it allows everything otherwise)."""
    from moto.core.authorization import enable_iam_authentication

    with enable_iam_authentication():
        yield


def test_an_object_the_reader_may_not_read_is_one_line_among_the_others(
    cli, s3: tuple[S3Server, dict[str, str]], s3_env: S3Server, iam_enforced: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _as(monkeypatch, s3[1]["reader"])
    result = cli("inspect", f"s3://{BUCKET}/registry/good/", "--json")
    denied = f"s3://{BUCKET}/registry/good/denied/conv1d.safetensors"
    assert result.exit_code == 2
    assert result.stderr == f"bncheck: {denied}: access denied: {denied} (Forbidden)\n"
    files = _files(result)
    assert [path for path, file in files.items() if file["error"]] == [denied]
    assert (
        len(files) == len(list(checkpoint_files(GOOD))) + 2 and sum(len(file["layers"]) for file in files.values()) > 30
    )


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        ("nobody", "Access Denied"),  # a known user without the right to list
        ("AKIAUNKNOWNKEY000000:secret", "The AWS Access Key Id you provided does not exist in our records."),
    ],
)
def test_a_listing_refused_is_one_line(
    cli,
    s3: tuple[S3Server, dict[str, str]],
    s3_env: S3Server,
    iam_enforced: None,
    monkeypatch: pytest.MonkeyPatch,
    who: str,
    reason: str,
) -> None:
    _as(monkeypatch, s3[1].get(who, who))
    url = f"s3://{BUCKET}/registry/"
    result = cli("inspect", url, "--json")
    assert result.exit_code == 2
    (file,) = result.json()["files"]
    assert file["error"] == {"code": "unreadable", "message": f"access denied: {url} ({reason})"}


@pytest.mark.parametrize("url", [f"s3://{BUCKET}/registry/", f"s3://{BUCKET}/registry/good/conv1d.safetensors"])
def test_missing_credentials_are_one_line(cli, s3_env: S3Server, monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    result = run_process("inspect", url, "--json", env=dict(os.environ))
    assert result.returncode == 2
    assert result.stderr.startswith(f"bncheck: {url}: no credentials for {url} (Unable to locate credentials); ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_any_fsspec_file_system_is_searched_the_same_way(cli, registry: Path) -> None:
    """memory:// stands for the other backends (gs://, az://...): the listing goes through fsspec alone."""
    import fsspec

    memory = fsspec.filesystem("memory")
    try:
        for path in (p for p in (registry / "good").rglob("*") if p.is_file()):
            memory.pipe(f"/fleet/{path.relative_to(registry).as_posix()}", path.read_bytes())
        memory.pipe("/fleet/good/notes.txt", b"not a checkpoint")
        result = cli("inspect", "memory://fleet/", "--json")
    finally:
        memory.rm("/fleet", recursive=True)
    assert result.exit_code == 0, result.stderr
    names = [path.removeprefix("memory://fleet/good/") for path in _files(result)]
    shard_index, denied = "conv1d-sharded/model.safetensors.index.json", "denied/conv1d.safetensors"
    assert names == sorted([p.name for p in checkpoint_files(GOOD)] + [shard_index, denied])


def test_a_web_server_folder_is_refused_in_one_line(cli, tmp_path: Path) -> None:
    from range_server import RangeServer

    shutil.copy(GOOD / "conv1d.safetensors", tmp_path / "c.safetensors")
    with RangeServer(tmp_path) as server:
        result = cli("inspect", f"{server.url}/", "--json")
        requests = server.requests
    assert result.exit_code == 2
    assert result.stderr == (
        f"bncheck: {server.url}/: {server.url}/ names a folder, but a web server has no listing to search: "
        "name each checkpoint file\n"
    )
    assert requests == 0


def test_a_report_pickles(s3_env: S3Server) -> None:
    """The library's unit of work for a cluster: what it returns crosses process boundaries whole."""
    import pickle

    import bncheck

    missing = f"s3://{BUCKET}/registry/missing.pt"
    report = bncheck.inspect([f"s3://{BUCKET}/registry/bad/2026/BN016-saved-in-train-mode.pt", missing])
    assert [bool(file.findings) for file in report.files] == [True, False] and report.files[1].error is not None
    assert pickle.loads(pickle.dumps(report)) == report


def _readme_dask_example() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (block,) = [block for block in re.findall(r"```python\n(.*?)\n```", readme, flags=re.DOTALL) if "dask" in block]
    return block


def test_the_readme_dask_example_gives_the_serial_result(s3_env: S3Server) -> None:
    """The README's example, run as it is on a LocalCluster of two worker processes against the loopback bucket
    (the workers inherit the environment, so they find the endpoint and the keys as the driver does)."""
    distributed = pytest.importorskip("dask.distributed", reason="needs dask[distributed]")
    import bncheck

    example = _readme_dask_example()
    assert "Client()" in example and "s3://models/registry/" in example
    prefix = f"s3://{BUCKET}/registry/bad/"
    serial = [bncheck.inspect(url) for url in bncheck.find_checkpoints(prefix)]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        namespace: dict[str, Any] = {}
        exec(
            example.replace("Client()", f"Client({cluster.scheduler_address!r})").replace(
                "s3://models/registry/", prefix
            ),
            namespace,
        )
        client = namespace["client"]
        try:
            workers = set().union(*client.who_has(namespace["futures"]).values())
        finally:
            client.close()
    assert namespace["reports"] == serial
    assert sum(len(report.files[0].findings) for report in serial) > 25
    assert len(workers) == 2  # both worker processes did some of the work
