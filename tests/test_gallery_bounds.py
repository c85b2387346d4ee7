"""Hostile gallery indexes are refused with a message naming the bound they hit, and change nothing.

Each document here is generated: a billion-laughs alias bomb, far too many entries, a document of
millions of plain values, nesting thousands of levels deep, and names a directory cannot carry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from backends_app import gallery
from backends_app.disk import layout
from backends_app.disk.journal import Journal
from backends_app.gallery import GalleryError
from backends_app.models import Backend, Gallery

REPO = Path(__file__).resolve().parents[1]
GOOD_INDEX = "- name: alpha\n  uri: quay.io/x/alpha:latest\n- name: beta\n  uri: quay.io/x/beta:latest\n"


def parse_error(text: str, **limits: Any) -> str:
    with pytest.raises(GalleryError) as caught:
        gallery.parse(text, **limits)
    return str(caught.value)


def entries(count: int) -> str:
    return "".join(f"- {{name: b{i}, uri: 'quay.io/x/b:{i}'}}\n" for i in range(count))


def billion_laughs(levels: int = 9) -> str:
    lines = "".join(f"  l{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, levels + 1))
    return "- name: lol\n  uri: x\n  l0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + lines


def flat(values: int) -> str:
    """One entry carrying `values` plain numbers: no alias anywhere."""
    return "- name: flat\n  uri: x\n  extra: [" + "1," * values + "1]\n"


def deep(levels: int) -> str:
    return "- name: deep\n  uri: x\n  extra: " + "[" * levels + "]" * levels + "\n"


# --------------------------------------------------------------------------- the parser's bounds


def test_an_index_with_more_entries_than_the_limit_is_refused_naming_the_limit() -> None:
    assert len(gallery.parse(entries(100), max_entries=100)) == 100

    message = parse_error(entries(101), max_entries=100)

    assert "the index has more than 100 entries" in message


def test_an_alias_bomb_is_refused_naming_the_node_limit() -> None:
    message = parse_error(billion_laughs(), max_nodes=1_000_000)

    assert "the index expands to more than 1000000 YAML nodes" in message
    assert "aliases" in message  # says why a small document can be that large


def test_a_large_document_without_aliases_is_refused_naming_the_node_limit() -> None:
    message = parse_error(flat(20_000), max_nodes=10_000)

    assert "the index expands to more than 10000 YAML nodes" in message
    assert "aliases" not in message  # there are none: the old message blamed them


def test_deep_nesting_is_refused_naming_the_depth_limit() -> None:
    message = parse_error(deep(5000))

    assert f"nested deeper than {gallery.MAX_DEPTH} levels" in message


def test_the_default_bounds_hold_a_32_mib_document_in_a_quarter_gigabyte() -> None:
    """A child process capped at 1 GiB of address space parses a 32 MiB document of 16 million values.

    Before the bound was checked while reading, the whole document was built first (2.5 GB for
    this one) and the child died of MemoryError.
    """
    script = textwrap.dedent(
        """
        import json, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from backends_app import gallery
        text = "- name: flat\\n  uri: x\\n  extra: [" + "1," * (16 * 1024 * 1024 - 64) + "1]\\n"
        try:
            gallery.parse(text)
        except gallery.GalleryError as exc:
            result = {"refused": str(exc)}
        else:
            result = {"accepted": True}
        # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec.
        status = open("/proc/self/status").read()
        result["peak_mib"] = int(status.split("VmHWM:")[1].split()[0]) // 1024
        print(json.dumps(result))
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )

    assert child.returncode == 0, child.stderr[-2000:]
    result = json.loads(child.stdout)
    assert f"the index expands to more than {gallery.DEFAULT_MAX_NODES} YAML nodes" in result["refused"]
    assert result["peak_mib"] < 256


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name",
    [
        "next\x85line",  # C1 control character (NEL)
        "evil\u202egnp.exe",  # right-to-left override
        "zero\u200bwidth",  # zero-width space
        "joined\u2060word",  # word joiner
        "bom\ufeffname",  # zero-width no-break space
        "line\u2028break",  # line separator
        "no\u00a0break",  # no-break space, looks like a space
        "tab\there",
        "del\x7fete",
    ],
)
def test_names_with_invisible_or_control_characters_are_refused(name: str) -> None:
    message = parse_error(f"- name: {json.dumps(name)}\n  uri: x\n")

    assert "'name'" in message
    assert "U+" in message  # names the character, which cannot be shown


