"""LocalAI's on-disk layout and the crash-safe primitives, on the real filesystem."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from backends_app.disk.fsops import (
    _rename_noreplace_portable as rename_noreplace_portable,
)
from backends_app.disk.fsops import (
    ensure_free_space,
    exchange,
    free_bytes,
    remove_tree,
    rename_noreplace,
    same_filesystem,
    tree_size,
)
from backends_app.disk.health import health_check
from backends_app.disk.journal import Journal
from backends_app.disk.layout import (
    BackendMetadata,
    LayoutError,
    StateDirs,
    format_rfc3339,
    read_metadata,
    scan,
    state_path_problems,
    write_metadata,
)

REPO = Path(__file__).resolve().parents[1]

RUN_SH = '#!/bin/sh\nexec ./backend "$@"\n'

# What LocalAI's writeBackendMetadata (json.MarshalIndent, two spaces) produces for a concrete backend.
LOCALAI_METADATA = """{
  "alias": "llama-cpp",
  "name": "cpu-llama-cpp",
  "gallery_url": "github:mudler/LocalAI/backend/index.yaml@master",
  "installed_at": "2026-11-27T05:40:00+01:00",
  "version": "1.2.3",
  "uri": "quay.io/go-skynet/local-ai-backends:latest-cpu-llama-cpp",
  "digest": "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
}"""


def make_backend(backends: Path, name: str, metadata: str | None = None, mode: int = 0o755) -> Path:
    directory = backends / name
    directory.mkdir(parents=True)
    run = directory / "run.sh"
    run.write_text(RUN_SH)
    run.chmod(mode)
    if metadata is not None:
        (directory / "metadata.json").write_text(metadata)
    return directory


def make_meta(backends: Path, name: str, target: str) -> Path:
    directory = backends / name
    directory.mkdir(parents=True)
    (directory / "metadata.json").write_text(json.dumps({"meta_backend_for": target, "name": name}))
    return directory


# --- metadata.json -----------------------------------------------------------------------------


def test_metadata_written_by_localai_reads_and_round_trips(tmp_path: Path) -> None:
    (tmp_path / "metadata.json").write_text(LOCALAI_METADATA)

    metadata = read_metadata(tmp_path)

    assert metadata.name == "cpu-llama-cpp"
    assert metadata.alias == "llama-cpp"
    assert metadata.installed_datetime == datetime(2026, 11, 27, 4, 40, tzinfo=UTC)
    assert not metadata.is_meta
    assert metadata.to_json() == json.loads(LOCALAI_METADATA)
    assert list(metadata.to_json()) == list(json.loads(LOCALAI_METADATA))  # LocalAI's key order


def test_metadata_omits_empty_keys_and_uses_localai_key_names(tmp_path: Path) -> None:
    meta = BackendMetadata(name="llama-cpp", meta_backend_for="cpu-llama-cpp", installed_at="")

    write_metadata(tmp_path, meta)

    assert json.loads((tmp_path / "metadata.json").read_text()) == {
        "meta_backend_for": "cpu-llama-cpp",
        "name": "llama-cpp",
    }
    assert read_metadata(tmp_path) == meta


def test_metadata_keeps_keys_it_does_not_know_and_reads_null_as_empty(tmp_path: Path) -> None:
    (tmp_path / "metadata.json").write_text('{"name": "x", "version": null, "future_key": [1, 2]}')

    metadata = read_metadata(tmp_path)
    write_metadata(tmp_path, metadata)

    assert metadata.version == ""
    assert json.loads((tmp_path / "metadata.json").read_text()) == {"name": "x", "future_key": [1, 2]}


def test_installed_at_accepts_z_and_offsets_and_is_written_like_go() -> None:
    assert BackendMetadata(installed_at="2026-11-27T05:40:00Z").installed_datetime == datetime(
        2026, 11, 27, 5, 40, tzinfo=UTC
    )
    assert BackendMetadata(installed_at="2026-11-27T05:40:00.123456789-02:00").installed_datetime == (
        datetime(2026, 11, 27, 7, 40, 0, 123456, tzinfo=UTC)
    )
    assert BackendMetadata(installed_at="yesterday").installed_datetime is None
    assert BackendMetadata(installed_at="2026-11-27T05:40:00").installed_datetime is None  # no offset
    assert format_rfc3339(datetime(2026, 11, 27, 5, 40, 0, 999, tzinfo=UTC)) == "2026-11-27T05:40:00Z"
    plus_one = timezone(timedelta(hours=1))
    assert format_rfc3339(datetime(2026, 11, 27, 5, 40, tzinfo=plus_one)) == "2026-11-27T05:40:00+01:00"
    with pytest.raises(ValueError):
        format_rfc3339(datetime(2026, 11, 27, 5, 40))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"name": "x",', "metadata.json is not valid JSON"),
        (b"\xff\xfe{}", "metadata.json is not valid JSON"),
        ('["x"]', "metadata.json is not a JSON object (it is a JSON array)"),
        ('{"name": 5}', "metadata.json: 'name' must be a string, not a number"),
        ('{"installed_at": {"t": 1}}', "metadata.json: 'installed_at' must be a string, not a object"),
    ],
)
def test_read_metadata_rejects_what_localai_cannot_parse(
    tmp_path: Path, content: str | bytes, message: str
) -> None:
    target = tmp_path / "metadata.json"
    target.write_bytes(content if isinstance(content, bytes) else content.encode())

    with pytest.raises(LayoutError) as caught:
        read_metadata(tmp_path)

    assert message in str(caught.value)
    assert str(tmp_path) in str(caught.value)


def test_read_metadata_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match=r"metadata\.json missing"):
        read_metadata(tmp_path)


def test_atomic_metadata_write_replaces_the_file_and_leaves_no_temp_files(tmp_path: Path) -> None:
    (tmp_path / "metadata.json").write_text(LOCALAI_METADATA)
    (tmp_path / "metadata.json").chmod(0o600)

    for version in ("2.0.0", "2.0.1", "2.0.2"):
        write_metadata(tmp_path, BackendMetadata(name="cpu-llama-cpp", version=version))

    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.json"]
    assert read_metadata(tmp_path).version == "2.0.2"
    assert stat.S_IMODE((tmp_path / "metadata.json").stat().st_mode) == 0o644  # as LocalAI writes it


# --- scan --------------------------------------------------------------------------------------


def test_scan_lists_every_directory_and_flags_exactly_the_bad_ones(tmp_path: Path) -> None:
    backends = tmp_path / "backends"
    make_backend(backends, "cpu-llama-cpp", LOCALAI_METADATA)
    make_meta(backends, "llama-cpp", "cpu-llama-cpp")
    make_backend(backends, "broken-json", '{"name": "broken-json",')
    make_backend(backends, "adopted")  # run.sh only: LocalAI lists it under its directory name
    make_meta(backends, "whisper", "cuda12-whisper")
    make_backend(backends, "not-executable", '{"name": "not-executable"}', mode=0o644)
    (backends / "empty").mkdir()
    (backends / ".hidden").mkdir()
    (backends / "stray-file.txt").write_text("LocalAI skips plain files\n")

    listing = scan(backends)

    assert [b.name for b in listing] == [
        ".hidden",
        "adopted",
        "broken-json",
        "cpu-llama-cpp",
        "empty",
        "llama-cpp",
        "not-executable",
        "whisper",
    ]
    by_name = {b.name: b for b in listing}
    assert {b.name for b in listing if b.ok} == {"adopted", "cpu-llama-cpp", "llama-cpp"}

    concrete = by_name["cpu-llama-cpp"]
    assert concrete.metadata is not None and concrete.metadata.version == "1.2.3"
    assert (concrete.has_run_sh, concrete.run_sh_executable, concrete.is_meta) == (True, True, False)
    assert concrete.note == ""

    meta = by_name["llama-cpp"]
    assert meta.is_meta and meta.meta_backend_for == "cpu-llama-cpp" and not meta.has_run_sh

    adopted = by_name["adopted"]
    assert adopted.metadata is None and adopted.problem == ""
    assert "no metadata.json" in adopted.note

    assert by_name["broken-json"].problem.startswith("metadata.json is not valid JSON: ")
    assert by_name["broken-json"].metadata is None
    assert by_name["whisper"].problem == "meta backend points to missing directory cuda12-whisper"
    assert by_name["not-executable"].problem == "run.sh is not executable (mode 0644)"
    assert by_name["empty"].problem == "run.sh missing"
    assert by_name[".hidden"].problem == "run.sh missing"


def test_scan_reports_a_symlinked_directory_without_following_it(tmp_path: Path) -> None:
    backends = tmp_path / "backends"
    backends.mkdir()
    elsewhere = make_backend(tmp_path, "elsewhere", '{"name": "elsewhere"}')
    (backends / "linked").symlink_to(elsewhere)
    (backends / "dangling").symlink_to(tmp_path / "nowhere")

    (linked,) = scan(backends)

    assert linked.name == "linked" and linked.is_symlink
    assert linked.metadata is None and not linked.has_run_sh
    assert linked.problem.startswith(f"symlink to {elsewhere}")


def test_scan_of_a_missing_backends_directory_is_empty_and_of_a_file_is_an_error(tmp_path: Path) -> None:
    assert scan(tmp_path / "not-yet") == []
    (tmp_path / "file").write_text("")
    with pytest.raises(LayoutError, match="cannot list the backends directory"):
        scan(tmp_path / "file")


def test_scan_flags_a_meta_backend_whose_target_has_no_run_sh_or_escapes(tmp_path: Path) -> None:
    backends = tmp_path / "backends"
    (backends / "half-installed").mkdir(parents=True)
    make_meta(backends, "meta-a", "half-installed")
    make_meta(backends, "meta-b", "../outside")

    by_name = {b.name: b for b in scan(backends)}

    assert by_name["meta-a"].problem == "meta backend points to half-installed, which has no run.sh"
    assert "is not a single directory name" in by_name["meta-b"].problem


# --- renames -----------------------------------------------------------------------------------


def test_exchange_swaps_two_directories(tmp_path: Path) -> None:
    live = make_backend(tmp_path / "backends", "llama", '{"name": "llama", "version": "1"}')
    staging = make_backend(tmp_path / "state", "llama", '{"name": "llama", "version": "2"}')
    (staging / "new-only").write_text("2")
    live_inode, staging_inode = live.stat().st_ino, staging.stat().st_ino

    exchange(staging, live)

    assert read_metadata(live).version == "2" and (live / "new-only").read_text() == "2"
    assert read_metadata(staging).version == "1" and not (staging / "new-only").exists()
    assert (live.stat().st_ino, staging.stat().st_ino) == (staging_inode, live_inode)


def test_exchange_refuses_a_missing_side_and_nested_paths(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    with pytest.raises(FileNotFoundError):
        exchange(tmp_path / "a", tmp_path / "missing")
    with pytest.raises(LayoutError, match="one contains the other"):
        exchange(tmp_path / "a", tmp_path / "a" / "b")


def test_rename_noreplace_refuses_an_existing_target_and_moves_to_a_free_one(tmp_path: Path) -> None:
    source = make_backend(tmp_path, "source", '{"name": "source"}')
    taken = make_backend(tmp_path, "taken", '{"name": "taken"}')
    (tmp_path / "empty-dir").mkdir()

    for target in (taken, tmp_path / "empty-dir"):
        with pytest.raises(FileExistsError):
            rename_noreplace(source, target)
    rename_noreplace(source, tmp_path / "free")

    assert not source.exists()
    assert read_metadata(tmp_path / "free").name == "source"
    assert read_metadata(taken).name == "taken"


def test_portable_rename_noreplace_fallback_also_refuses_an_existing_target(tmp_path: Path) -> None:
    # The path taken when the filesystem lacks RENAME_NOREPLACE; no local filesystem lacks it.
    source = make_backend(tmp_path, "source")
    (tmp_path / "empty-dir").mkdir()

    with pytest.raises(FileExistsError):
        rename_noreplace_portable(source, tmp_path / "empty-dir")
    rename_noreplace_portable(source, tmp_path / "free")

    assert (tmp_path / "free" / "run.sh").read_text() == RUN_SH and (tmp_path / "empty-dir").is_dir()


# --- state directory ---------------------------------------------------------------------------


def test_state_dirs_are_private_and_the_staging_tree_is_readable_by_localai(tmp_path: Path) -> None:
    state = StateDirs(tmp_path / ".backends-portal")

    staging = state.staging("llama-cpp", "job-7")
    kept = state.kept("llama-cpp", "1.2.3")
    slot = state.trash_slot("llama-cpp")

    for private in (state.root, state.staging_root, state.kept_root, state.journal_path, state.trash):
        assert stat.S_IMODE(private.stat().st_mode) == 0o700, private
    assert stat.S_IMODE(staging.stat().st_mode) == 0o755
    assert staging == state.root / "staging" / "llama-cpp" / "job-7" and not any(staging.iterdir())
    assert kept == state.root / "kept" / "llama-cpp" / "1.2.3" and not kept.exists()
    assert slot.parent == state.trash and not slot.exists()
    with pytest.raises(LayoutError, match="already exists"):
        state.staging("llama-cpp", "job-7")
    with pytest.raises(LayoutError, match="not a single directory name"):
        state.kept("llama-cpp", "../escape")


def test_kept_versions_are_listed_and_the_trash_empties(tmp_path: Path) -> None:
    state = StateDirs(tmp_path / "state")
    for label in ("2", "1"):
        make_backend(state.kept("llama", label).parent, label)
    rename_noreplace(state.kept("llama", "1"), state.trash_slot("llama"))

    assert [p.name for p in state.kept_versions("llama")] == ["2"]
    assert state.empty_trash() == 1
    assert list(state.trash.iterdir()) == []


def test_state_path_inside_backends_or_on_another_filesystem_is_reported(tmp_path: Path) -> None:
    backends = tmp_path / "backends"
    backends.mkdir()

    assert state_path_problems(backends, tmp_path / ".backends-portal") == []
    assert same_filesystem(backends, tmp_path / ".backends-portal" / "not" / "yet")
    inside = state_path_problems(backends, backends / ".portal")
    assert len(inside) == 1 and "where LocalAI would list it as a backend" in inside[0]
    assert not same_filesystem(backends, "/proc")
    elsewhere = state_path_problems(backends, "/proc/portal-state")
    assert any("on another filesystem" in problem for problem in elsewhere)
    with pytest.raises(LayoutError, match="another filesystem"):
        StateDirs("/proc/portal-state").require_usable(backends)


# --- journal -----------------------------------------------------------------------------------


def crash_mid_upgrade(journal_dir: Path, live: Path, staging: Path) -> None:
    """Begin and advance an upgrade in another process that dies without clearing it."""
    script = textwrap.dedent(
        f"""
        import os
        from backends_app.disk.journal import Journal
        journal = Journal({str(journal_dir)!r})
        journal.begin("upgrade", "llama", 42, live={str(live)!r}, staging={str(staging)!r}, step="staging")
        journal.advance("llama", "swapping", extra={{"new_digest": "sha256:abc"}})
        os._exit(9)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=60)
    assert result.returncode == 9, result.stderr.decode()


