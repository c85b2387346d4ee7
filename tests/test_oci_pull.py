"""Resolve and pull against a real docker-registry: round trips, platforms, corruption, auth, faults."""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from backends_app.oci import (
    AllSourcesFailed,
    AuthError,
    DigestMismatch,
    NotFound,
    PlatformNotFound,
    PullProgress,
    RegistryClient,
    RegistryConfig,
    RegistryUnavailable,
    Symlink,
    UnsafeArchive,
    publish,
)
from backends_app.oci.publish import layer_from_tar, publish_files, push_image
from tests.registry import Fault, FaultProxy, RegistryServer, non_loopback_address
from tests.test_oci_unpack import _file, make_tar

pytestmark = pytest.mark.registry

# Few retries, short backoff. The client's default timeouts stay: a registry on a loaded machine
# may take seconds to answer. DEAD_HOST adds short timeouts, only for hosts that never answer.
FAST: dict[str, Any] = {"retries": 1, "backoff": 0.05}
DEAD_HOST: dict[str, Any] = {**FAST, "timeout": (0.5, 0.5)}


def tree(root: Path) -> dict[str, tuple[str, int, bytes | str | None]]:
    """path -> (kind, permission bits, content or link target)."""
    found: dict[str, tuple[str, int, bytes | str | None]] = {}
    for current, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(current) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", stat.S_IMODE(st.st_mode), None)
            else:
                found[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return found


@pytest.fixture
def backend_dir(tmp_path: Path) -> Path:
    """A backend directory like LocalAI's: run.sh, a binary, libraries, a symlink, a hard link."""
    root = tmp_path / "backend-src"
    (root / "lib" / "python").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "run.sh").write_text('#!/bin/bash\nexec ./bin/server "$@"\n')
    (root / "run.sh").chmod(0o755)
    (root / "bin").mkdir()
    (root / "bin" / "server").write_bytes(os.urandom(300_000))
    (root / "bin" / "server").chmod(0o750)
    (root / "lib" / "libfoo.so.1").write_bytes(os.urandom(50_000) + bytes(200_000))
    (root / "lib" / "libfoo.so").symlink_to("libfoo.so.1")
    (root / "lib" / "python" / "mod.py").write_text("print('hi')\n" * 100)
    os.link(root / "lib" / "python" / "mod.py", root / "lib" / "python" / "same.py")
    return root


def test_publish_then_pull_round_trips_byte_for_byte_with_exec_bits(
    registry: RegistryServer, backend_dir: Path, tmp_path: Path
) -> None:
    ref = registry.ref(registry.unique_repo("roundtrip"), "1.2.3")
    with registry.client() as client:
        digest = publish(backend_dir, ref, version="1.2.3", client=client)
        result = client.pull(ref, tmp_path / "staging")
    assert tree(result.dest) == tree(backend_dir)
    assert result.digest == result.manifest_digest == digest
    assert result.index_digest is None
    assert result.version == "1.2.3"
    assert result.reference.digest == digest
    assert result.source == ref
    assert result.bytes_downloaded == result.resolved.total_compressed_size
    assert result.size_on_disk == 300_000 + 250_000 + len("print('hi')\n" * 100) + len(
        '#!/bin/bash\nexec ./bin/server "$@"\n'
    )
    assert (result.dest / "lib/python/mod.py").stat().st_ino == (
        result.dest / "lib/python/same.py"
    ).stat().st_ino


def test_publishing_the_same_tree_twice_gives_the_same_digest(
    registry: RegistryServer, backend_dir: Path
) -> None:
    repo = registry.unique_repo("reproducible")
    with registry.client() as client:
        first = publish(backend_dir, registry.ref(repo, "a"), version="1", client=client)
        second = publish(backend_dir, registry.ref(repo, "b"), version="1", client=client)
    assert first == second


