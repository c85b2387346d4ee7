"""`manage.py backends` behaves like LocalAI's `local-ai backends` (core/cli/backends.go), plus ours:
the same lines for list, upgrade and uninstall, and an exit status that says when something failed
(LocalAI exits 0 when an upgrade fails)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from backends_app.models import Backend, JobKind, UpgradeJob
from tests.conftest import REPO, image, live_version, subprocess_env
from tests.helpers.api import install, make_backend, make_gallery

LOCALAI_LINE = ("Upgrading ", "Backend ", "All backends", "No upgrades", "Failed to ")


class Demo:
    """Backends alpha (gallery version 1.0) and beta (no version) installed; gamma only listed."""

    def __init__(self, registry: Any, gallery_factory: Any) -> None:
        self.registry, self.gallery_factory = registry, gallery_factory
        self.repos = {name: registry.unique_repo() for name in ("alpha", "beta", "gamma")}
        for name in ("alpha", "beta"):
            registry.push_image(image(f"{name} 1"), repo=self.repos[name], tag="latest")
        self.publish_gallery("1.0")

    def publish_gallery(self, alpha_version: str) -> None:
        ref = {name: self.registry.ref(repo, "latest") for name, repo in self.repos.items()}
        self.gallery_factory(
            [
                {"name": "alpha", "uri": ref["alpha"], "version": alpha_version},
                {"name": "beta", "uri": ref["beta"]},
                {"name": "gamma", "uri": ref["gamma"], "version": "0.3"},
            ]
        )

    def release_alpha(self, version: str, **kwargs: Any) -> None:
        self.registry.push_image(image(f"alpha {version}", **kwargs), repo=self.repos["alpha"], tag="latest")
        self.publish_gallery(version)

    def rebuild_beta(self) -> None:
        self.registry.push_image(image("beta 2"), repo=self.repos["beta"], tag="latest")


@pytest.fixture
def demo(registry: Any, gallery_factory: Any) -> Demo:
    made = Demo(registry, gallery_factory)
    run("install", "alpha", "beta")
    return made


def run(*args: str) -> tuple[str, str]:
    """The command in this process: (stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    call_command("backends", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def localai_lines(text: str) -> list[str]:
    """LocalAI's lines of an output, without our progress and job lines."""
    return [line for line in text.splitlines() if line.startswith(LOCALAI_LINE)]


# --- list ---------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_list_shows_every_gallery_entry_with_localais_markers(demo: Demo) -> None:
    assert run("list")[0] == (
        " * test@alpha v1.0 (installed)\n * test@beta (installed)\n - test@gamma v0.3\n"
    )

    demo.release_alpha("2.0")
    demo.rebuild_beta()
    out, _ = run("list", "--check")

    assert out == (
        " * test@alpha v2.0 (installed, upgrade available: 2.0)\n"
        " * test@beta (installed, upgrade available: new build)\n"
        " - test@gamma v0.3\n"
    )
    assert run("list")[0] == out  # the check's verdict is kept for the next list


@pytest.mark.django_db
def test_list_installed_is_our_table_with_each_backends_status(demo: Demo) -> None:
    demo.release_alpha("2.0")
    run("check")

    header, *rows = run("list", "--installed")[0].splitlines()

    assert header.split() == ["NAME", "NODE", "VERSION", "DIGEST", "INSTALLED", "AT", "STATUS", "PINNED"]
    assert [row.split()[0] for row in rows] == ["alpha", "beta"]
    assert "upgrade available: version 1.0 -> 2.0" in rows[0]
    assert rows[1].endswith("up to date")


@pytest.mark.django_db
def test_list_leaves_out_disabled_galleries_and_shadowed_duplicates() -> None:
    kept, off = make_gallery("kept"), make_gallery("off")
    make_backend(kept, "one", version="", position=0)
    make_backend(kept, "one", version="9", position=1, occurrence=1)  # the first entry of a name wins
    make_backend(off, "two", version="")
    off.enabled = False
    off.save()

    assert run("list")[0] == " - kept@one\n"


@pytest.mark.django_db
def test_list_of_an_empty_portal_prints_nothing_on_stdout() -> None:
    out, err = run("list")

    assert out == "" and "gallery sync" in err


# --- upgrade ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_upgrade_with_nothing_upgradable_says_all_backends_are_up_to_date(demo: Demo) -> None:
    assert run("upgrade") == ("All backends are up to date.\n", "")
    assert run("upgrade", "--all") == ("All backends are up to date.\n", "")
    assert run("upgrade", "beta") == ("All backends are up to date.\n", "")  # as LocalAI, names or not
    assert not UpgradeJob.objects.filter(kind=JobKind.UPGRADE).exists()


@pytest.mark.django_db
def test_upgrade_without_names_checks_first_then_upgrades_everything_upgradable(
    demo: Demo, settings: Any
) -> None:
    demo.release_alpha("2.0")
    demo.rebuild_beta()  # nobody ran a check: the command looks first, as LocalAI's does

    out, err = run("upgrade")

    assert localai_lines(out) == [
        "Upgrading alpha to v2.0...",
        "Backend alpha upgraded successfully",
        "Upgrading beta...",
        "Backend beta upgraded successfully",
    ]
    assert err == ""
    assert live_version(settings, "alpha") == "alpha 2.0" and live_version(settings, "beta") == "beta 2"
    assert run("upgrade", "--all")[0] == "All backends are up to date.\n"


@pytest.mark.django_db
def test_a_named_backend_with_no_upgrade_is_skipped_unless_forced(demo: Demo, settings: Any) -> None:
    demo.release_alpha("2.0")

    assert run("upgrade", "beta") == ("Backend beta: no upgrade available\nNo upgrades to apply.\n", "")
    assert not UpgradeJob.objects.filter(kind=JobKind.UPGRADE).exists()

    out, _ = run("upgrade", "alpha", "beta")
    assert localai_lines(out) == [
        "Backend beta: no upgrade available",
        "Upgrading alpha to v2.0...",
        "Backend alpha upgraded successfully",
    ]
    assert live_version(settings, "alpha") == "alpha 2.0"

    out, _ = run("upgrade", "beta", "--force")
    assert localai_lines(out) == ["Upgrading beta...", "Backend beta upgraded successfully"]
    job = UpgradeJob.objects.get(kind=JobKind.UPGRADE, backend__name="beta")
    assert job.force is True and job.status == "succeeded"


@pytest.mark.django_db
def test_upgrade_json_lists_the_jobs_and_the_backends_skipped(demo: Demo) -> None:
    demo.release_alpha("2.0")

    alpha, beta = json.loads(run("upgrade", "alpha", "beta", "--json")[0])

    assert (alpha["name"], alpha["status"], alpha["kind"]) == ("alpha", "succeeded", "upgrade")
    assert beta == {
        **dict.fromkeys(alpha),
        "name": "beta",
        "status": "skipped",
        "message": "no upgrade available",
    }
    assert json.loads(run("upgrade", "--json")[0]) == []


@pytest.mark.django_db
def test_a_backend_the_check_cannot_reach_is_a_failure(settings: Any) -> None:
    settings.PORTAL_REGISTRY_RETRIES = 0
    gallery = make_gallery("far")
    install(make_backend(gallery, "unreachable", uri="127.0.0.1:9/nobody/home:latest", version=""))

    with pytest.raises(CommandError, match="1 backend\\(s\\) not upgraded: unreachable: check failed"):
        run("upgrade")
    with pytest.raises(CommandError, match="check failed"):
        run("upgrade", "unreachable")
    assert not UpgradeJob.objects.filter(kind=JobKind.UPGRADE).exists()


@pytest.mark.django_db
def test_a_pinned_backend_with_an_upgrade_is_refused_by_name_and_left_out_of_all(demo: Demo) -> None:
    demo.release_alpha("2.0")
    run("pin", "alpha")

    assert run("upgrade")[0] == "All backends are up to date.\n"
    with pytest.raises(CommandError, match=r"not upgraded: alpha: alpha is pinned"):
        run("upgrade", "alpha")
    assert localai_lines(run("upgrade", "alpha", "--force")[0]) == [
        "Upgrading alpha to v2.0...",
        "Backend alpha upgraded successfully",
    ]


# --- the other verbs ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_uninstall_and_install_print_localais_lines(demo: Demo, settings: Any) -> None:
    out, _ = run("uninstall", "beta")
    assert localai_lines(out) == ["Backend beta uninstalled successfully"]
    assert not Backend.objects.get(name="beta").installed.exists()

    out, _ = run("install", "beta")
    assert localai_lines(out) == ["Backend beta installed successfully"]
    assert live_version(settings, "beta") == "beta 1"


# --- exit status, from a real process -----------------------------------------------------------


def command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "backends", *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.single_pass
def test_the_exit_status_says_whether_everything_succeeded(demo: Demo, settings: Any) -> None:
    nothing = command("upgrade")
    assert (nothing.returncode, nothing.stdout) == (0, "All backends are up to date.\n")

    demo.release_alpha("2.0", executable=False)  # fails its health check: rolled back
    failed = command("upgrade")
    assert failed.returncode == 1, failed.stdout + failed.stderr  # LocalAI exits 0 here
    assert localai_lines(failed.stdout) == ["Upgrading alpha to v2.0..."]
    assert "Failed to upgrade alpha: " in failed.stderr
    assert failed.stderr.endswith("CommandError: 1 backend(s) not upgraded: alpha: failed\n")
    assert live_version(settings, "alpha") == "alpha 1"

    skipped = command("upgrade", "beta")
    assert (skipped.returncode, skipped.stdout) == (
        0,
        "Backend beta: no upgrade available\nNo upgrades to apply.\n",
    )
    unknown = command("upgrade", "nope")
    assert unknown.returncode == 1 and "no backend named 'nope'" in unknown.stderr
    usage = command("upgrade", "--no-such-flag")
    assert usage.returncode == 2 and "unrecognized arguments" in usage.stderr
