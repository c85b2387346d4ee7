"""Publishing images other tools accept, and pulling images other tools built (skopeo, umoci).

Small blobs go up through oras-py on the client's own transport, large ones stream from their file
through the client: the tests below watch the requests through a recording proxy in front of the
real registry.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import io
import json
import os
import subprocess
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import oras.version
import pytest

from backends_app.oci import (
    AuthError,
    NotFound,
    OCIError,
    RegistryClient,
    RegistryConfig,
    RegistryUnavailable,
    publish,
)
from tests.registry import Fault, FaultProxy, RegistryServer, tool_or_skip
from tests.test_oci_pull import tree

pytestmark = pytest.mark.registry


def run(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(args)} failed: {done.stderr}"
    return done.stdout


@pytest.fixture
def backend_tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "bin").mkdir(parents=True)
    (root / "run.sh").write_text("#!/bin/sh\nexec ./bin/x\n")
    (root / "run.sh").chmod(0o755)
    (root / "bin" / "x").write_bytes(os.urandom(10_000))
    (root / "bin" / "x").chmod(0o755)
    return root


def test_skopeo_inspects_and_copies_a_published_image(
    registry: RegistryServer, backend_tree: Path, tmp_path: Path
) -> None:
    skopeo = tool_or_skip("skopeo")
    ref = registry.ref(registry.unique_repo("skopeo"), "3.1.0")
    with registry.client() as client:
        digest = publish(backend_tree, ref, version="3.1.0", client=client)
    info = json.loads(run(skopeo, "inspect", "--tls-verify=false", f"docker://{ref}"))
    assert info["Digest"] == digest
    assert info["Labels"]["org.opencontainers.image.version"] == "3.1.0"
    assert (info["Os"], info["Architecture"]) == ("linux", "amd64")
    raw = json.loads(run(skopeo, "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"))
    assert raw["annotations"]["org.opencontainers.image.version"] == "3.1.0"
    assert raw["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    # skopeo copy verifies every blob digest on the way.
    run(skopeo, "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}", f"oci:{tmp_path / 'copy'}:t")
    manifest_digest = json.loads((tmp_path / "copy/index.json").read_text())["manifests"][0]["digest"]
    assert manifest_digest == digest


def test_a_multi_platform_publish_is_an_index_skopeo_accepts(
    registry: RegistryServer, backend_tree: Path, tmp_path: Path
) -> None:
    skopeo = tool_or_skip("skopeo")
    ref = registry.ref(registry.unique_repo("multi"), "1.0")
    with registry.client() as client:
        digest = publish(
            backend_tree, ref, version="1.0", platforms=["linux/amd64", "linux/arm64"], client=client
        )
        resolved = client.resolve(ref, platform="linux/arm64")
    assert resolved.index_digest == digest
    raw = json.loads(run(skopeo, "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"))
    assert raw["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert [m["platform"]["architecture"] for m in raw["manifests"]] == ["amd64", "arm64"]
    arm = json.loads(
        run(skopeo, "--override-arch", "arm64", "inspect", "--tls-verify=false", f"docker://{ref}")
    )
    assert arm["Architecture"] == "arm64"
    assert arm["Digest"] == digest  # skopeo reports the digest the tag points to: the index
    run(
        skopeo,
        "copy",
        "--quiet",
        "--all",
        "--src-tls-verify=false",
        f"docker://{ref}",
        f"oci:{tmp_path / 'all'}:t",
    )


def test_publishing_something_that_is_not_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OCIError, match="is not a directory"):
        publish(tmp_path / "missing", "127.0.0.1:1/repo:tag")


def _opaque_layer(path: Path) -> None:
    """A layer umoci cannot write itself: an opaque directory with a new file."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, kind, data in [
            ("opq", tarfile.DIRTYPE, b""),
            ("opq/.wh..wh..opq", tarfile.REGTYPE, b""),
            ("opq/fresh", tarfile.REGTYPE, b"only me"),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data)
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            archive.addfile(info, io.BytesIO(data) if data else None)


def test_an_image_built_by_umoci_unpacks_to_exactly_umocis_tree(
    registry: RegistryServer, tmp_path: Path
) -> None:
    umoci = tool_or_skip("umoci")
    skopeo = tool_or_skip("skopeo")
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    layout = tmp_path / "layout"
    image = f"{layout}:t"
    run(umoci, "init", "--layout", str(layout))
    run(umoci, "new", "--image", image)

    # Layer 1: a backend tree.
    bundle = tmp_path / "bundle1"
    run(umoci, "unpack", *rootless, "--image", image, str(bundle))
    rootfs = bundle / "rootfs"
    (rootfs / "lib").mkdir()
    (rootfs / "lib/libx.so.1").write_bytes(os.urandom(20_000))
    (rootfs / "lib/libx.so").symlink_to("libx.so.1")
    (rootfs / "run.sh").write_text("#!/bin/sh\necho v1\n")
    (rootfs / "run.sh").chmod(0o755)
    (rootfs / "etc").mkdir()
    (rootfs / "etc/conf").write_text("gone in layer 2")
    (rootfs / "olddir/sub").mkdir(parents=True)
    (rootfs / "olddir/sub/f").write_text("dir gone in layer 2")
    (rootfs / "opq/deep").mkdir(parents=True)
    (rootfs / "opq/old").write_text("hidden by the opaque layer")
    (rootfs / "opq/deep/older").write_text("hidden too")
    run(umoci, "repack", "--image", image, str(bundle))

    # Layer 2: deletions (whiteouts) and changes.
    bundle = tmp_path / "bundle2"
    run(umoci, "unpack", *rootless, "--image", image, str(bundle))
    rootfs = bundle / "rootfs"
    (rootfs / "etc/conf").unlink()
    subprocess.run(["rm", "-rf", str(rootfs / "olddir")], check=True)
    (rootfs / "run.sh").write_text("#!/bin/sh\necho v2\n")
    (rootfs / "bin").mkdir()
    (rootfs / "bin/tool").write_bytes(b"\x7fELF" + os.urandom(1000))
    (rootfs / "bin/tool").chmod(0o750)
    run(umoci, "repack", "--image", image, str(bundle))

    # Layer 3: an opaque directory.
    extra = tmp_path / "opaque.tar"
    _opaque_layer(extra)
    run(umoci, "raw", "add-layer", "--image", image, str(extra))

    final = tmp_path / "final"
    run(umoci, "unpack", *rootless, "--image", image, str(final))
    expected = tree(final / "rootfs")
    assert "etc/conf" not in expected and "olddir" not in expected  # umoci wrote whiteouts
    assert sorted(p for p in expected if p.startswith("opq/")) == ["opq/fresh"]

    ref = registry.ref(registry.unique_repo("umoci"), "t")
    run(skopeo, "copy", "--quiet", f"oci:{image}", f"docker://{ref}", "--dest-tls-verify=false")
    with registry.client() as client:
        resolved = client.resolve(ref)
        assert len(resolved.layers) == 3
        result = client.pull(resolved, tmp_path / "ours")
    assert tree(result.dest) == expected


# -- the upload path: oras-py on our transport --------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One request as the registry received it (through the proxy)."""

    method: str
    path: str
    user_agent: str
    content_length: int
    content_range: str | None
    authorized: bool


class RecordingProxy(FaultProxy):
    """Forwards to the registry and remembers each request's method, path and telling headers.

    ``lose_answer(method, path)``: forward a matching request once, then drop the connection
    instead of passing the registry's answer on (the registry did the work; the client never hears).
    """

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.seen: list[Seen] = []
        self.lose_answer: Callable[[str, str], bool] | None = None

    def _serve(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        headers = handler.headers
        self.seen.append(
            Seen(
                handler.command,
                handler.path,
                headers.get("User-Agent", ""),
                int(headers.get("Content-Length") or 0),
                headers.get("Content-Range"),
                "Authorization" in headers,
            )
        )
        lose, self.lose_answer = self.lose_answer, None
        if lose is not None and lose(handler.command, handler.path):
            length = int(headers.get("Content-Length") or 0)
            body = handler.rfile.read(length) if length else None
            upstream = http.client.HTTPConnection(self.upstream, timeout=30)
            try:
                upstream.request(handler.command, handler.path, body=body, headers=dict(headers.items()))
                self._record(handler.command, handler.path, upstream.getresponse().status)
            finally:
                upstream.close()
            handler.close_connection = True
            return
        self.lose_answer = lose
        super()._serve(handler)


@pytest.fixture
def recording_proxy() -> Iterator[Callable[[str], RecordingProxy]]:
    proxies: list[RecordingProxy] = []

    def factory(upstream: str) -> RecordingProxy:
        proxy = RecordingProxy(upstream).start()
        proxies.append(proxy)
        return proxy

    yield factory
    for proxy in proxies:
        proxy.stop()


ORAS_AGENT = f"oras-py/{oras.version.__version__}"


def _digest_param(path: str) -> str | None:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path).query)).get("digest")


def test_small_blobs_go_up_through_oras_large_ones_stream_and_manifests_through_our_client(
    registry: RegistryServer,
    backend_tree: Path,
    recording_proxy: Callable[[str], RecordingProxy],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setattr("backends_app.oci.upload.CHUNK_SIZE", 4096)
    proxy = recording_proxy(registry.host)
    ref = f"{proxy.host}/{registry.unique_repo('oras')}:1.0"
    config = registry.config()
    with RegistryClient(config) as client:
        digest = publish(backend_tree, ref, version="1.0", client=client)
        pushed = list(proxy.seen)
        resolved = client.resolve(ref)
        pulled = client.pull(resolved, tmp_path / "pulled")
    assert resolved.digest == digest
    assert tree(pulled.dest) == tree(backend_tree)
    layer, blob_config = resolved.layers[0], resolved.config
    assert blob_config.size <= 4096 < layer.size  # random bytes: the layer is larger than a chunk

    closing = {
        _digest_param(seen.path): seen for seen in pushed if seen.method == "PUT" and _digest_param(seen.path)
    }
    # The config is small: oras-py's protocol (its User-Agent), one PUT carrying the whole blob.
    assert ORAS_AGENT in closing[blob_config.digest].user_agent
    assert closing[blob_config.digest].content_length == blob_config.size
    # The layer is large: one PUT streamed by our client, no chunks.
    assert closing[layer.digest].user_agent == config.user_agent
    assert closing[layer.digest].content_length == layer.size
    assert not [seen for seen in pushed if seen.method == "PATCH"]
    manifest_puts = [seen for seen in pushed if "/manifests/" in seen.path]
    assert [seen.method for seen in manifest_puts] == ["PUT"]
    assert manifest_puts[0].user_agent == config.user_agent  # manifests stay with our client

    # Publishing it again uploads nothing: each blob is found with a HEAD.
    proxy.seen.clear()
    with RegistryClient(config) as client:
        assert publish(backend_tree, ref, version="1.0", client=client) == digest
    assert {seen.method for seen in proxy.seen if "/blobs/" in seen.path} == {"HEAD"}


@pytest.mark.parametrize("chunk", [4096, 1 << 30], ids=["large-layer-streamed", "small-layer-through-oras"])
def test_a_busy_registry_mid_upload_is_retried_as_any_request_is(
    registry: RegistryServer,
    backend_tree: Path,
    recording_proxy: Callable[[str], RecordingProxy],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    chunk: int,
) -> None:
    """oras-py on its own gives up on a 503 or 429 mid-upload (its retries cover only exceptions
    and 500s); through our client they are retried, honouring Retry-After, on either path."""
    monkeypatch.setattr("backends_app.oci.upload.CHUNK_SIZE", chunk)
    proxy = recording_proxy(registry.host)
    proxy.add(Fault(lambda method, path: method == "POST" and "/blobs/uploads/" in path, status=503))
    proxy.add(
        Fault(
            lambda method, path: method == "PUT" and "digest=" in path,
            status=429,
            headers={"Retry-After": "1"},
        )
    )
    ref = f"{proxy.host}/{registry.unique_repo('busy')}:1"
    with RegistryClient(registry.config(retries=2)) as client:
        digest = publish(backend_tree, ref, client=client)
        pulled = client.pull(ref, tmp_path / "pulled")
    assert pulled.digest == digest
    assert tree(pulled.dest) == tree(backend_tree)
    statuses = [(method, status) for _, method, path, status in proxy.log if "/blobs/uploads/" in path]
    assert statuses[:2] == [("POST", 503), ("POST", 202)]  # the same request again
    assert ("PUT", 429) in statuses and statuses[statuses.index(("PUT", 429)) + 1] == ("PUT", 201)


def test_a_closing_put_whose_answer_was_lost_finds_the_blob_stored(
    registry: RegistryServer,
    backend_tree: Path,
    recording_proxy: Callable[[str], RecordingProxy],
    tmp_path: Path,
) -> None:
    """The registry stored the layer but the client never heard: the retried PUT finds the upload
    gone (404), and one HEAD shows the blob is there, so the publish goes on."""
    proxy = recording_proxy(registry.host)
    proxy.lose_answer = lambda method, path: method == "PUT" and "digest=" in path
    ref = f"{proxy.host}/{registry.unique_repo('lost')}:1"
    with RegistryClient(registry.config()) as client:
        digest = publish(backend_tree, ref, client=client)
        pulled = client.pull(ref, tmp_path / "pulled")
    assert pulled.digest == digest
    assert tree(pulled.dest) == tree(backend_tree)
    closing = [(method, status) for _, method, path, status in proxy.log if "digest=" in path]
    assert closing[:2] == [("PUT", 201), ("PUT", 404)]  # stored, then "upload unknown" to the retry


def test_oras_cannot_reach_a_registry_except_through_our_client(
    registry: RegistryServer, recording_proxy: Callable[[str], RecordingProxy]
) -> None:
    from backends_app.oci.reference import parse_reference
    from backends_app.oci.upload import OrasUploader

    proxy = recording_proxy(registry.host)
    with RegistryClient(registry.config()) as client:
        uploader = OrasUploader(client, parse_reference(f"{proxy.host}/fenced/repo:1"))
        with pytest.raises(OCIError, match="outside the registry client"):
            uploader.session.get(f"http://{proxy.host}/v2/")  # oras's own session: no timeout
        # oras's own API goes through do_request, that is through our client:
        missing = {"digest": "sha256:" + "0" * 64}
        assert uploader.blob_exists(missing, uploader.get_container(f"{proxy.host}/fenced/repo:1")) is False
    assert [seen.user_agent for seen in proxy.seen] == [f"{registry.config().user_agent} {ORAS_AGENT}"]


DEAD_HOST_DEADLINE = 30.0  # oras-py 0.2 on its own: no timeout at all, then 5 retries sleeping 131 s


@pytest.mark.parametrize("kind", ["silent_port", "closed_port"])
def test_a_dead_registry_fails_the_publish_within_our_timeout(
    kind: str, request: pytest.FixtureRequest, backend_tree: Path
) -> None:
    port = request.getfixturevalue(kind)
    config = RegistryConfig(timeout=(1.0, 1.0), retries=1, backoff=0.05)
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            publish(backend_tree, f"127.0.0.1:{port}/dead/backend:1", config=config)
        except BaseException as exc:
            outcome["error"] = exc

    started = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(DEAD_HOST_DEADLINE)
    assert not worker.is_alive(), f"publish to a dead registry still running after {DEAD_HOST_DEADLINE}s"
    error = outcome.get("error")
    assert isinstance(error, RegistryUnavailable), repr(error)
    assert f"127.0.0.1:{port} unreachable" in str(error)
    assert time.monotonic() - started < DEAD_HOST_DEADLINE


def test_a_wrong_password_fails_with_auth_error_writing_nothing_and_showing_nothing(
    auth_registry_factory: Callable[[str, str], RegistryServer],
    backend_tree: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    server = auth_registry_factory("publisher", "right-Pa55word")
    wrong = "Wr0ng-publish-S3cret"
    ref = server.ref(server.unique_repo("denied"), "1")
    caplog.set_level("DEBUG")
    with (
        server.client(credentials={server.host: ("publisher", wrong)}) as client,
        pytest.raises(AuthError) as info,
    ):
        publish(backend_tree, ref, client=client)
    message = f"{info.value} {info.value!r}"
    assert "rejected the configured credentials" in message and server.host in message
    output = capfd.readouterr()
    for secret in (wrong, base64.b64encode(f"publisher:{wrong}".encode()).decode()):
        for text in (message, caplog.text, output.out, output.err):
            assert secret not in text
    assert list(home.iterdir()) == []  # no ~/.docker/config.json, nothing else either
    with server.client() as client, pytest.raises(NotFound):
        client.head_digest(ref)


def test_basic_auth_credentials_from_a_docker_config_are_reused_not_logged_in_with(
    auth_registry_factory: Callable[[str, str], RegistryServer],
    recording_proxy: Callable[[str], RecordingProxy],
    backend_tree: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    server = auth_registry_factory("publisher", "right-Pa55word")
    proxy = recording_proxy(server.host)
    auth_file = tmp_path / "docker-config.json"
    auth_file.write_text(
        json.dumps({"auths": {proxy.host: {"auth": base64.b64encode(b"publisher:right-Pa55word").decode()}}})
    )
    before = auth_file.read_bytes()
    ref = f"{proxy.host}/{server.unique_repo('basic')}:2.0"
    config = RegistryConfig(timeout=(2.0, 10.0), retries=1, backoff=0.05, auth_file=auth_file)
    with RegistryClient(config) as client:
        digest = publish(backend_tree, ref, version="2.0", client=client)
        assert client.head_digest(ref) == digest
    # One challenge for the whole publish: Basic goes with every later request (oras's own "basic"
    # backend answers a 401 on every request, body and all).
    assert [status for _, _, _, status in proxy.log].count(401) == 1
    assert all(seen.authorized for seen in proxy.seen[1:])
    assert any(ORAS_AGENT in seen.user_agent for seen in proxy.seen)
    assert auth_file.read_bytes() == before
    assert list(home.iterdir()) == []
