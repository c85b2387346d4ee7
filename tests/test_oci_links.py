"""Symlinks and modes of unpacked images: no installed link leads outside the backend tree, whatever
the order of entries and layers; absolute links are re-rooted inside it; nothing is world-writable."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import pytest

from backends_app.oci import Directory, OCIError, UnsafeArchive, unpack_layers
from backends_app.oci.publish import layer_from_tar, push_image
from tests.registry import RegistryServer
from tests.test_oci_unpack import Entry, _dir, _file, _hardlink, _symlink, layer, make_tar, snapshot

# -- every installed link stays inside, for any tree -------------------------------------------------

NAMES = ("a", "b", "c")
CASES = 500


class _ImageGenerator:
    """Random small images, biased toward what makes links escape: a link whose target goes down
    through directories and back up, then one of those directories replaced by a link that goes
    up (in the same layer, or whited out first in a later one)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.dirs: list[str] = []
        self.files: list[str] = []

    def path(self) -> str:
        return "/".join(self.rng.choice(NAMES) for _ in range(self.rng.randint(1, 3)))

    def known(self, pool: list[str]) -> str:
        return self.rng.choice(pool) if pool and self.rng.random() < 0.7 else self.path()

    def link(self) -> Entry:
        """A link through known directories and back up, a link replacing a known directory, or
        a link with any mix of names and dots; one in ten absolute."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.4:
            parent = self.known(self.dirs) if rng.random() < 0.5 else ""
            path = f"{parent}/l{rng.randint(0, 99)}" if parent else f"l{rng.randint(0, 99)}"
            down = self.known(self.dirs)
            ups = rng.randint(1, down.count("/") + 1 + (parent.count("/") + 1 if parent else 0))
            target = "/".join([down, *[".."] * ups])
        elif roll < 0.7:
            path = self.known(self.dirs)
            target = "/".join([".."] * rng.randint(1, max(1, path.count("/"))))
        else:
            path = self.path()
            target = "/".join(rng.choice(("..", ".", *NAMES)) for _ in range(rng.randint(1, 4)))
        return _symlink(path, "/" + target if rng.random() < 0.1 else target)

    def layer(self) -> list[Entry]:
        rng = self.rng
        entries: list[Entry] = []
        for _ in range(rng.randint(1, 8)):
            kind = rng.choices(["dir", "file", "link", "whiteout", "opaque", "hardlink"], [5, 2, 5, 2, 1, 1])[
                0
            ]
            if kind == "dir":
                path = self.path()
                entries.append(_dir(path))
                self.dirs.append(path)
            elif kind == "file" or (kind == "hardlink" and not self.files):
                path = f"{self.known(self.dirs)}/f{len(self.files)}"  # never a parent of anything
                entries.append(_file(path))
                self.files.append(path)
            elif kind == "link":
                entries.append(self.link())
            elif kind == "whiteout":
                parent, _, base = self.known(self.dirs).rpartition("/")
                entries.append(_file(f"{parent}/.wh.{base}" if parent else f".wh.{base}"))
            elif kind == "opaque":
                entries.append(_file(f"{self.known(self.dirs)}/.wh..wh..opq"))
            else:
                entries.append(_hardlink(f"{self.known(self.dirs)}/h{len(entries)}", rng.choice(self.files)))
        if rng.random() < 0.6:  # links last (in their own order), as image builders often write them
            entries.sort(key=lambda entry: entry[0].issym())
        return entries


def _random_image(seed: int) -> list[list[Entry]]:
    generator = _ImageGenerator(seed)
    return [generator.layer() for _ in range(generator.rng.randint(1, 3))]


def _describe(layers: list[list[Entry]]) -> str:
    return " | ".join(
        ", ".join(f"{info.name}" + (f" -> {info.linkname}" if info.linkname else "") for info, _ in entries)
        for entries in layers
    )


def _escaping_links(dest: Path) -> list[str]:
    """Links under ``dest`` that the host resolves outside it (the kernel's view, not the unpacker's)."""
    root = os.path.realpath(dest)
    found = []
    for current, dirs, files in os.walk(dest):
        for name in dirs + files:
            path = os.path.join(current, name)
            if not os.path.islink(path):
                continue
            target = os.readlink(path)
            resolved = os.path.realpath(path)
            if target.startswith("/") or os.path.commonpath([root, resolved]) != root:
                found.append(f"{os.path.relpath(path, dest)} -> {target} (at {resolved})")
    return found


def test_no_installed_link_resolves_outside_the_tree_whatever_the_entries_and_layers(tmp_path: Path) -> None:
    """Random small images of directories, files, links, hard links and whiteouts over 1-3 layers
    (seeded, so a failure names a case that can be replayed): each is either refused, leaving
    nothing, or installed with every link resolving inside the tree."""
    escapes: list[str] = []
    installed = refused = 0
    for seed in range(CASES):
        layers = _random_image(seed)
        base = tmp_path / str(seed)
        (base / "x" / "y").mkdir(parents=True)
        dest = base / "x" / "y" / "root"
        try:
            unpack_layers(dest, [layer(entries, "none") for entries in layers])
        except OCIError as exc:
            refused += 1
            assert not dest.exists(), f"seed {seed}: refused ({exc}) but left {dest}"
            if isinstance(exc, UnsafeArchive):
                assert "entry '" in str(exc), f"seed {seed}: the refusal names no entry: {exc}"
        else:
            installed += 1
            escapes += [f"seed {seed} [{_describe(layers)}]: {link}" for link in _escaping_links(dest)]
        outside = {p for p in snapshot(base) if not p.startswith("x/y/root")}
        assert outside == {"x", "x/y"}, f"seed {seed}: written outside the target: {outside}"
    assert not escapes, "links resolving outside the tree:\n" + "\n".join(escapes[:20])
    # The generator must exercise both outcomes, or the property above says little.
    assert installed > CASES // 4 and refused > CASES // 10, (installed, refused)


def test_a_swapped_link_pulled_from_the_registry_is_refused_and_leaves_nothing(
    registry: RegistryServer, tmp_path: Path
) -> None:
    lower = layer_from_tar(make_tar([_dir("s"), _dir("s/d"), _file("run.sh"), _symlink("esc", "s/d/../..")]))
    upper = layer_from_tar(make_tar([_file("s/.wh.d"), _symlink("s/d", "..")]))
    ref = registry.ref(registry.unique_repo("swap"))
    target_parent = tmp_path / "backends"
    target_parent.mkdir()
    with registry.client() as client:
        push_image(client, ref, {"linux/amd64": [lower, upper]})
        with pytest.raises(UnsafeArchive) as info:
            client.pull(ref, target_parent / "swapped")
    assert "entry 'esc'" in str(info.value)
    assert "through the symlink 's/d' written by layer 2/2" in str(info.value)
    assert list(target_parent.iterdir()) == []


# -- absolute links are re-rooted ------------------------------------------------------------------------

DISTRO_LIB = Path("/usr/lib/x86_64-linux-gnu")
# What Debian 12 ships there, for machines without that directory.
DEBIAN_SAMPLE = {
    "libz.so": "/lib/x86_64-linux-gnu/libz.so.1.2.13",
    "libbz2.so": "/lib/x86_64-linux-gnu/libbz2.so.1.0",
    "liblzma.so": "/lib/x86_64-linux-gnu/liblzma.so.5.4.1",
    "libcrypt.so": "/lib/x86_64-linux-gnu/libcrypt.so.1",
}


def _distro_absolute_links() -> dict[str, str]:
    """This machine's absolute symlinks in its multiarch library directory (Debian has 18)."""
    found: dict[str, str] = {}
    if DISTRO_LIB.is_dir():
        for entry in os.scandir(DISTRO_LIB):
            if entry.is_symlink() and os.readlink(entry.path).startswith("/"):
                found[entry.name] = os.readlink(entry.path)
    return found or dict(DEBIAN_SAMPLE)


