"""The gallery module against LocalAI's real index, a real HTTP server and real files."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from backends_app import gallery
from backends_app.gallery import GalleryEntry, GalleryError
from tests.helpers.processes import free_port

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "localai-index.yaml"
DUPLICATED_NAMES = [
    "metal-whisper",
    "metal-whisper-development",
    "metal-crispasr",
    "metal-crispasr-development",
    "intel-rfdetr",
]


@pytest.fixture(scope="module")
def index_text() -> str:
    return FIXTURE.read_text()


@pytest.fixture(scope="module")
def entries(index_text: str) -> list[GalleryEntry]:
    return gallery.parse(index_text, source=str(FIXTURE))


@pytest.fixture(scope="module")
def by_name(entries: list[GalleryEntry]) -> dict[str, GalleryEntry]:
    return gallery.first_by_name(entries)


def parse_error(text: str, source: str = "") -> str:
    with pytest.raises(GalleryError) as caught:
        gallery.parse(text, source=source)
    return str(caught.value)


# --------------------------------------------------------------------------- the real index


def test_real_index_has_1033_entries_1028_names_140_meta_893_concrete(entries: list[GalleryEntry]) -> None:
    assert len(entries) == 1033
    assert len(gallery.first_by_name(entries)) == 1028
    assert sum(entry.is_meta for entry in entries) == 140
    assert sum(not entry.is_meta for entry in entries) == 893
    assert [entry.position for entry in entries] == list(range(1033))


def test_concrete_entry_inherits_alias_tags_and_capabilities_through_merge_keys(
    by_name: dict[str, GalleryEntry],
) -> None:
    meta = by_name["llama-cpp"]
    concrete = by_name["cpu-llama-cpp"]  # "- !!merge <<: *llamacpp" plus name, uri, mirrors
    assert concrete.alias == "llama-cpp"
    assert concrete.tags == meta.tags
    assert "LLM" in concrete.tags
    assert concrete.capabilities == meta.capabilities
    assert concrete.capabilities["nvidia"] == "cuda12-llama-cpp"
    assert concrete.uri == "quay.io/go-skynet/local-ai-backends:latest-cpu-llama-cpp"
    assert concrete.is_meta is False
    assert meta.is_meta is True
    assert meta.uri == ""
    assert concrete.raw["alias"] == "llama-cpp"


def test_mirrors_are_parsed_as_tuples_of_references(
    entries: list[GalleryEntry], by_name: dict[str, GalleryEntry]
) -> None:
    assert by_name["cpu-llama-cpp"].mirrors == ("localai/localai-backends:latest-cpu-llama-cpp",)
    assert sum(1 for entry in entries if entry.mirrors) == 892
    assert by_name["llama-cpp"].mirrors == ()


def test_development_variants_are_flagged_and_track_master_tags(
    entries: list[GalleryEntry], by_name: dict[str, GalleryEntry]
) -> None:
    assert by_name["cpu-llama-cpp-development"].is_development is True
    assert by_name["cpu-llama-cpp"].is_development is False
    development = [entry for entry in entries if entry.is_development]
    assert len(development) == 511
    assert all(":master-" in entry.uri for entry in development if not entry.is_meta)


def test_five_duplicated_names_are_kept_and_the_first_occurrence_wins(
    entries: list[GalleryEntry], by_name: dict[str, GalleryEntry]
) -> None:
    later = gallery.duplicates(entries)
    assert [entry.name for entry in later] == DUPLICATED_NAMES
    for entry in later:
        assert by_name[entry.name].position < entry.position
        assert by_name[entry.name] is not entry


def test_names_differing_only_in_case_are_duplicates_like_in_localai() -> None:
    entries = gallery.parse("- {name: Foo, uri: a}\n- {name: foo, uri: b}\n")
    assert list(gallery.first_by_name(entries)) == ["Foo"]
    assert [entry.uri for entry in gallery.duplicates(entries)] == ["b"]


def test_raw_is_json_serialisable_and_each_entry_owns_its_copy(by_name: dict[str, GalleryEntry]) -> None:
    json.dumps([entry.raw for entry in by_name.values()])
    first, second = by_name["cpu-llama-cpp"], by_name["cpu-llama-cpp-development"]
    first.raw["tags"].append("changed")
    try:
        assert "changed" not in second.raw["tags"]
    finally:
        first.raw["tags"].pop()


# --------------------------------------------------------------------------- meta resolution


def test_meta_resolves_to_the_default_build_on_a_default_machine(by_name: dict[str, GalleryEntry]) -> None:
    resolved = gallery.resolve_meta(by_name["llama-cpp"], "default", by_name)
    assert resolved is not None
    assert resolved.name == "cpu-llama-cpp"


def test_meta_resolves_to_the_nvidia_build_on_an_nvidia_machine(by_name: dict[str, GalleryEntry]) -> None:
    resolved = gallery.resolve_meta(by_name["llama-cpp"], "nvidia", by_name)
    assert resolved is not None
    assert resolved.name == "cuda12-llama-cpp"


def test_unknown_capability_falls_back_to_default(by_name: dict[str, GalleryEntry]) -> None:
    resolved = gallery.resolve_meta(by_name["llama-cpp"], "quantum-tpu", by_name)
    assert resolved is not None
    assert resolved.name == "cpu-llama-cpp"


def test_meta_without_default_resolves_to_nothing_for_an_unknown_capability(
    by_name: dict[str, GalleryEntry],
) -> None:
    assert gallery.resolve_meta(by_name["vllm"], "default", by_name) is None
    resolved = gallery.resolve_meta(by_name["vllm"], "nvidia-cuda-13", by_name)
    assert resolved is not None
    assert resolved.name == "cuda13-vllm"


def test_concrete_entry_resolves_to_itself(by_name: dict[str, GalleryEntry]) -> None:
    assert gallery.resolve_meta(by_name["cpu-llama-cpp"], "nvidia", by_name) is by_name["cpu-llama-cpp"]


def test_meta_naming_a_missing_backend_raises_with_both_names() -> None:
    entries = gallery.parse("- name: thing\n  capabilities: {default: cpu-thing}\n")
    with pytest.raises(GalleryError, match=r"'thing'.*'default'.*'cpu-thing'"):
        gallery.resolve_meta(entries[0], "default", gallery.first_by_name(entries))


# --------------------------------------------------------------------------- shape errors


def test_bad_yaml_raises_with_the_line() -> None:
    message = parse_error(
        "- name: ok\n  uri: x\n- name: [unclosed\n", source="https://example.test/index.yaml"
    )
    assert "https://example.test/index.yaml" in message
    assert "invalid YAML" in message
    assert "line 3" in message or "line 4" in message


def test_a_mapping_instead_of_a_list_raises() -> None:
    message = parse_error("name: llama-cpp\nuri: quay.io/x:latest\n")
    assert "top level is a mapping" in message
    assert "list" in message


def test_an_empty_document_raises() -> None:
    assert "empty" in parse_error("# nothing here\n")


def test_an_entry_without_name_raises_naming_its_index_and_line() -> None:
    message = parse_error("- name: good\n  uri: a\n- uri: b\n")
    assert "entry 1" in message
    assert "line 3" in message
    assert "no 'name'" in message


def test_an_entry_with_neither_uri_nor_capabilities_raises_naming_it() -> None:
    with pytest.raises(GalleryError) as caught:
        gallery.parse("- name: good\n  uri: a\n- name: lonely\n  description: nothing to install\n")
    assert "entry 1 ('lonely'" in str(caught.value)
    assert "neither a 'uri'" in str(caught.value)
    assert caught.value.entry_index == 1
    assert caught.value.entry_name == "lonely"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ("mirrors: quay.io/one-string", "'mirrors' must be a list of strings"),
        ("mirrors: [a, {b: c}]", "item 1 is a mapping"),
        ("tags: {a: b}", "'tags' must be a list of strings"),
        ("capabilities: [default]", "'capabilities' must map"),
        ("capabilities: {default: [a, b]}", "'default' maps to a list"),
        ("description: {a: b}", "'description' must be a string"),
        ("name: [a]", "'name' must be a string"),
    ],
)
def test_fields_of_the_wrong_type_raise(fields: str, expected: str) -> None:
    text = "- name: bad\n  uri: quay.io/x:latest\n" if not fields.startswith("name:") else "- uri: x\n"
    message = parse_error(text + f"  {fields}\n")
    assert expected in message


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "tab\there", " padded"])
def test_names_unusable_as_directories_raise(name: str) -> None:
    assert "'name'" in parse_error(f"- name: {json.dumps(name)}\n  uri: x\n")


def test_one_bad_entry_rejects_the_whole_document(index_text: str) -> None:
    message = parse_error(index_text + "- name: broken\n  mirrors: nope\n  uri: x\n")
    assert "entry 1033 ('broken'" in message


def test_a_key_given_twice_in_one_entry_raises() -> None:
    message = parse_error("- name: twice\n  uri: a\n  uri: b\n")
    assert "'uri' appears twice" in message


def test_alias_bombs_and_self_references_are_refused_quickly() -> None:
    levels = "".join(f"  l{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10))
    bomb = "- name: lol\n  uri: x\n  l0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + levels
    started = time.monotonic()
    assert "expands to more than" in parse_error(bomb)
    assert time.monotonic() - started < 30  # refused, not expanded (which would take hours)
    assert "containing itself" in parse_error("- &loop [*loop]\n")


def test_source_credentials_never_appear_in_messages() -> None:
    message = parse_error("{}", source="https://alice:s3cret@example.test/index.yaml?token=t0ken")
    assert "s3cret" not in message
    assert "t0ken" not in message
    assert "example.test/index.yaml" in message


# --------------------------------------------------------------------------- fields read as text


def test_version_and_other_text_fields_keep_their_text() -> None:
    (entry,) = gallery.parse(
        "- name: 2024-01-02\n  uri: x\n  version: 1.10\n  sha256: 0123\n  tags: [2024, yes]\n"
        "  capabilities: {nvidia: 12}\n  released: 2024-01-02\n"
    )
    assert entry.name == "2024-01-02"
    assert entry.version == "1.10"
    assert entry.sha256 == "0123"
    assert entry.tags == ("2024", "yes")
    assert entry.capabilities == {"nvidia": "12"}
    assert entry.raw["released"] == "2024-01-02"
    json.dumps(entry.raw)


def test_absent_optional_fields_are_empty() -> None:
    (entry,) = gallery.parse("- name: bare\n  uri: x\n")
    assert (entry.version, entry.sha256, entry.alias, entry.mirrors, entry.health_check) == (
        "",
        "",
        "",
        (),
        None,
    )


# --------------------------------------------------------------------------- health-check extension


def test_healthcheck_command_string_is_split_and_timeout_defaults_to_30() -> None:
    (entry,) = gallery.parse("- name: a\n  uri: x\n  healthcheck:\n    command: ./run.sh --health 'a b'\n")
    assert entry.health_check == {"command": ["./run.sh", "--health", "a b"], "timeout": 30.0}


def test_healthcheck_command_list_and_timeout_are_kept() -> None:
    (entry,) = gallery.parse(
        "- name: a\n  uri: x\n  healthcheck: {command: [./run.sh, --ping], timeout: 5}\n"
    )
    assert entry.health_check == {"command": ["./run.sh", "--ping"], "timeout": 5.0}
    json.dumps(entry.health_check)


@pytest.mark.parametrize(
    "spec",
    ["{command: ''}", "{timeout: 5}", "{command: x, timeout: 0}", "{command: x, timeout: fast}", "yes"],
)
def test_invalid_healthcheck_raises(spec: str) -> None:
    assert "healthcheck" in parse_error(f"- name: a\n  uri: x\n  healthcheck: {spec}\n")


# --------------------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "github:mudler/LocalAI/backend/index.yaml@master",
            "https://raw.githubusercontent.com/mudler/LocalAI/master/backend/index.yaml",
        ),
        (
            "github:mudler/LocalAI/backend/index.yaml",
            "https://raw.githubusercontent.com/mudler/LocalAI/main/backend/index.yaml",
        ),
        (
            "github://owner/repo/deep/path/gallery.yaml@v1.2",
            "https://raw.githubusercontent.com/owner/repo/v1.2/deep/path/gallery.yaml",
        ),
        ("https://example.test/index.yaml", "https://example.test/index.yaml"),
        ("http://127.0.0.1:8080/index.yaml", "http://127.0.0.1:8080/index.yaml"),
        ("file:///srv/gallery/index.yaml", "file:///srv/gallery/index.yaml"),
    ],
)
def test_gallery_urls_resolve(url: str, expected: str) -> None:
    assert gallery.resolve_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "github:mudler/LocalAI",
        "github:mudler/LocalAI/index.yaml@",
        "file://relative/index.yaml",
        "ftp://example.test/index.yaml",
        "/srv/gallery/index.yaml",
        "https:///no-host",
    ],
)
def test_unsupported_or_malformed_urls_raise(url: str) -> None:
    with pytest.raises(GalleryError):
        gallery.resolve_url(url)


# --------------------------------------------------------------------------- fetching over HTTP


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    etag: str = ""
    delay: float = 0.0
    send_length: bool = True
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class GalleryServer:
    base: str
    routes: dict[str, Route]
    seen: list[dict[str, str]]


@pytest.fixture
def server() -> Iterator[GalleryServer]:
    routes: dict[str, Route] = {}
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(dict(self.headers.items()))
            route = routes.get(self.path.split("?")[0])
            if route is None:
                self.send_error(404)
                return
            time.sleep(route.delay)
            if route.etag and self.headers.get("If-None-Match") == route.etag:
                self.send_response(304)
                self.send_header("ETag", route.etag)
                self.end_headers()
                return
            self.send_response(route.status)
            if route.etag:
                self.send_header("ETag", route.etag)
            for name, value in route.headers.items():
                self.send_header(name, value)
            if route.send_length:
                self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            self.wfile.write(route.body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield GalleryServer(f"http://127.0.0.1:{httpd.server_address[1]}", routes, seen)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_fetch_sends_the_etag_and_a_304_means_not_modified(server: GalleryServer, index_text: str) -> None:
    server.routes["/index.yaml"] = Route(body=index_text.encode(), etag='"v1"')
    first = gallery.fetch(server.base + "/index.yaml")
    assert first.not_modified is False
    assert first.etag == '"v1"'
    assert first.resolved_url == server.base + "/index.yaml"
    assert first.text is not None
    assert len(gallery.parse(first.text, source=first.resolved_url)) == 1033

    second = gallery.fetch(server.base + "/index.yaml", etag=first.etag)
    assert server.seen[-1].get("If-None-Match") == '"v1"'
    assert (second.not_modified, second.text, second.etag) == (True, None, '"v1"')


def test_fetch_without_server_etag_still_detects_an_unchanged_body(server: GalleryServer) -> None:
    server.routes["/index.yaml"] = Route(body=b"- {name: a, uri: x}\n")
    first = gallery.fetch(server.base + "/index.yaml")
    assert first.etag.startswith('"sha256-')
    assert gallery.fetch(server.base + "/index.yaml", etag=first.etag).not_modified is True
    server.routes["/index.yaml"] = Route(body=b"- {name: b, uri: x}\n")
    changed = gallery.fetch(server.base + "/index.yaml", etag=first.etag)
    assert changed.not_modified is False
    assert changed.text == "- {name: b, uri: x}\n"


def test_fetch_http_500_raises_with_the_status(server: GalleryServer) -> None:
    server.routes["/index.yaml"] = Route(body=b"boom", status=500)
    with pytest.raises(GalleryError, match="HTTP 500") as caught:
        gallery.fetch(server.base + "/index.yaml")
    assert caught.value.status == 500


def test_fetch_rate_limited_reports_retry_after(server: GalleryServer) -> None:
    server.routes["/index.yaml"] = Route(status=429, headers={"Retry-After": "120"})
    with pytest.raises(GalleryError, match="HTTP 429") as caught:
        gallery.fetch(server.base + "/index.yaml")
    assert caught.value.retry_after == 120.0


def test_fetch_from_a_closed_port_fails_quickly() -> None:
    started = time.monotonic()
    with pytest.raises(GalleryError, match="cannot fetch gallery"):
        gallery.fetch(f"http://127.0.0.1:{free_port()}/index.yaml", timeout=5)
    assert time.monotonic() - started < 30  # refused at once, not retried for minutes


def test_fetch_from_a_slow_server_times_out(server: GalleryServer) -> None:
    server.routes["/index.yaml"] = Route(body=b"[]", delay=120.0)
    started = time.monotonic()
    with pytest.raises(GalleryError, match="timed out"):
        gallery.fetch(server.base + "/index.yaml", timeout=1)
    assert time.monotonic() - started < 60  # the timeout, not the server's two minutes


@pytest.mark.parametrize("send_length", [True, False])
def test_fetch_refuses_a_document_over_the_size_limit(server: GalleryServer, send_length: bool) -> None:
    server.routes["/index.yaml"] = Route(body=b"#" * 200_000, send_length=send_length)
    with pytest.raises(GalleryError, match="over the 100000-byte limit"):
        gallery.fetch(server.base + "/index.yaml", max_bytes=100_000)


@pytest.mark.parametrize("target", ["served", "closed"])
def test_fetch_errors_never_show_url_credentials(server: GalleryServer, target: str) -> None:
    base = server.base if target == "served" else f"http://127.0.0.1:{free_port()}"
    url = base.replace("http://", "http://alice:s3cret@") + "/missing.yaml?token=t0ken"
    with pytest.raises(GalleryError) as caught:
        gallery.fetch(url)
    assert "s3cret" not in str(caught.value)
    assert "t0ken" not in str(caught.value)
    assert "missing.yaml" in str(caught.value)


# --------------------------------------------------------------------------- fetching files


def test_file_gallery_is_not_modified_until_its_content_changes(tmp_path: Path) -> None:
    index = tmp_path / "index.yaml"
    index.write_text("- {name: a, uri: x}\n")
    url = index.as_uri()
    first = gallery.fetch(url)
    assert first.text == "- {name: a, uri: x}\n"
    assert first.resolved_url == url

    again = gallery.fetch(url, etag=first.etag)
    assert (again.not_modified, again.text) == (True, None)

    index.write_text("- {name: b, uri: x}\n")  # same size, possibly the same mtime tick
    changed = gallery.fetch(url, etag=first.etag)
    assert changed.not_modified is False
    assert changed.text == "- {name: b, uri: x}\n"


def test_missing_file_gallery_raises_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(GalleryError, match="does not exist") as caught:
        gallery.fetch(missing.as_uri())
    assert str(missing) in str(caught.value)


# --------------------------------------------------------------------------- capability detection


def machine(root: Path, files: dict[str, str]) -> Path:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return root


@pytest.mark.parametrize(
    ("files", "system", "arch", "expected"),
    [
        ({}, "Linux", "x86_64", "default"),
        ({"proc/driver/nvidia/version": "NVRM version: 580.65.06\n"}, "Linux", "x86_64", "nvidia"),
        ({"sys/class/drm/card1/device/vendor": "0x10de\n"}, "Linux", "x86_64", "nvidia"),
        ({"proc/driver/nvidia/version": "NVRM\n"}, "Linux", "aarch64", "nvidia-l4t"),
        ({"dev/kfd": ""}, "Linux", "x86_64", "amd"),
        ({"sys/class/drm/card0/device/vendor": "0x8086\n"}, "Linux", "x86_64", "intel"),
        ({"sys/class/drm/card0/device/vendor": "0x1a03\n"}, "Linux", "x86_64", "default"),
        ({"run/localai/capability": "vulkan\n", "dev/kfd": ""}, "Linux", "x86_64", "vulkan"),
        ({}, "Darwin", "arm64", "metal"),
    ],
)
def test_capability_detection_reads_the_machine(
    tmp_path: Path, files: dict[str, str], system: str, arch: str, expected: str
) -> None:
    root = machine(tmp_path, files)
    assert gallery.detect_capability(root=root, system=system, machine=arch) == expected


def test_capability_override_wins_over_detection(tmp_path: Path) -> None:
    root = machine(tmp_path, {"proc/driver/nvidia/version": "NVRM\n", "run/localai/capability": "amd"})
    forced = gallery.detect_capability(" nvidia-cuda-13 ", root=root, system="Linux", machine="x86_64")
    assert forced == "nvidia-cuda-13"
    assert gallery.detect_capability("", root=root, system="Linux", machine="x86_64") == "amd"
