"""Fan-out across nodes: one parent job, a child per node, each node's disk on its own, drift and converge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django_q.conf import Conf

from backends_app.models import Backend, JobKind, JobStatus, Node, OperationRefused, UpgradeJob

pytestmark = pytest.mark.django_db(transaction=True)


def version_on(node: Node, name: str = "cpu-demo") -> str | None:
    path = Path(node.backends_path) / name / "lib/version.txt"
    return path.read_text() if path.exists() else None


@pytest.fixture
def nodes(tmp_path: Path, monkeypatch: Any) -> list[Node]:
    monkeypatch.setattr(Conf, "SYNC", True)  # each child job runs as soon as it is queued
    made = []
    for name in ("n1", "n2", "n3"):
        root = tmp_path / name
        made.append(
            Node.objects.create(
                name=name,
                backends_path=str(root / "backends"),
                state_path=str(root / ".backends-portal"),
                queue=name,
            )
        )
    return made


@pytest.fixture
def checked(published: Any, gallery_factory: Any) -> Backend:
    """cpu-demo with a health check that fails on a node whose backends directory holds .fail-health."""
    gallery_factory(
        [
            {
                "name": "cpu-demo",
                "uri": published.ref,
                "healthcheck": {"command": "sh -c 'test ! -e {path}/../.fail-health'"},
            }
        ]
    )
    return Backend.objects.lookup("cpu-demo")


def test_an_upgrade_reaches_exactly_the_nodes_that_have_the_backend(
    checked: Backend, published: Any, nodes: list[Node]
) -> None:
    n1, n2, n3 = nodes
    install, created = checked.fan_out(JobKind.INSTALL, nodes=[n1, n2], requested_by="test")
    install.refresh_from_db()
    assert created and install.status == JobStatus.SUCCEEDED, install.message
    published.push("v2")

    upgrade, _ = checked.fan_out(JobKind.UPGRADE, requested_by="test")

    upgrade.refresh_from_db()
    assert upgrade.status == JobStatus.SUCCEEDED
    assert sorted(c.node.name for c in upgrade.children.all()) == ["n1", "n2"]
    assert (version_on(n1), version_on(n2), version_on(n3)) == ("v2", "v2", None)
    assert "2 of 2 node(s) succeeded" in upgrade.message


def test_a_node_failing_its_health_check_rolls_back_alone_and_the_parent_says_so(
    checked: Backend, published: Any, nodes: list[Node]
) -> None:
    n1, n2, _ = nodes
    checked.fan_out(JobKind.INSTALL, nodes=[n1, n2])
    published.push("v2")
    (Path(n2.backends_path) / ".fail-health").write_text("")

    upgrade, _ = checked.fan_out(JobKind.UPGRADE)

    upgrade.refresh_from_db()
    assert upgrade.status == JobStatus.PARTIAL
    assert "n2: rolled back" in upgrade.message and "n1: succeeded" in upgrade.message
    assert (version_on(n1), version_on(n2)) == ("v2", "v1")

    checked.refresh_from_db()
    checked = Backend.objects.prefetch_related("installed").get(pk=checked.pk)
    assert checked.drift
    (Path(n2.backends_path) / ".fail-health").unlink()
    checked.release_hold()
    converge, _ = checked.converge(requested_by="test")
    converge.refresh_from_db()
    assert converge.status == JobStatus.SUCCEEDED
    assert [c.node.name for c in converge.children.all()] == ["n2"]  # only the lagging node
    assert not Backend.objects.prefetch_related("installed").get(pk=checked.pk).drift
    assert version_on(n2) == "v2"


def test_a_failing_canary_stops_the_fan_out_before_the_other_nodes(
    checked: Backend, published: Any, nodes: list[Node]
) -> None:
    n1, n2, n3 = nodes
    checked.fan_out(JobKind.INSTALL, nodes=nodes)
    published.push("v2")
    (Path(n1.backends_path) / ".fail-health").write_text("")

    upgrade, _ = checked.fan_out(JobKind.UPGRADE, canary=True)

    upgrade.refresh_from_db()
    assert upgrade.status == JobStatus.FAILED
    statuses = {c.node.name: c.status for c in upgrade.children.all()}
    assert statuses == {"n1": JobStatus.ROLLED_BACK, "n2": JobStatus.CANCELLED, "n3": JobStatus.CANCELLED}
    assert (version_on(n1), version_on(n2), version_on(n3)) == ("v1", "v1", "v1")


def test_a_succeeding_canary_lets_the_other_nodes_follow(
    checked: Backend, published: Any, nodes: list[Node]
) -> None:
    checked.fan_out(JobKind.INSTALL, nodes=nodes)
    published.push("v2")

    upgrade, _ = checked.fan_out(JobKind.UPGRADE, canary=True)

    upgrade.refresh_from_db()
    assert upgrade.status == JobStatus.SUCCEEDED
    assert [version_on(node) for node in nodes] == ["v2", "v2", "v2"]


def test_fan_out_of_a_backend_installed_nowhere_is_refused(checked: Backend, nodes: list[Node]) -> None:
    with pytest.raises(OperationRefused, match="not installed on any node"):
        checked.fan_out(JobKind.UPGRADE)
    assert not UpgradeJob.objects.exists()


def test_jobs_are_routed_to_their_nodes_cluster(
    checked: Backend, nodes: list[Node], monkeypatch: Any
) -> None:
    from django_q.models import OrmQ

    monkeypatch.setattr(Conf, "SYNC", False)
    parent, _ = checked.fan_out(JobKind.INSTALL, nodes=nodes[:2])
    assert sorted(OrmQ.objects.values_list("key", flat=True)) == ["n1", "n2"]
    assert parent.children.count() == 2


def test_a_check_left_running_by_a_dead_process_does_not_block_checks_for_good(settings: Any) -> None:
    import datetime as dt

    from django.utils import timezone

    first, created = UpgradeJob.request_check("test", queue=False)
    assert created and first.start()
    again, created_again = UpgradeJob.request_check("test", queue=False)
    assert not created_again and again.pk == first.pk

    UpgradeJob.objects.filter(pk=first.pk).update(started_at=timezone.now() - dt.timedelta(days=1))
    fresh, created_fresh = UpgradeJob.request_check("test", queue=False)

    first.refresh_from_db()
    assert created_fresh and fresh.pk != first.pk
    assert first.status == JobStatus.INTERRUPTED


def test_auto_upgrade_fans_out_one_parent_job_to_the_flagged_nodes(
    checked: Backend, published: Any, nodes: list[Node]
) -> None:
    from backends_app import detection, schedule
    from backends_app.models import PortalSettings

    n1, n2, n3 = nodes
    checked.fan_out(JobKind.INSTALL, nodes=[n1, n2])
    published.push("v2")
    portal_settings = PortalSettings.load()
    portal_settings.auto_upgrade_backends = True
    portal_settings.save()

    result = schedule.auto_upgrade(detection.find_upgrades(), portal_settings)

    assert len(result.queued) == 1, result.summary()
    parent = UpgradeJob.objects.get(kind=JobKind.UPGRADE, parent=None)
    assert parent.requested_by.startswith("scheduler") and parent.status == JobStatus.SUCCEEDED
    assert sorted(parent.children.values_list("node__name", flat=True)) == ["n1", "n2"]
    assert (version_on(n1), version_on(n2), version_on(n3)) == ("v2", "v2", None)