def test_absolute_links_of_a_distro_library_directory_are_rerooted_inside_the_backend(
    registry: RegistryServer, tmp_path: Path
) -> None:
    links = _distro_absolute_links()
    lib = "usr/lib/x86_64-linux-gnu"
    # One link gets its real target file, so reading through the re-rooted link can be checked.
    name = "libz.so" if "libz.so" in links else sorted(links)[0]
    real = Path(links[name])
    content = real.read_bytes() if real.is_file() else b"\x7fELF library bytes"
    entries = [
        _dir("usr"),
        _dir("usr/lib"),
        _dir(lib),
        _symlink("lib", "usr/lib"),  # merged /usr, as on Debian: /lib/x86_64-linux-gnu is usr/lib/...
        _file(f"{lib}/{os.path.basename(links[name])}", content, 0o644),
        *[_symlink(f"{lib}/{link}", target) for link, target in sorted(links.items())],
        _file("run.sh", b"#!/bin/sh\nexec true\n", 0o755),
    ]
    ref = registry.ref(registry.unique_repo("distro"))
    with registry.client() as client:
        push_image(client, ref, {"linux/amd64": [layer_from_tar(make_tar(entries))]})
        result = client.pull(ref, tmp_path / "backend")
    dest = result.dest
    for link, target in links.items():
        assert os.readlink(dest / lib / link) == "../../../" + target.lstrip("/"), link
    assert (dest / lib / name).read_bytes() == content
    assert Path(os.path.realpath(dest / lib / name)) == Path(os.path.realpath(dest / lib / real.name))
    assert _escaping_links(dest) == []


def test_absolute_targets_are_rerooted_at_the_tree_root(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    unpack_layers(
        dest,
        [
            layer(
                [
                    _dir("etc"),
                    _file("etc/passwd", b"backend's own"),
                    _symlink("etc/up", "/../../etc/passwd"),  # '/..' is '/'
                    _symlink("bin/root", "/"),
                    _symlink("top", "/etc/./passwd"),
                ]
            )
        ],
    )
    assert os.readlink(dest / "etc/up") == "../etc/passwd"
    assert os.readlink(dest / "bin/root") == ".."
    assert os.readlink(dest / "top") == "etc/passwd"
    assert (dest / "etc/up").read_bytes() == (dest / "top").read_bytes() == b"backend's own"
    assert _escaping_links(dest) == []


# -- modes ---------------------------------------------------------------------------------------------


def test_world_writable_and_sticky_entries_lose_write_for_others(
    registry: RegistryServer, tmp_path: Path
) -> None:
    ref = registry.push_image(
        {
            "tmp": Directory(0o1777),
            "shared": Directory(0o777),
            "group": Directory(0o2775),
            "ro": Directory(0o555),
            "run.sh": ("#!/bin/sh\n", 0o777),
            "data": ("x", 0o666),
            "bin/tool": ("\x7fELF", 0o4755),
        }
    )
    with registry.client() as client:
        dest = client.pull(ref, tmp_path / "backend").dest
    modes = {rel: stat.S_IMODE((dest / rel).lstat().st_mode) for rel in snapshot(dest)}
    assert modes == {
        "tmp": 0o775,
        "shared": 0o775,
        "group": 0o775,
        "ro": 0o555,
        "run.sh": 0o775,
        "data": 0o664,
        "bin": 0o755,
        "bin/tool": 0o755,
    }