def test_a_name_at_the_byte_bound_is_accepted_and_one_byte_more_is_refused() -> None:
    longest = "n" * gallery.NAME_MAX_BYTES
    (entry,) = gallery.parse(f"- name: {longest}\n  uri: x\n")
    assert entry.name == longest

    message = parse_error(f"- name: {longest}x\n  uri: x\n")
    assert f"longer than {gallery.NAME_MAX_BYTES} bytes" in message
    wide = "é" * (gallery.NAME_MAX_BYTES // 2 + 1)  # two bytes each in UTF-8
    assert f"longer than {gallery.NAME_MAX_BYTES} bytes" in parse_error(f"- name: {wide}\n  uri: x\n")


def test_a_name_at_the_byte_bound_fits_every_file_the_portal_makes_from_it(tmp_path: Path) -> None:
    """The journal's record, lock and temporary file, the staging, kept and trash paths: all made."""
    name = "n" * gallery.NAME_MAX_BYTES
    state = layout.StateDirs(tmp_path / "state")
    state.ensure()
    live = tmp_path / "backends" / name
    live.mkdir(parents=True)
    journal = Journal(state.journal_path)

    journal.begin("install", name, 1, live=live, staging=state.staging(name, "job-1"))
    journal.advance(name, "downloaded")
    layout.write_metadata(live, layout.BackendMetadata(name=name))
    kept = state.kept(name, "20260101T000000-job1")
    live.rename(kept)
    kept.rename(state.trash_slot(name))
    journal.clear(name)

    assert state.empty_trash() == 1
    assert not list(state.journal_path.glob("*.json"))


# --------------------------------------------------------------------------- a sync changes nothing


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("document", "limits", "expected"),
    [
        (entries(30), {"PORTAL_GALLERY_MAX_ENTRIES": 20}, "the index has more than 20 entries"),
        (billion_laughs(), {}, "YAML nodes"),
        (flat(5000), {"PORTAL_GALLERY_MAX_NODES": 1000}, "the index expands to more than 1000 YAML nodes"),
        (deep(2000), {}, "nested deeper than"),
        ('- name: "a\\u202eb"\n  uri: x\n', {}, "U+202E"),
        (f"- name: {'n' * 255}\n  uri: x\n", {}, "bytes"),
    ],
    ids=["entries", "alias-bomb", "nodes", "depth", "bidi-name", "long-name"],
)
def test_a_hostile_index_changes_nothing_and_the_gallery_says_which_bound(
    tmp_path: Path, settings: Any, document: str, limits: dict[str, int], expected: str
) -> None:
    index = tmp_path / "index.yaml"
    index.write_text(GOOD_INDEX)
    source = Gallery.objects.create(name="hostile", url=index.as_uri())
    assert source.sync().ok
    source.refresh_from_db()
    before = (source.etag, source.entry_count, source.last_synced_at)
    rows = list(Backend.objects.filter(gallery=source).order_by("pk").values())
    for knob, value in limits.items():
        setattr(settings, knob, value)

    index.write_text(document)
    result = source.sync()

    assert not result.ok and expected in result.error
    source.refresh_from_db()
    assert expected in source.last_error
    assert (source.etag, source.entry_count, source.last_synced_at) == before
    assert list(Backend.objects.filter(gallery=source).order_by("pk").values()) == rows