def test_an_index_with_two_platforms_pulls_the_right_one(registry: RegistryServer, tmp_path: Path) -> None:
    ref = registry.push_platforms(
        {
            "linux/amd64": {"run.sh": ("#!/bin/sh\necho amd64\n", 0o755)},
            "linux/arm64/v8": {"run.sh": ("#!/bin/sh\necho arm64\n", 0o755)},
        },
        version="2.0",
    )
    with registry.client(platform="linux/amd64") as client:
        arm = client.resolve(ref, platform="linux/arm64")
        amd = client.resolve(ref)
        assert arm.index_digest == amd.index_digest == client.head_digest(ref)
        assert arm.manifest_digest != amd.manifest_digest
        assert (arm.platform, amd.platform) == ("linux/arm64/v8", "linux/amd64")
        assert arm.version == "2.0"
        pulled = client.pull(ref, tmp_path / "arm", platform="linux/arm64")
        assert (pulled.dest / "run.sh").read_text() == "#!/bin/sh\necho arm64\n"
        assert pulled.manifest_digest == arm.manifest_digest
        assert pulled.index_digest == arm.index_digest
        default = client.pull(ref, tmp_path / "amd")
        assert (default.dest / "run.sh").read_text() == "#!/bin/sh\necho amd64\n"
        with pytest.raises(PlatformNotFound, match=r"linux/s390x.*linux/amd64, linux/arm64/v8"):
            client.resolve(ref, platform="linux/s390x")


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_zstd_and_uncompressed_layers_pull(
    registry: RegistryServer, tmp_path: Path, compression: str
) -> None:
    ref = registry.push_image([{"a": "lower"}, {"b": ("upper", 0o755)}], compression=compression)
    with registry.client() as client:
        result = client.pull(ref, tmp_path / "out")
    assert tree(result.dest) == {"a": ("file", 0o644, b"lower"), "b": ("file", 0o755, b"upper")}


def test_docker_v2_manifests_and_manifest_lists_pull(registry: RegistryServer, tmp_path: Path) -> None:
    single = registry.push_image({"run.sh": ("docker v2", 0o755)}, docker=True)
    listed = registry.push_platforms({"linux/amd64": {"x": "amd"}, "linux/arm64": {"x": "arm"}}, docker=True)
    with registry.client() as client:
        resolved = client.resolve(single)
        assert resolved.media_type == "application/vnd.docker.distribution.manifest.v2+json"
        assert (client.pull(single, tmp_path / "one").dest / "run.sh").read_text() == "docker v2"
        result = client.pull(listed, tmp_path / "two", platform="linux/arm64")
        assert (result.dest / "x").read_text() == "arm"
        assert result.index_digest is not None


def test_a_blob_corrupted_in_registry_storage_is_refused_and_nothing_is_left(
    registry: RegistryServer, tmp_path: Path
) -> None:
    ref = registry.push_image([{"a": os.urandom(1000)}, {"big": os.urandom(200_000)}])
    with registry.client() as client:
        resolved = client.resolve(ref)
        blob = registry.blob_path(resolved.layers[1].digest)
        size = blob.stat().st_size
        blob.write_bytes(os.urandom(size))  # same size, different bytes
        staging = tmp_path / "staging"
        staging.mkdir()
        with pytest.raises(DigestMismatch) as info:
            client.pull(resolved, staging / "backend")
    assert resolved.layers[1].digest in str(info.value)
    assert list(staging.iterdir()) == []


def test_a_manifest_corrupted_in_registry_storage_is_refused(
    registry: RegistryServer, tmp_path: Path
) -> None:
    ref = registry.push_image({"a": "b"}, version="1.0.0")
    with registry.client() as client:
        digest = client.head_digest(ref)
        path = registry.blob_path(digest)
        # Still a manifest the registry can parse (it does, to serve it), but not the pushed one.
        path.write_bytes(path.read_bytes().replace(b'"1.0.0"', b'"6.6.6"'))
        with pytest.raises(DigestMismatch, match=digest.split(":")[1][:12]):
            client.resolve(ref)
    assert not (tmp_path / "out").exists()


def test_a_hostile_image_from_the_registry_is_refused_with_nothing_written(
    registry: RegistryServer, tmp_path: Path
) -> None:
    layer = layer_from_tar(make_tar([_file("ok", b"fine"), _file("../ab/pwned", b"gotcha")]))
    ref = registry.ref(registry.unique_repo("hostile"))
    target_parent = tmp_path / "x"
    target_parent.mkdir()
    with registry.client() as client:
        push_image(client, ref, {"linux/amd64": [layer]})
        with pytest.raises(UnsafeArchive, match=r"'\.\./ab/pwned'"):
            client.pull(ref, target_parent / "a")
    assert list(target_parent.iterdir()) == []


