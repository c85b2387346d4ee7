"""Publishing images other tools accept, and pulling images other tools built (skopeo, umoci)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from backends_app.oci import OCIError, publish
from tests.registry import RegistryServer, tool_or_skip
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
