"""Image references, platforms and the small parsers of the OCI engine (no registry needed)."""

from __future__ import annotations

import base64
import json
import time
from email.utils import formatdate
from pathlib import Path

import pytest

from backends_app.http_retry import retry_after_seconds as parse_retry_after
from backends_app.oci import (
    InvalidReference,
    OCIError,
    Platform,
    RegistryClient,
    RegistryConfig,
    is_loopback_host,
    parse_reference,
)
from backends_app.oci.auth import load_auth_file, parse_challenge
from backends_app.oci.manifest import select_platform

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        (
            "quay.io/go-skynet/local-ai-backends:latest-cpu-llama-cpp",
            "quay.io",
            "go-skynet/local-ai-backends",
            "latest-cpu-llama-cpp",
            None,
        ),
        (
            "docker.io/localai/localai-backends:master-cpu-whisper",
            "docker.io",
            "localai/localai-backends",
            "master-cpu-whisper",
            None,
        ),
        (
            "localai/localai-backends:v3.1.0-cpu-piper",
            "docker.io",
            "localai/localai-backends",
            "v3.1.0-cpu-piper",
            None,
        ),
        ("ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None),
        ("ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("index.docker.io/library/ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None),
        ("localhost:5000/repo:tag", "localhost:5000", "repo", "tag", None),
        ("localhost/repo:tag", "localhost", "repo", "tag", None),
        ("127.0.0.1:5000/a/b/c:1.0", "127.0.0.1:5000", "a/b/c", "1.0", None),
        ("[::1]:5000/repo:tag", "[::1]:5000", "repo", "tag", None),
        (f"repo@{DIGEST}", "docker.io", "library/repo", None, DIGEST),
        (f"quay.io/org/repo:tag@{DIGEST}", "quay.io", "org/repo", "tag", DIGEST),
        ("oci://quay.io/org/repo:tag", "quay.io", "org/repo", "tag", None),
        ("oci://localhost:5000/repo", "localhost:5000", "repo", "latest", None),
        ("  quay.io/org/my_repo.name-x:T_1.2-rc  ", "quay.io", "org/my_repo.name-x", "T_1.2-rc", None),
    ],
)
def test_references_as_galleries_write_them_parse(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)
    assert parse_reference(str(ref)) == ref


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("oci://", "empty"),
        ("quay.io/Org/Repo:tag", "lower-case"),
        ("quay.io/org/repo:bad tag", "bad tag"),
        ("quay.io/org/repo:" + "x" * 200, "bad tag"),
        ("quay.io/org//repo:tag", "lower-case"),
        ("repo@sha256:1234", "invalid digest"),
        ("repo@md5:" + "a" * 32, "unsupported digest algorithm"),
        ("repo@sha256:" + "AB" * 32, "lowercase"),
        ("https://quay.io/org/repo:tag", "unsupported URL scheme"),
        ("quay.io/org/repo:", "bad tag"),
        ("bad_host!:5000/repo:tag", "bad registry host"),
    ],
)
def test_invalid_references_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidReference) as info:
        parse_reference(text)
    assert reason in str(info.value)
    assert isinstance(info.value, OCIError)


def test_a_reference_with_credentials_is_refused_without_echoing_them() -> None:
    with pytest.raises(InvalidReference) as info:
        parse_reference("robot:Sup3rSecret@quay.io/org/repo:tag")
    assert "Sup3rSecret" not in str(info.value)
    assert "per registry host" in str(info.value)


def test_with_digest_pins_and_keeps_the_tag_for_display() -> None:
    ref = parse_reference("quay.io/org/repo:v1")
    pinned = ref.with_digest(DIGEST)
    assert str(pinned) == f"quay.io/org/repo:v1@{DIGEST}"
    assert pinned.identifier == DIGEST
    assert ref.identifier == "v1"
    assert parse_reference(str(pinned)) == pinned
    with pytest.raises(InvalidReference):
        ref.with_digest("sha256:nothex")


def test_docker_hub_is_spoken_to_on_its_api_host() -> None:
    assert parse_reference("ubuntu").api_host == "registry-1.docker.io"
    assert parse_reference("quay.io/a/b").api_host == "quay.io"