def test_the_periodic_check_costs_one_head_and_a_pull_one_get_per_layer(
    registry: RegistryServer, tmp_path: Path
) -> None:
    ref = registry.push_image([{"a": "1"}, {"b": "2"}, {"c": "3"}])
    with registry.client() as client:
        digest = client.head_digest(ref)  # first contact: the scheme is found here
        client.reset_request_counts()
        assert client.head_digest(ref) == digest
        assert client.request_counts == {"HEAD": 1}
        client.reset_request_counts()
        resolved = client.resolve(ref)
        assert client.request_counts == {"HEAD": 1, "GET": 1}
        client.reset_request_counts()
        client.pull(resolved, tmp_path / "out")
        assert client.request_counts == {"GET": 3}


def test_a_missing_tag_is_not_found(registry: RegistryServer) -> None:
    ref = registry.push_image({"a": "b"})
    with registry.client() as client, pytest.raises(NotFound, match="manifest not found"):
        client.resolve(ref.rsplit(":", 1)[0] + ":no-such-tag")


def test_progress_reports_bytes_per_layer_and_overall(registry: RegistryServer, tmp_path: Path) -> None:
    ref = registry.push_image([{"a": os.urandom(100_000)}, {"b": os.urandom(100_000)}])
    calls: list[PullProgress] = []
    with registry.client() as client:
        result = client.pull(ref, tmp_path / "out", progress=calls.append)
    assert calls[0].done == 0
    assert calls[-1].done == calls[-1].total == result.bytes_downloaded
    assert [(c.layer_index, c.layer_count) for c in calls if c.layer_done == c.layer_total] == [
        (0, 2),
        (1, 2),
    ]


def test_one_client_serves_a_thread_pool(registry: RegistryServer) -> None:
    ref = registry.push_image({"a": "b"})
    with registry.client() as client:
        expected = client.head_digest(ref)
        client.reset_request_counts()
        results: list[str] = []
        threads = [
            threading.Thread(target=lambda: results.append(client.head_digest(ref))) for _ in range(16)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [expected] * 16
        assert client.request_counts == {"HEAD": 16}


# -- auth -------------------------------------------------------------------------------------------------


def test_a_basic_auth_registry_works_with_the_right_password(
    auth_registry_factory: Callable[[str, str], RegistryServer], tmp_path: Path
) -> None:
    server = auth_registry_factory("portal", "right-password-123")
    ref = server.push_image({"run.sh": ("#!/bin/sh\n", 0o755)}, version="1")
    with server.client() as client:
        result = client.pull(ref, tmp_path / "out")
    assert (result.dest / "run.sh").read_text() == "#!/bin/sh\n"


def test_a_wrong_password_fails_fast_and_clearly_without_showing_it(
    auth_registry_factory: Callable[[str, str], RegistryServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = auth_registry_factory("portal", "right-password-123")
    ref = server.push_image({"a": "b"})
    wrong = "Wr0ng-S3cret-pw"
    caplog.set_level("DEBUG")
    started = time.monotonic()
    with (
        server.client(credentials={server.host: ("portal", wrong)}) as client,
        pytest.raises(AuthError) as info,
    ):
        client.resolve(ref)
    assert time.monotonic() - started < 30  # at once, not after minutes of retries
    message = str(info.value)
    assert server.host in message and "rejected" in message
    assert wrong not in message and wrong not in repr(info.value)
    assert base64.b64encode(f"portal:{wrong}".encode()).decode() not in message
    assert wrong not in caplog.text


def test_credentials_come_from_a_docker_config_json(
    auth_registry_factory: Callable[[str, str], RegistryServer], tmp_path: Path
) -> None:
    server = auth_registry_factory("portal", "right-password-123")
    ref = server.push_image({"a": "b"})
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {"auths": {server.host: {"auth": base64.b64encode(b"portal:right-password-123").decode()}}}
        )
    )
    with RegistryClient(RegistryConfig(auth_file=config, **FAST)) as client:
        assert client.head_digest(ref).startswith("sha256:")


def test_missing_credentials_are_reported_as_such(
    auth_registry_factory: Callable[[str, str], RegistryServer],
) -> None:
    server = auth_registry_factory("portal", "right-password-123")
    ref = server.push_image({"a": "b"})
    with (
        RegistryClient(RegistryConfig(**FAST)) as client,
        pytest.raises(AuthError, match="none are configured"),
    ):
        client.head_digest(ref)


def test_anonymous_bearer_tokens_are_fetched_once_then_reused(
    token_registry: RegistryServer, tmp_path: Path
) -> None:
    ref = token_registry.push_image({"run.sh": ("#!/bin/sh\n", 0o755)})
    with RegistryClient(RegistryConfig(timeout=(2, 10), retries=1)) as anonymous:
        digest = anonymous.head_digest(ref)
        assert anonymous.request_counts == {"HEAD": 2, "GET": 1}  # the 401, the token, the HEAD
        anonymous.reset_request_counts()
        assert anonymous.head_digest(ref) == digest
        assert anonymous.request_counts == {"HEAD": 1}
        result = anonymous.pull(ref, tmp_path / "out")
    assert (result.dest / "run.sh").read_text() == "#!/bin/sh\n"


def test_a_token_service_refusing_the_password_is_a_clear_auth_error(token_registry: RegistryServer) -> None:
    ref = token_registry.push_image({"a": "b"})
    wrong = "not-the-push-secret"
    config = RegistryConfig(timeout=(2, 10), retries=1, credentials={token_registry.host: ("pusher", wrong)})
    with RegistryClient(config) as client, pytest.raises(AuthError) as info:
        client.head_digest(ref)
    assert "rejected the configured credentials" in str(info.value)
    assert wrong not in str(info.value)


def test_anonymous_push_to_a_token_registry_is_denied(token_registry: RegistryServer) -> None:
    ref = token_registry.ref(token_registry.unique_repo("denied"))
    anonymous = RegistryClient(RegistryConfig(timeout=(2, 10), retries=1))
    with anonymous, pytest.raises(AuthError, match="denied anonymous access"):
        publish_files({"a": "b"}, ref, client=anonymous)


# -- faults ----------------------------------------------------------------------------------------------


def test_a_closed_port_fails_within_the_timeout(closed_port: int) -> None:
    started = time.monotonic()
    with RegistryClient(RegistryConfig(**DEAD_HOST)) as client, pytest.raises(RegistryUnavailable) as info:
        client.head_digest(f"127.0.0.1:{closed_port}/repo:tag")
    assert time.monotonic() - started < 30  # refused at once, not retried for minutes
    assert f"127.0.0.1:{closed_port} unreachable after 2 attempts" in str(info.value)


def test_a_port_that_never_answers_fails_within_the_timeout(silent_port: int) -> None:
    started = time.monotonic()
    with (
        RegistryClient(RegistryConfig(**DEAD_HOST)) as client,
        pytest.raises(RegistryUnavailable, match="unreachable"),
    ):
        client.head_digest(f"127.0.0.1:{silent_port}/repo:tag")
    # (retries + 1) * timeout plus the backoff (about 1 s), with slack for a loaded machine; not minutes.
    assert time.monotonic() - started < 30


def _proxied(server: RegistryServer, proxy: FaultProxy, ref: str) -> str:
    return ref.replace(server.host, proxy.host)


def test_plain_http_is_used_only_for_hosts_marked_insecure(
    registry: RegistryServer, fault_proxy_factory: Callable[..., FaultProxy]
) -> None:
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to serve a plain-HTTP registry on")
    ref = registry.push_image({"a": "b"})
    proxy = fault_proxy_factory(registry.host, bind=address)  # plain HTTP, not on loopback
    remote = _proxied(registry, proxy, ref)
    with (
        RegistryClient(RegistryConfig(**FAST)) as strict,
        pytest.raises(RegistryUnavailable, match="SSLError"),
    ):
        strict.head_digest(remote)
    assert proxy.log == []  # nothing was ever sent in clear text
    with RegistryClient(RegistryConfig(insecure_hosts=[proxy.host], **FAST)) as relaxed:
        assert relaxed.head_digest(remote) == registry.client().head_digest(ref)


def test_429_with_retry_after_is_waited_for_then_succeeds(
    registry: RegistryServer, fault_proxy_factory: Callable[[str], FaultProxy]
) -> None:
    ref = registry.push_image({"a": "b"})
    proxy = fault_proxy_factory(registry.host)
    proxy.add(
        Fault(
            lambda method, path: method == "HEAD" and "/manifests/" in path,
            status=429,
            headers={"Retry-After": "1"},
        )
    )
    started = time.monotonic()
    with registry.client(max_retry_wait=5) as client:
        digest = client.head_digest(_proxied(registry, proxy, ref))
    assert time.monotonic() - started >= 1.0
    assert digest.startswith("sha256:")
    statuses = [status for _, method, _, status in proxy.log if method == "HEAD"]
    assert statuses == [429, 200]


def test_503_with_an_http_date_retry_after_is_honoured(
    registry: RegistryServer, fault_proxy_factory: Callable[[str], FaultProxy], tmp_path: Path
) -> None:
    ref = registry.push_image({"a": "b"})
    proxy = fault_proxy_factory(registry.host)
    proxy.add(
        Fault(
            lambda method, path: method == "GET" and "/blobs/" in path,
            status=503,
            headers={"Retry-After": formatdate(time.time() + 2, usegmt=True)},
        )
    )
    started = time.monotonic()
    with registry.client(max_retry_wait=5) as client:
        result = client.pull(_proxied(registry, proxy, ref), tmp_path / "out")
    assert time.monotonic() - started >= 0.9  # the date has one-second resolution
    assert (result.dest / "a").read_text() == "b"


def test_a_retry_after_beyond_the_max_wait_fails_at_once(
    registry: RegistryServer, fault_proxy_factory: Callable[[str], FaultProxy]
) -> None:
    ref = registry.push_image({"a": "b"})
    proxy = fault_proxy_factory(registry.host)
    proxy.add(Fault(lambda method, path: "/manifests/" in path, status=429, headers={"Retry-After": "3600"}))
    started = time.monotonic()
    with (
        registry.client(max_retry_wait=5) as client,
        pytest.raises(RegistryUnavailable, match="retry after 3600s"),
    ):
        client.head_digest(_proxied(registry, proxy, ref))
    assert time.monotonic() - started < 30  # at once, not after the hour asked for


def test_a_connection_lost_mid_layer_resumes_with_a_range_request(
    registry: RegistryServer, fault_proxy_factory: Callable[[str], FaultProxy], tmp_path: Path
) -> None:
    payload = os.urandom(400_000)
    ref = registry.push_image({"big": payload})
    proxy = fault_proxy_factory(registry.host)
    proxy.add(Fault(lambda method, path: method == "GET" and "/blobs/" in path, truncate_after=150_000))
    with registry.client() as client:
        resolved = client.resolve(_proxied(registry, proxy, ref))
        result = client.pull(resolved, tmp_path / "out")
    assert (result.dest / "big").read_bytes() == payload
    assert result.bytes_downloaded == resolved.total_compressed_size
    blob_statuses = [status for _, method, path, status in proxy.log if "/blobs/" in path]
    assert blob_statuses == [200, 206]


def _blob_get(method: str, path: str) -> bool:
    return method == "GET" and "/blobs/" in path


def test_a_layer_trickling_below_the_low_speed_limit_is_cut_off_and_resumed(
    registry: RegistryServer, fault_proxy_factory: Callable[[str], FaultProxy], tmp_path: Path
) -> None:
    payload = os.urandom(400_000)
    ref = registry.push_image({"big": payload})
    proxy = fault_proxy_factory(registry.host)
    # A byte every half second: never silent long enough for the read timeout to notice.
    proxy.add(Fault(_blob_get, trickle_after=150_000, trickle_every=0.5))
    with registry.client(speed_limit=1000, speed_time=2) as client:
        resolved = client.resolve(_proxied(registry, proxy, ref))
        result = client.pull(resolved, tmp_path / "out")
    assert (result.dest / "big").read_bytes() == payload
    assert result.bytes_downloaded == resolved.total_compressed_size
    blob_statuses = [status for _, method, path, status in proxy.log if "/blobs/" in path]
    assert blob_statuses == [200, 206]  # resumed where the trickle was cut off


def test_a_registry_that_keeps_trickling_fails_the_pull_naming_the_low_speed_limit(
    registry: RegistryServer, fault_proxy_factory: Callable[[str], FaultProxy], tmp_path: Path
) -> None:
    ref = registry.push_image({"big": os.urandom(400_000)})
    proxy = fault_proxy_factory(registry.host)
    proxy.add(Fault(_blob_get, trickle_after=1000, trickle_every=0.5, times=10))
    started = time.monotonic()
    with (
        registry.client(speed_limit=1000, speed_time=1, retries=1) as client,
        pytest.raises(RegistryUnavailable) as info,
    ):
        client.pull(_proxied(registry, proxy, ref), tmp_path / "out")
    message = str(info.value)
    assert "low-speed limit of 1000 bytes/s over 1 s" in message, message
    assert "2 attempt(s)" in message
    # Seconds, where the trickle would take days; generous for a loaded machine.
    assert time.monotonic() - started < 60
    assert not (tmp_path / "out").exists()


def test_a_blob_past_its_deadline_fails_the_pull_naming_the_deadline(
    registry: RegistryServer, fault_proxy_factory: Callable[[str], FaultProxy], tmp_path: Path
) -> None:
    ref = registry.push_image({"big": os.urandom(400_000)})
    proxy = fault_proxy_factory(registry.host)
    # 2000 bytes/s: above the low-speed limit, far too slow for the deadline.
    proxy.add(Fault(_blob_get, trickle_after=0, trickle_bytes=200, trickle_every=0.1, times=10))
    started = time.monotonic()
    with (
        registry.client(speed_limit=100, speed_time=1, blob_deadline=3) as client,
        pytest.raises(RegistryUnavailable) as info,
    ):
        client.pull(_proxied(registry, proxy, ref), tmp_path / "out")
    message = str(info.value)
    assert "per-blob deadline of 3 s" in message, message
    assert time.monotonic() - started < 60
    assert [status for _, method, path, status in proxy.log if "/blobs/" in path] == [200]  # not retried


def test_mirrors_are_tried_in_order_and_the_source_is_recorded(
    registry: RegistryServer, closed_port: int, tmp_path: Path
) -> None:
    mirror = registry.push_image({"run.sh": ("mirror", 0o755)})
    primary = f"127.0.0.1:{closed_port}/org/backend:v1"
    with registry.client(**FAST) as client:
        resolved = client.resolve_first([primary, mirror])
        assert resolved.source == mirror
        result = client.pull_first([primary, mirror], tmp_path / "out")
    assert result.source == mirror
    assert (result.dest / "run.sh").read_text() == "mirror"


def test_when_every_source_fails_each_failure_is_reported(
    registry: RegistryServer, closed_port: int, tmp_path: Path
) -> None:
    missing = registry.ref(registry.unique_repo("missing"))
    dead = f"127.0.0.1:{closed_port}/org/backend:v1"
    with registry.client(**FAST) as client, pytest.raises(AllSourcesFailed) as info:
        client.pull_first([dead, missing], tmp_path / "out")
    assert [source for source, _ in info.value.errors] == [dead, missing]
    assert isinstance(info.value.errors[0][1], RegistryUnavailable)
    assert isinstance(info.value.errors[1][1], NotFound)
    assert not (tmp_path / "out").exists()


def test_symlinked_files_pulled_point_inside(registry: RegistryServer, tmp_path: Path) -> None:
    ref = registry.push_image({"lib/libx.so.1": "x", "lib/libx.so": Symlink("libx.so.1")})
    with registry.client() as client:
        result = client.pull(ref, tmp_path / "out")
    assert (result.dest / "lib/libx.so").read_text() == "x"