def test_journal_record_survives_a_crash_and_is_taken_over_then_cleared(tmp_path: Path) -> None:
    live = make_backend(tmp_path / "backends", "llama")
    staging = make_backend(tmp_path / "state" / "staging", "llama")
    journal_dir = tmp_path / "state" / "journal"

    crash_mid_upgrade(journal_dir, live, staging)
    journal = Journal(journal_dir)
    (record,) = journal.pending()

    assert (record.op, record.backend, record.job_id, record.step) == ("upgrade", "llama", "42", "swapping")
    assert [entry["step"] for entry in record.history] == ["staging", "swapping"]
    assert record.extra == {"new_digest": "sha256:abc"}
    assert record.owner_alive is False
    assert record.now_at("staging") == "staging"  # the announced exchange did not happen

    journal.take_over("llama")
    exchange(staging, live)
    journal.advance("llama", "swapped")
    journal.clear("llama")

    assert Journal(journal_dir).pending() == []
    assert sorted(p.suffix for p in journal_dir.iterdir()) == [".lock"]


def test_journal_tells_reconcile_whether_the_announced_move_happened(tmp_path: Path) -> None:
    live = make_backend(tmp_path / "backends", "llama")
    staging = make_backend(tmp_path / "staging", "llama")
    kept = tmp_path / "kept" / "1"
    kept.parent.mkdir()
    with Journal(tmp_path / "journal") as journal:
        journal.begin("upgrade", "llama", "job-1", live=live, staging=staging, kept=kept, step="swapping")
        exchange(staging, live)  # the move happens, then the process "dies" before recording it
        assert Journal(tmp_path / "journal").pending()[0].now_at("staging") == "live"

        record = journal.advance("llama", "confirmed")
        rename_noreplace(staging, kept)
        reread = Journal(tmp_path / "journal").pending()[0]

    assert record.now_at("staging") == "kept" and record.now_at("live") == "live"
    assert reread.step == "confirmed" and reread.now_at("staging") == "kept"


def test_journal_refuses_a_second_operation_on_a_backend_while_one_is_in_flight(tmp_path: Path) -> None:
    live = tmp_path / "backends" / "llama"
    first, second = Journal(tmp_path / "journal"), Journal(tmp_path / "journal")
    first.begin("install", "llama", 1, live=live)

    with pytest.raises(LayoutError, match="already in progress in another process"):
        second.begin("upgrade", "llama", 2, live=live)
    with pytest.raises(LayoutError, match="still running"):
        second.take_over("llama")
    with pytest.raises(LayoutError, match="does not own"):
        second.advance("llama", "swapping")
    assert [r.owner_alive for r in second.pending()] == [True]

    first.release("llama")  # what a crash does: the lock goes, the record stays
    with pytest.raises(LayoutError, match=r"interrupted install of llama .* must be reconciled first"):
        second.begin("upgrade", "llama", 2, live=live)
    second.begin("upgrade", "other", 3, live=tmp_path / "backends" / "other")  # other backends are free
    assert [(r.backend, r.owner_alive) for r in first.pending()] == [("llama", False), ("other", True)]
    second.close()


# --- space -------------------------------------------------------------------------------------


def test_ensure_free_space_refuses_an_absurd_requirement_with_the_numbers(tmp_path: Path) -> None:
    ensure_free_space(tmp_path, 1024, margin=1024)
    absurd = 1 << 60

    with pytest.raises(LayoutError) as caught:
        ensure_free_space(tmp_path / "not-yet", absurd)

    free_mib = free_bytes(tmp_path) / (1 << 20)
    message = str(caught.value)
    assert message.startswith(f"need {absurd / (1 << 20):.1f} MiB, ")
    assert message.endswith(f" MiB free on {tmp_path / 'not-yet'}")
    assert abs(float(message.split(", ")[1].split(" ")[0]) - free_mib) < 64  # others write meanwhile