@pytest.mark.parametrize(
    ("wanted", "candidate", "match"),
    [
        ("linux/amd64", {"os": "linux", "architecture": "amd64"}, True),
        ("linux/x86_64", {"os": "linux", "architecture": "amd64"}, True),
        ("linux/amd64", {"os": "linux", "architecture": "arm64"}, False),
        ("linux/arm64/v8", {"os": "linux", "architecture": "arm64"}, True),
        ("linux/arm64", {"os": "linux", "architecture": "arm64", "variant": "v8"}, True),
        ("linux/aarch64", {"os": "linux", "architecture": "arm64", "variant": "v8"}, True),
        ("linux/arm/v7", {"os": "linux", "architecture": "arm", "variant": "v6"}, False),
        ("linux/arm/v7", {"os": "linux", "architecture": "arm", "variant": "v7"}, True),
        ("linux/amd64", {"os": "windows", "architecture": "amd64"}, False),
    ],
)
def test_platform_matching_tolerates_variants(wanted: str, candidate: dict[str, str], match: bool) -> None:
    assert Platform.parse(wanted).matches(Platform.from_descriptor(candidate)) is match


def test_index_selection_prefers_the_exact_variant_and_skips_attestations() -> None:
    def entry(digest_byte: str, **platform: str) -> dict[str, object]:
        return {"mediaType": "x", "digest": "sha256:" + digest_byte * 64, "size": 1, "platform": platform}

    index = {
        "manifests": [
            entry("a", os="unknown", architecture="unknown"),
            entry("b", os="linux", architecture="arm", variant="v6"),
            entry("c", os="linux", architecture="arm", variant="v7"),
            entry("d", os="linux", architecture="amd64"),
        ]
    }
    descriptor, found = select_platform(index, Platform.parse("linux/arm/v7"), "test")
    assert descriptor.digest == "sha256:" + "c" * 64
    assert str(found) == "linux/arm/v7"
    with pytest.raises(OCIError, match=r"no manifest for platform linux/s390x.*linux/amd64"):
        select_platform(index, Platform.parse("linux/s390x"), "test")


def test_invalid_platform_is_refused() -> None:
    with pytest.raises(OCIError, match="invalid platform"):
        Platform.parse("amd64")


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert parse_retry_after("3") == 3.0
    now = time.time()
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_bearer_challenges_parse_like_quay_and_docker_hub_send_them() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/ubuntu:pull"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/ubuntu:pull",
    }
    assert parse_challenge('Basic realm="Registry Realm"') == ("basic", {"realm": "Registry Realm"})


def test_docker_config_auths_are_read_per_host(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hubuser:hub:pw").decode()},
                    "quay.io": {"auth": base64.b64encode(b"robot+x:secret").decode()},
                    "ghcr.io": {"username": "u", "password": "p"},
                    "empty.example": {},
                }
            }
        )
    )
    assert load_auth_file(config) == {
        "docker.io": ("hubuser", "hub:pw"),
        "quay.io": ("robot+x", "secret"),
        "ghcr.io": ("u", "p"),
    }
    client = RegistryClient(RegistryConfig(auth_file=config, credentials={"quay.io": ("other", "pw2")}))
    # Explicit credentials win over the file.
    assert client._credentials.for_reference(parse_reference("quay.io/a/b")) == ("other", "pw2")
    assert client._credentials.for_reference(parse_reference("ubuntu")) == ("hubuser", "hub:pw")


def test_a_malformed_auth_file_entry_is_named_without_its_content(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {"quay.io": {"auth": "!!!not-base64-s3cret!!!"}}}))
    with pytest.raises(OCIError) as info:
        RegistryClient(RegistryConfig(auth_file=config))
    assert "quay.io" in str(info.value)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost:5000", True),
        ("127.0.0.1:5000", True),
        ("127.8.9.10", True),
        ("[::1]:5000", True),
        ("quay.io", False),
        ("10.0.0.1:5000", False),
        ("localhost.evil.example", False),
    ],
)
def test_loopback_hosts_are_recognised(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback
