"""Fifty clients asking at once for the same upgrade: the database lets exactly one job through."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connection

from backends_app.models import JobKind, UpgradeJob
from tests.helpers.api import OPERATE, client_for, install, make_backend, make_gallery, make_user

CLIENTS = 50


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_fifty_concurrent_upgrade_requests_queue_one_job_and_409_the_rest_with_it() -> None:
    install(make_backend(make_gallery("main"), "llama-cpp"))
    clients = [client_for(make_user(f"ops{i}", perms=(OPERATE,))) for i in range(CLIENTS)]
    start = threading.Barrier(CLIENTS)
    answers: list[tuple[int, dict[str, Any]]] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def ask(client: Any) -> None:
        try:
            start.wait(timeout=30)
            response = client.post("/api/v1/backends/llama-cpp/upgrade/", {}, format="json")
            with lock:
                answers.append((response.status_code, response.json()))
        except BaseException as exc:  # reported below: a thread's exception would otherwise vanish
            with lock:
                failures.append(exc)
        finally:
            connection.close()  # each thread opened its own connection

    threads = [threading.Thread(target=ask, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert not failures, failures
    assert len(answers) == CLIENTS
    accepted = [body for code, body in answers if code == 202]
    conflicts = [body for code, body in answers if code == 409]
    assert len(accepted) == 1, sorted(code for code, _ in answers)
    assert len(conflicts) == CLIENTS - 1
    job_id = accepted[0]["id"]
    assert all(body["code"] == "active_job" and body["job"]["id"] == job_id for body in conflicts)
    assert list(UpgradeJob.objects.values_list("id", "kind")) == [(job_id, JobKind.UPGRADE)]