def test_tree_size_counts_hard_links_once_and_does_not_follow_symlinks(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "lib").mkdir(parents=True)
    (tree / "lib" / "a.so").write_bytes(b"x" * 1000)
    os.link(tree / "lib" / "a.so", tree / "lib" / "a.so.1")
    (tree / "run.sh").write_text("#!/bin/sh\n")
    big = tmp_path / "big"
    big.write_bytes(b"y" * 100_000)
    (tree / "link-to-big").symlink_to(big)

    assert tree_size(tree) == 1000 + len("#!/bin/sh\n")


# --- remove_tree -------------------------------------------------------------------------------


def test_remove_tree_does_not_follow_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "escape").symlink_to(outside)
    (tmp_path / "top-link").symlink_to(outside)

    remove_tree(tree)
    remove_tree(tmp_path / "top-link")
    remove_tree(tmp_path / "never-existed")

    assert not tree.exists() and not (tmp_path / "top-link").is_symlink()
    assert (outside / "keep.txt").read_text() == "precious"


def test_remove_tree_removes_read_only_and_unlistable_directories() -> None:
    # Root ignores permissions, so as root the tree is built and removed by "nobody".
    as_root = os.geteuid() == 0
    python = shutil.which("python3", path="/usr/bin:/bin") if as_root else sys.executable
    if python is None:
        pytest.skip("running as root needs a system python3 that the nobody user can execute")
    workdir = Path(tempfile.mkdtemp(prefix="layout-rm-"))
    try:
        workdir.chmod(0o777)
        script = textwrap.dedent(
            f"""
            import os
            from pathlib import Path
            from backends_app.disk.fsops import remove_tree
            tree = Path({str(workdir)!r}) / "tree"
            (tree / "ro" / "deep").mkdir(parents=True)
            (tree / "ro" / "deep" / "f").write_text("x")
            (tree / "sealed").mkdir()
            (tree / "sealed" / "g").write_text("y")
            os.chmod(tree / "ro" / "deep", 0o500)
            os.chmod(tree / "ro", 0o500)
            os.chmod(tree / "sealed", 0o000)
            try:
                os.unlink(tree / "ro" / "deep" / "f")
            except PermissionError:
                pass
            else:
                raise SystemExit("permissions are not enforced for this user")
            remove_tree(tree)
            print("gone" if not tree.exists() else "still there")
            """
        )
        extra = {"user": 65534, "group": 65534, "extra_groups": []} if as_root else {}
        result = subprocess.run(
            [python, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60, **extra
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "gone"
    finally:
        for root, dirs, _files in os.walk(workdir):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o700)
        shutil.rmtree(workdir)


# --- health checks -----------------------------------------------------------------------------


def test_default_health_check_passes_an_executable_run_sh_and_fails_the_rest(tmp_path: Path) -> None:
    backends = tmp_path / "backends"
    good = make_backend(backends, "good")
    not_executable = make_backend(backends, "not-executable", mode=0o644)
    no_shebang = make_backend(backends, "no-shebang")
    (no_shebang / "run.sh").write_text("exec ./backend\n")
    (backends / "empty").mkdir()
    meta = make_meta(backends, "meta", "good")
    dangling_meta = make_meta(backends, "dangling-meta", "gone")

    assert health_check(good).ok and health_check(good).detail == "run.sh present and executable"
    assert health_check(not_executable).detail == "run.sh is not executable (mode 0644)"
    assert not health_check(no_shebang).ok
    assert health_check(backends / "empty").detail == "run.sh missing"
    assert health_check(meta).ok and "meta backend for good" in health_check(meta).detail
    assert health_check(dangling_meta).detail == "meta backend points to missing directory gone"


def test_health_check_command_passes_on_exit_0_with_the_path_substituted(tmp_path: Path) -> None:
    backend = make_backend(tmp_path / "with space", "llama")

    result = health_check(backend, 'sh -c \'test -x "$1/run.sh" && echo checked "$1"\' sh {path}')

    assert result.ok, result.detail
    assert result.detail == f"exit 0; output:\nchecked {backend}"


def test_health_check_command_failure_reports_exit_code_and_last_output(tmp_path: Path) -> None:
    backend = make_backend(tmp_path, "llama")

    result = health_check(backend, "sh -c 'seq 1 500; echo model load failed >&2; exit 3'")
    missing = health_check(backend, "/nonexistent/check {path}")

    assert not result.ok
    lines = result.detail.splitlines()
    assert lines[0] == "exit 3; output:"
    assert lines[-1] == "model load failed" and len(lines) == 21  # bounded to the last 20 lines
    assert not missing.ok and "cannot start" in missing.detail


def test_health_check_timeout_kills_the_whole_process_group_quickly(tmp_path: Path) -> None:
    backend = make_backend(tmp_path, "llama")
    pid_file = tmp_path / "grandchild.pid"

    started = time.monotonic()
    # Long enough for the shell to start its background sleep on a loaded machine.
    result = health_check(backend, f"sh -c 'sleep 300 & echo $! > {pid_file}; sleep 300'", timeout=5)
    elapsed = time.monotonic() - started

    assert not result.ok
    assert result.detail.startswith("timed out after 5 s; process group killed")
    assert elapsed < 60  # the timeout, not the command's five minutes
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 60
    while Path(f"/proc/{grandchild}").exists() and "Z" not in _proc_state(grandchild):
        assert time.monotonic() < deadline, "the background sleep survived the timeout"
        time.sleep(0.01)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"
