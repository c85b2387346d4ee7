"""Sigstore signatures: LocalAI's gallery `verification` policy, against a real registry and a trust
chain of the tests' own (tests/helpers/sigstore.py), through the real procedure and check."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from backends_app import detection
from backends_app.models import Backend, Gallery, InstalledVersion, JobKind, JobStatus, Node, SignatureMode
from backends_app.oci import NotFound, signatures
from tests.conftest import live_version, run_op
from tests.helpers import sigstore as signing
from tests.helpers.sigstore import (
    BUILD_IDENTITY,
    BUILD_IDENTITY_REGEX,
    GITHUB_ISSUER,
    LocalSigstore,
    attach_bundle,
    manifest_descriptor,
    sign_image,
)
from tests.registry import Fault

FORK_IDENTITY = "https://github.com/evil/backends/.github/workflows/build.yaml@refs/heads/master"
POLICY = {"issuer": GITHUB_ISSUER, "identity_regex": BUILD_IDENTITY_REGEX}


@pytest.fixture(scope="session")
def sigstore() -> LocalSigstore:
    return LocalSigstore()


@pytest.fixture(scope="session")
def trust_root_file(tmp_path_factory: pytest.TempPathFactory, sigstore: LocalSigstore) -> Path:
    path = tmp_path_factory.mktemp("sigstore") / "trusted_root.json"
    path.write_text(json.dumps(sigstore.trusted_root()))
    return path


@pytest.fixture
def trusted(settings: Any, trust_root_file: Path) -> Path:
    """The portal verifies against the tests' own Sigstore instance, never the network."""
    settings.PORTAL_SIGSTORE_TRUSTED_ROOT = str(trust_root_file)
    settings.PORTAL_REQUIRE_SIGNATURES = False
    return trust_root_file


def repo_and_tag(ref: str) -> tuple[str, str]:
    repo, _, tag = ref.partition("/")[2].rpartition(":")
    return repo, tag


def set_policy(gallery: Gallery, mode: str = SignatureMode.ENFORCE, **block: Any) -> None:
    gallery.set_verification(signatures.Verification.from_json({**POLICY, **block}), mode)
    gallery.full_clean()
    gallery.save()


def metadata(settings: Any, name: str = "cpu-demo") -> dict[str, Any]:
    return json.loads((Path(settings.PORTAL_BACKENDS_PATH) / name / "metadata.json").read_text())


def current_row(name: str = "cpu-demo") -> InstalledVersion:
    return InstalledVersion.objects.get(name=name, state=InstalledVersion.State.CURRENT)


# --- through the procedure: Backend.request + jobs.run --------------------------------------------


@pytest.mark.django_db
def test_a_signed_image_installs_and_the_signer_is_recorded_with_it(
    published: Any, registry: Any, sigstore: LocalSigstore, trusted: Path, settings: Any
) -> None:
    set_policy(published.gallery)
    subject = sign_image(sigstore, registry.url, published.ref)

    job = run_op(published.backend, JobKind.INSTALL)

    assert job.status == JobStatus.SUCCEEDED, job.error
    assert f"signed by {BUILD_IDENTITY} ({GITHUB_ISSUER})" in job.message
    record = metadata(settings)["portal_signature"]
    assert record["status"] == "verified" and record["digest"] == subject.digest
    assert record["identity"] == BUILD_IDENTITY and record["issuer"] == GITHUB_ISSUER
    row = current_row()
    assert row.signature == InstalledVersion.Signature.VERIFIED
    assert (row.signer_identity, row.signer_issuer) == (BUILD_IDENTITY, GITHUB_ISSUER)
    assert row.signed_at is not None and abs(row.signed_at - dt.datetime.now(dt.UTC)) < dt.timedelta(hours=1)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("tampered", "digest_mismatch"),
        ("unsigned", "no_signature"),
        ("wrong_identity", "wrong_identity"),
        ("wrong_issuer", "wrong_issuer"),
        ("before_not_before", "signed_before_not_before"),
        ("other_sigstore", "untrusted_certificate"),
    ],
)
def test_an_upgrade_whose_signature_fails_is_refused_and_the_running_version_stays(
    case: str,
    reason: str,
    published: Any,
    registry: Any,
    sigstore: LocalSigstore,
    trusted: Path,
    settings: Any,
) -> None:
    now = dt.datetime.now(dt.UTC)
    set_policy(published.gallery, not_before=signing.rfc3339(now - dt.timedelta(days=1)))
    first = sign_image(sigstore, registry.url, published.ref)
    assert run_op(published.backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED
    published.push("v2")
    if case == "tampered":  # v1's valid bundle copied onto the v2 image
        sign_image(sigstore, registry.url, published.ref, signed_digest=first.digest)
    elif case == "wrong_identity":
        sign_image(sigstore, registry.url, published.ref, identity=FORK_IDENTITY)
    elif case == "wrong_issuer":
        sign_image(sigstore, registry.url, published.ref, issuer="https://accounts.example.com")
    elif case == "before_not_before":
        sign_image(sigstore, registry.url, published.ref, when=now - dt.timedelta(days=2))
    elif case == "other_sigstore":
        sign_image(LocalSigstore("attacker"), registry.url, published.ref)

    job = run_op(published.backend, JobKind.UPGRADE)

    assert job.status == JobStatus.FAILED
    assert f"refused by the signature policy of gallery test: {reason}: " in job.error
    assert live_version(settings, "cpu-demo") == "v1"
    assert metadata(settings)["portal_signature"]["digest"] == first.digest
    row = current_row()
    assert row.signature == InstalledVersion.Signature.VERIFIED and row.digest == published.first_digest
    assert not InstalledVersion.objects.filter(name="cpu-demo", state=InstalledVersion.State.KEPT).exists()
    # Refused before the download: nothing of v2 was fetched or left on disk.
    assert job.bytes_done == 0
    assert not any((Path(settings.PORTAL_STATE_PATH) / "staging").rglob("run.sh"))


@pytest.mark.django_db
def test_an_unsigned_install_under_enforce_leaves_nothing_on_disk(
    published: Any, trusted: Path, settings: Any
) -> None:
    set_policy(published.gallery)

    job = run_op(published.backend, JobKind.INSTALL)

    assert job.status == JobStatus.FAILED and "no_signature: no Sigstore bundle attached" in job.error
    assert not (Path(settings.PORTAL_BACKENDS_PATH) / "cpu-demo").exists()
    assert not InstalledVersion.objects.filter(name="cpu-demo").exists()


@pytest.mark.django_db
def test_warn_installs_an_unsigned_image_and_says_so(published: Any, trusted: Path, settings: Any) -> None:
    set_policy(published.gallery, mode=SignatureMode.WARN)

    job = run_op(published.backend, JobKind.INSTALL)

    assert job.status == JobStatus.SUCCEEDED, job.error
    assert "signature not verified (warn): no_signature: no Sigstore bundle attached" in job.message
    assert live_version(settings, "cpu-demo") == "v1"
    assert metadata(settings)["portal_signature"]["status"] == "unverified"
    row = current_row()
    assert row.signature == InstalledVersion.Signature.UNVERIFIED
    assert row.signature_note.startswith("no_signature: ") and row.signer_identity == ""


@pytest.mark.django_db
def test_off_ignores_signatures_and_writes_localais_keys_only(published: Any, settings: Any) -> None:
    settings.PORTAL_SIGSTORE_TRUSTED_ROOT = "/nonexistent/trusted_root.json"  # never read when off
    settings.PORTAL_REQUIRE_SIGNATURES = False

    job = run_op(published.backend, JobKind.INSTALL)

    assert job.status == JobStatus.SUCCEEDED, job.error
    assert "signature" not in job.message
    assert "portal_signature" not in metadata(settings)
    assert current_row().signature == InstalledVersion.Signature.NOT_CHECKED


@pytest.mark.parametrize(
    ("variables", "strict"),
    [
        ({}, False),
        ({"LOCALAI_REQUIRE_BACKEND_INTEGRITY": "1"}, True),
        ({"REQUIRE_BACKEND_INTEGRITY": "true"}, True),
        ({"PORTAL_REQUIRE_SIGNATURES": "1"}, True),
        ({"LOCALAI_REQUIRE_BACKEND_INTEGRITY": "1", "PORTAL_REQUIRE_SIGNATURES": "0"}, False),
    ],
)
def test_localais_variables_and_the_portals_turn_strict_integrity_on(
    variables: dict[str, str], strict: bool, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    names = ("LOCALAI_REQUIRE_BACKEND_INTEGRITY", "REQUIRE_BACKEND_INTEGRITY", "PORTAL_REQUIRE_SIGNATURES")
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(variables, PORTAL_DATA_DIR=str(tmp_path), DATABASE_URL="")
    done = subprocess.run(
        [sys.executable, "-c", "import portal.settings as s; print(s.PORTAL_REQUIRE_SIGNATURES)"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(strict)


@pytest.mark.django_db
def test_strict_integrity_refuses_installs_from_a_gallery_without_a_policy(
    published: Any, trusted: Path, settings: Any
) -> None:
    settings.PORTAL_REQUIRE_SIGNATURES = True

    job = run_op(published.backend, JobKind.INSTALL)

    assert job.status == JobStatus.FAILED
    assert "no_policy: strict integrity: gallery 'test' has no verification policy" in job.error
    assert not (Path(settings.PORTAL_BACKENDS_PATH) / "cpu-demo").exists()


@pytest.mark.django_db
def test_strict_integrity_turns_warn_into_enforce(published: Any, trusted: Path, settings: Any) -> None:
    set_policy(published.gallery, mode=SignatureMode.WARN)
    settings.PORTAL_REQUIRE_SIGNATURES = True

    job = run_op(published.backend, JobKind.INSTALL)

    assert job.status == JobStatus.FAILED and "no_signature" in job.error


@pytest.mark.django_db
def test_a_rollback_brings_back_the_signature_record_of_the_version_it_restores(
    published: Any, registry: Any, sigstore: LocalSigstore, trusted: Path
) -> None:
    set_policy(published.gallery, mode=SignatureMode.WARN)
    sign_image(sigstore, registry.url, published.ref)
    assert run_op(published.backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED
    published.push("v2")  # unsigned: installed under warn
    assert run_op(published.backend, JobKind.UPGRADE).status == JobStatus.SUCCEEDED
    assert current_row().signature == InstalledVersion.Signature.UNVERIFIED
    kept = InstalledVersion.objects.get(name="cpu-demo", state=InstalledVersion.State.KEPT)
    assert kept.signature == InstalledVersion.Signature.VERIFIED

    assert run_op(published.backend, JobKind.ROLLBACK).status == JobStatus.SUCCEEDED

    row = current_row()
    assert row.signature == InstalledVersion.Signature.VERIFIED and row.signer_identity == BUILD_IDENTITY


@pytest.mark.django_db(transaction=True)
def test_each_node_verifies_what_it_installs_in_a_fan_out_and_a_converge(
    published: Any, registry: Any, sigstore: LocalSigstore, trusted: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    from django_q.conf import Conf

    monkeypatch.setattr(Conf, "SYNC", True)  # each child job runs as soon as it is queued
    nodes = [
        Node.objects.create(
            name=name,
            backends_path=str(tmp_path / name / "backends"),
            state_path=str(tmp_path / name / ".backends-portal"),
            queue=name,
        )
        for name in ("n1", "n2")
    ]
    set_policy(published.gallery)
    sign_image(sigstore, registry.url, published.ref)
    install, _ = published.backend.fan_out(JobKind.INSTALL, nodes=nodes, requested_by="test")
    install.refresh_from_db()
    assert install.status == JobStatus.SUCCEEDED, install.message
    v2 = published.push("v2")  # unsigned

    upgrade, _ = published.backend.fan_out(JobKind.UPGRADE, requested_by="test")

    upgrade.refresh_from_db()
    children = list(upgrade.children.order_by("node__name"))
    assert [c.status for c in children] == [JobStatus.FAILED, JobStatus.FAILED]
    assert all("no_signature" in c.error for c in children)
    for node in nodes:
        assert (Path(node.backends_path) / "cpu-demo/lib/version.txt").read_text() == "v1"
    # Once v2 is signed, converging brings every node to it, each verifying on its own.
    sign_image(sigstore, registry.url, published.ref)
    Backend.objects.filter(pk=published.backend.pk).update(latest_digest=v2)
    backend = Backend.objects.get(pk=published.backend.pk)

    converge, _ = backend.converge(requested_by="test")

    converge.refresh_from_db()
    assert converge.status == JobStatus.SUCCEEDED, converge.message
    rows = InstalledVersion.objects.filter(name="cpu-demo", state=InstalledVersion.State.CURRENT)
    assert sorted(r.node.name for r in rows if r.signer_identity == BUILD_IDENTITY) == ["n1", "n2"]


# --- the check ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_check_reports_an_unsigned_build_under_enforce_as_refused_not_upgradable(
    published: Any, registry: Any, sigstore: LocalSigstore, trusted: Path
) -> None:
    set_policy(published.gallery)
    sign_image(sigstore, registry.url, published.ref)
    assert run_op(published.backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED
    published.push("v2")

    report = detection.find_upgrades(sync_galleries=False)

    [result] = report.results
    assert result.refused and not result.upgrade_available
    assert result.reason.startswith("refused: ") and "no_signature" in result.reason
    assert "1 refused (signature)" in report.summary()
    backend = Backend.objects.with_installations().get(pk=published.backend.pk)
    assert not backend.upgrade_available
    assert backend.status.state == "refused" and "no_signature" in backend.status.detail
    assert not Backend.objects.upgradable().exists()  # nothing for an automatic upgrade to take

    sign_image(sigstore, registry.url, published.ref)
    report = detection.find_upgrades(sync_galleries=False)

    assert report.results[0].upgrade_available and not report.results[0].refused
    backend = Backend.objects.with_installations().get(pk=published.backend.pk)
    assert backend.status.state == "upgrade_available"


@pytest.mark.django_db
def test_the_check_asks_nothing_more_of_the_registry_when_nothing_moved(
    published: Any, registry: Any, sigstore: LocalSigstore, trusted: Path
) -> None:
    set_policy(published.gallery)
    sign_image(sigstore, registry.url, published.ref)
    assert run_op(published.backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED

    with registry.client() as client:
        report = detection.find_upgrades(sync_galleries=False, client=client)
        counts = client.request_counts

    assert counts == {"HEAD": 1} and not report.results[0].refused


@pytest.mark.django_db
def test_the_check_under_strict_integrity_refuses_without_a_registry_request_for_signatures(
    published: Any, registry: Any, trusted: Path, settings: Any
) -> None:
    assert run_op(published.backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED
    published.push("v2")
    settings.PORTAL_REQUIRE_SIGNATURES = True

    with registry.client() as client:
        report = detection.find_upgrades(sync_galleries=False, client=client)
        counts = client.request_counts

    assert report.results[0].refused and "no_policy" in report.results[0].reason
    assert counts == {"HEAD": 1, "GET": 2}  # the tag, both platform manifests; none for signatures


# --- the engine (oci/signatures.py) against the real registry -------------------------------------


@pytest.fixture
def root(trust_root_file: Path) -> Any:
    return signatures.load_trusted_root(trust_root_file)


@pytest.fixture
def policy() -> signatures.Verification:
    return signatures.Verification.from_json(POLICY)


def pushed(registry: Any, text: str) -> tuple[str, str]:
    ref = registry.push_image({"run.sh": (f"#!/bin/sh\necho {text}\n", 0o755)})
    repo, tag = repo_and_tag(ref)
    return ref, manifest_descriptor(registry.url, repo, tag).digest


def test_a_message_signature_over_the_digest_verifies(
    registry: Any, sigstore: LocalSigstore, root: Any, policy: signatures.Verification
) -> None:
    ref, digest = pushed(registry, "message")
    sign_image(sigstore, registry.url, ref, mode="message")

    with registry.client() as client:
        verified = signatures.verify_image(client, ref, digest, policy, root)

    assert verified.content == "message-signature" and verified.digest == digest
    assert verified.found_through.startswith("referrers tag sha256-")


def test_any_good_bundle_is_enough_even_after_a_junk_one(
    registry: Any, sigstore: LocalSigstore, root: Any, policy: signatures.Verification
) -> None:
    """LocalAI verifies only the first bundle that parses; a junk referrer listed first would block it."""
    ref, digest = pushed(registry, "junk-first")
    repo, tag = repo_and_tag(ref)
    subject = manifest_descriptor(registry.url, repo, tag)
    attach_bundle(registry.url, repo, subject, json.dumps({"mediaType": signing.BUNDLE_V03}))
    attach_bundle(registry.url, repo, subject, sigstore.sign_digest(digest, identity=FORK_IDENTITY))
    with registry.client() as client, pytest.raises(signatures.SignatureRejected) as refused:
        signatures.verify_image(client, ref, digest, policy, root)
    assert refused.value.reason == "wrong_identity"  # the most telling of the two
    assert "(and 1 other bundle(s) refused)" in refused.value.detail

    attach_bundle(registry.url, repo, subject, sigstore.sign_digest(digest))
    with registry.client() as client:
        assert signatures.verify_image(client, ref, digest, policy, root).identity == BUILD_IDENTITY


def test_a_referrer_whose_subject_is_another_image_is_passed_over(
    registry: Any, sigstore: LocalSigstore, root: Any, policy: signatures.Verification
) -> None:
    """Anyone who can push can edit the tag index: only the artifact's own subject counts."""
    ref, digest = pushed(registry, "target")
    other_ref, _ = pushed(registry, "other")
    repo, _ = repo_and_tag(ref)
    other_repo, other_tag = repo_and_tag(other_ref)
    # A bundle that is valid for `digest`, attached (by its subject) to the other image...
    referrer = attach_bundle(
        registry.url,
        repo,
        manifest_descriptor(registry.url, other_repo, other_tag),
        sigstore.sign_digest(digest),
        in_tag_index=False,
    )
    # ...then listed in `digest`'s tag index by hand.
    signing.add_to_tag_index(
        registry.url,
        repo,
        digest,
        {
            "mediaType": signing.OCI_MANIFEST,
            "digest": referrer,
            "size": 1,
            "artifactType": signing.BUNDLE_V03,
        },
    )

    with registry.client() as client, pytest.raises(signatures.SignatureRejected) as refused:
        signatures.verify_image(client, ref, digest, policy, root)

    assert refused.value.reason == "no_signature"
    assert "its subject is another manifest" in refused.value.detail


def test_the_referrers_api_is_used_where_the_registry_has_one(
    registry: Any,
    sigstore: LocalSigstore,
    root: Any,
    policy: signatures.Verification,
    fault_proxy_factory: Any,
) -> None:
    """docker-registry 2.8 has no referrers API; a proxy answers it, and no tag index exists at all."""
    ref, digest = pushed(registry, "api")
    repo, tag = repo_and_tag(ref)
    referrer = attach_bundle(
        registry.url,
        repo,
        manifest_descriptor(registry.url, repo, tag),
        sigstore.sign_digest(digest),
        in_tag_index=False,
    )
    proxy = fault_proxy_factory(registry.host)
    index = {
        "schemaVersion": 2,
        "mediaType": signing.OCI_INDEX,
        "manifests": [
            {
                "mediaType": signing.OCI_MANIFEST,
                "digest": referrer,
                "size": 1,
                "artifactType": signing.BUNDLE_V03,
            }
        ],
    }
    proxy.add(
        Fault(
            match=lambda method, path: path == f"/v2/{repo}/referrers/{digest}",
            status=200,
            headers={"Content-Type": signing.OCI_INDEX},
            body=json.dumps(index).encode(),
        )
    )
    with registry.client() as client, pytest.raises(NotFound):
        client.fetch_manifest(ref, signing.referrers_tag(digest))  # no tag index to fall back on
    through_proxy = f"{proxy.host}/{repo}:{tag}"

    with registry.client() as client:
        verified = signatures.verify_image(client, through_proxy, digest, policy, root)

    assert verified.found_through == "referrers API" and verified.bundle_digest == referrer
    assert not any("sha256-" in path for _, _, path, _ in proxy.log)  # the tag schema was not needed


def flip(text: str) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[len(raw) // 2] ^= 1
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize(
    ("mutation", "reason"),
    [
        ("no_checkpoint", "invalid_bundle"),
        ("no_inclusion_proof", "invalid_bundle"),
        ("forged_entry_timestamp", "invalid_signature"),
        ("integrated_time_moved", "invalid_signature"),
        ("proof_hash_altered", "invalid_signature"),
        ("dsse_signature_altered", "invalid_signature"),
    ],
)
def test_a_bundle_with_altered_or_missing_log_material_is_refused(
    mutation: str,
    reason: str,
    registry: Any,
    sigstore: LocalSigstore,
    root: Any,
    policy: signatures.Verification,
) -> None:
    ref, digest = pushed(registry, mutation)
    repo, tag = repo_and_tag(ref)
    bundle = json.loads(sigstore.sign_digest(digest))
    entry = bundle["verificationMaterial"]["tlogEntries"][0]
    if mutation == "no_checkpoint":
        del entry["inclusionProof"]["checkpoint"]
    elif mutation == "no_inclusion_proof":
        del entry["inclusionProof"]
    elif mutation == "forged_entry_timestamp":
        promise = entry["inclusionPromise"]
        promise["signedEntryTimestamp"] = flip(promise["signedEntryTimestamp"])
    elif mutation == "integrated_time_moved":  # to dodge not_before, within the certificate's life
        entry["integratedTime"] = str(int(entry["integratedTime"]) + 60)  # the SET catches it
    elif mutation == "proof_hash_altered":
        entry["inclusionProof"]["hashes"][0] = flip(entry["inclusionProof"]["hashes"][0])
    elif mutation == "dsse_signature_altered":
        signature = bundle["dsseEnvelope"]["signatures"][0]
        signature["sig"] = flip(signature["sig"])
    attach_bundle(registry.url, repo, manifest_descriptor(registry.url, repo, tag), json.dumps(bundle))

    with registry.client() as client, pytest.raises(signatures.SignatureRejected) as refused:
        signatures.verify_image(client, ref, digest, policy, root)

    assert refused.value.reason == reason, refused.value.detail


def test_the_trust_root_may_be_a_client_trust_config_and_a_bad_file_is_a_clear_refusal(
    tmp_path: Path, registry: Any, sigstore: LocalSigstore, policy: signatures.Verification
) -> None:
    config = tmp_path / "client_trust_config.json"
    config.write_text(json.dumps(sigstore.client_trust_config()))
    ref, digest = pushed(registry, "config")
    sign_image(sigstore, registry.url, ref)
    with registry.client() as client:
        assert signatures.verify_image(client, ref, digest, policy, signatures.load_trusted_root(config))

    broken = tmp_path / "broken.json"
    broken.write_text('{"mediaType": "application/json"}')
    with pytest.raises(signatures.SignatureRejected, match=r"trust_root: .*neither a trusted root"):
        signatures.load_trusted_root(broken)
    with pytest.raises(signatures.SignatureRejected, match=r"trust_root: .*No such file"):
        signatures.load_trusted_root(tmp_path / "missing.json")


def test_the_default_trust_root_is_sigstores_public_good_one_read_offline(
    tmp_path: Path, monkeypatch: Any
) -> None:
    import socket

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the default trust root must not need the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    signatures._trust_cache.clear()

    root = signatures.load_trusted_root(None)

    assert root.get_fulcio_certs()  # the public-good Fulcio chain
    assert "public-good" in signatures.describe_trust_root(None)


# --- the policy as LocalAI reads it ---------------------------------------------------------------


def test_the_verification_block_is_validated_as_localai_does_and_more() -> None:
    block = signatures.Verification.from_json({**POLICY, "not_before": "2026-05-01T00:00:00Z"})
    assert block.to_json() == {**POLICY, "not_before": "2026-05-01T00:00:00Z"}
    for bad, message in [
        ({"identity": BUILD_IDENTITY}, "set issuer or issuer_regex"),
        ({"issuer": GITHUB_ISSUER}, "set identity or identity_regex"),
        ({**POLICY, "identity_regexp": "x"}, "unknown key"),
        ({**POLICY, "identity_regex": "(unclosed"}, "not a valid regular expression"),
        ({**POLICY, "identity_regex": r"^(a)\1$"}, "not a valid regular expression"),  # Go has none
        ({**POLICY, "identity_regex": "^(?=https)"}, "not a valid regular expression"),
        ({**POLICY, "not_before": "2026-05-01T00:00:00"}, "no time zone"),
        ({**POLICY, "not_before": "May 1st"}, "not an RFC 3339 time"),
        ({**POLICY, "issuer": 3}, "must be a string"),
    ]:
        with pytest.raises(ValueError, match=message):
            signatures.Verification.from_json(bad)


def test_identity_rules_follow_sigstore_go_exact_and_regex_both_checked_regexes_unanchored(
    sigstore: LocalSigstore,
) -> None:
    _, cert = sigstore.issue_leaf(BUILD_IDENTITY, GITHUB_ISSUER, dt.datetime.now(dt.UTC))

    def verdict(**block: str) -> str:
        try:
            signatures.IdentityPolicy(signatures.Verification(**block)).verify(cert)
        except Exception as exc:
            return type(exc).__name__
        return "ok"

    assert verdict(issuer=GITHUB_ISSUER, identity=BUILD_IDENTITY) == "ok"
    assert verdict(issuer=GITHUB_ISSUER, identity_regex=r"github\.com/example/") == "ok"  # unanchored
    assert (
        verdict(issuer=GITHUB_ISSUER, identity=BUILD_IDENTITY, identity_regex="^nope$") == "_IdentityMismatch"
    )
    assert verdict(issuer_regex="^https://accounts\\.", identity=BUILD_IDENTITY) == "_IssuerMismatch"
    assert verdict(issuer=GITHUB_ISSUER, identity_regex=r"\Ahttps://github\.com/example/.*\z") == "ok"  # Go's
    # A pattern that backtracks exponentially in Python's `re` returns at once (RE2 is linear).
    _, long_cert = sigstore.issue_leaf(f"https://{'a' * 80}.example/", GITHUB_ISSUER, dt.datetime.now(dt.UTC))
    slow = signatures.IdentityPolicy(
        signatures.Verification(issuer=GITHUB_ISSUER, identity_regex="^https://(a+)+$")
    )
    with pytest.raises(Exception, match="expected identity to match"):
        slow.verify(long_cert)
    _, email_cert = sigstore.issue_leaf("builder@example.com", GITHUB_ISSUER, dt.datetime.now(dt.UTC))
    assert signatures.certificate_identity(email_cert) == "builder@example.com"
    assert signatures.certificate_issuer(email_cert) == GITHUB_ISSUER


# --- where the policy is set: PORTAL_GALLERIES, the API, the admin; where it shows ----------------


def test_portal_galleries_reads_localais_json_with_its_verification_block() -> None:
    from backends_app.system_checks import configured_galleries, configured_gallery_items

    text = json.dumps(
        [
            {"name": "signed", "url": "file:///a.yaml", "verification": POLICY},
            {"name": "warned", "url": "file:///b.yaml", "verification": POLICY, "signature_mode": "warn"},
            {"name": "plain", "url": "file:///c.yaml", "mirrors": ["file:///d.yaml"]},
        ]
    )

    items = configured_gallery_items(text)

    assert [(i.name, i.signature_mode) for i in items] == [
        ("signed", None),
        ("warned", "warn"),
        ("plain", None),
    ]
    assert items[0].verification == signatures.Verification.from_json(POLICY)
    assert items[2].verification is None
    assert configured_galleries(text)[0] == ("signed", "file:///a.yaml")
    for bad, message in [
        (
            [{"name": "x", "url": "u", "verification": {"issuer": GITHUB_ISSUER}}],
            "gallery 'x': verification: ",
        ),
        ([{"name": "x", "url": "u", "verification": POLICY, "signature_mode": "loud"}], "signature_mode"),
        ([{"name": "x", "url": "u", "signature_mode": "enforce"}], "needs a verification block"),
    ]:
        with pytest.raises(ValueError, match=message):
            configured_gallery_items(json.dumps(bad))


@pytest.mark.django_db
def test_migrate_stores_the_block_on_new_galleries_and_never_replaces_one_set_by_hand(settings: Any) -> None:
    from backends_app.signals import seed_defaults

    Gallery.objects.create(name="existing", url="file:///e.yaml")
    hand_set = Gallery.objects.create(name="curated", url="file:///c.yaml")
    set_policy(hand_set, mode=SignatureMode.WARN, identity=BUILD_IDENTITY, identity_regex="")
    settings.PORTAL_GALLERIES = json.dumps(
        [
            {"name": name, "url": f"file:///{name}.yaml", "verification": POLICY}
            for name in ("fresh", "existing", "curated")
        ]
    )

    seed_defaults()

    fresh, existing, curated = (Gallery.objects.get(name=n) for n in ("fresh", "existing", "curated"))
    assert fresh.signature_mode == existing.signature_mode == SignatureMode.ENFORCE
    assert fresh.verification == existing.verification == signatures.Verification.from_json(POLICY)
    assert curated.signature_mode == SignatureMode.WARN and curated.verification_identity == BUILD_IDENTITY


def test_system_checks_report_a_bad_trust_root_file_and_unanchored_regexes(
    settings: Any, tmp_path: Path, trust_root_file: Path
) -> None:
    from backends_app.system_checks import portal_settings_check

    def ids() -> set[str]:
        return {problem.id for problem in portal_settings_check() if problem.id}

    settings.PORTAL_GALLERIES = json.dumps(
        [{"name": "loose", "url": "file:///a.yaml", "verification": {**POLICY, "identity_regex": "example"}}]
    )
    settings.PORTAL_SIGSTORE_TRUSTED_ROOT = str(tmp_path / "missing.json")
    assert {"portal.W010", "portal.E010"} <= ids()

    settings.PORTAL_GALLERIES = json.dumps(
        [{"name": "tight", "url": "file:///a.yaml", "verification": POLICY}]
    )
    settings.PORTAL_SIGSTORE_TRUSTED_ROOT = str(trust_root_file)
    assert not {"portal.W010", "portal.E010", "portal.E002"} & ids()

    settings.PORTAL_GALLERIES = json.dumps([{"name": "x", "url": "u", "verification": {"issuer": "i"}}])
    assert "portal.E002" in ids()


@pytest.mark.django_db
def test_the_api_sets_and_clears_a_gallerys_verification_block() -> None:
    from tests.helpers.api import client_for, make_gallery, make_user

    make_gallery("main")
    curator = client_for(make_user("curator", perms=("backends_app.change_gallery",)))
    reader = client_for(make_user("reader"))

    refused = reader.patch("/api/v1/galleries/main/", {"verification": POLICY}, format="json")
    set_block = curator.patch("/api/v1/galleries/main/", {"verification": POLICY}, format="json")

    assert refused.status_code == 403
    assert set_block.status_code == 200, set_block.json()
    assert set_block.json()["signature_mode"] == "enforce"  # a block alone enforces, as in LocalAI
    assert curator.get("/api/v1/galleries/main/").json()["verification"] == POLICY
    assert Gallery.objects.get(name="main").signature_policy().enforced

    incomplete = curator.patch(
        "/api/v1/galleries/main/", {"verification": {"issuer": GITHUB_ISSUER}}, format="json"
    )
    unknown = curator.patch(
        "/api/v1/galleries/main/", {"verification": {**POLICY, "subject": "x"}}, format="json"
    )
    warn = curator.patch("/api/v1/galleries/main/", {"signature_mode": "warn"}, format="json")
    cleared = curator.patch("/api/v1/galleries/main/", {"verification": None}, format="json")
    warn_without_block = curator.patch("/api/v1/galleries/main/", {"signature_mode": "warn"}, format="json")

    assert incomplete.status_code == 400 and "identity" in json.dumps(incomplete.json())
    assert unknown.status_code == 400 and "unknown key" in json.dumps(unknown.json())
    assert warn.status_code == 200 and warn.json()["verification"] == POLICY
    assert cleared.status_code == 200
    assert (cleared.json()["signature_mode"], cleared.json()["verification"]) == ("off", None)
    assert warn_without_block.status_code == 400
    assert "needs a verification block" in json.dumps(warn_without_block.json())


@pytest.mark.django_db
def test_the_api_shows_who_signed_each_installed_version() -> None:
    from tests.helpers.api import client_for, install, make_backend, make_gallery, make_user

    row = install(make_backend(make_gallery("main"), "cpu-demo"))
    InstalledVersion.objects.filter(pk=row.pk).update(
        signature="verified", signer_identity=BUILD_IDENTITY, signer_issuer=GITHUB_ISSUER
    )

    body = client_for(make_user("reader")).get("/api/v1/backends/main@cpu-demo/").json()

    [installed] = body["installed"]
    assert installed["signature"] == "verified"
    assert (installed["signer_identity"], installed["signer_issuer"]) == (BUILD_IDENTITY, GITHUB_ISSUER)


@pytest.mark.django_db
def test_the_admin_edits_the_block_refuses_an_incomplete_one_and_shows_signers(admin_client: Any) -> None:
    from tests.helpers.api import install, make_backend

    gallery = Gallery.objects.create(name="main", url="file:///srv/index.yaml")
    change = f"/admin/backends_app/gallery/{gallery.pk}/change/"
    form = {"name": "main", "url": gallery.url, "enabled": "on", "signature_mode": "enforce"}

    incomplete = admin_client.post(change, {**form, "verification_issuer": GITHUB_ISSUER})
    saved = admin_client.post(
        change,
        {
            **form,
            "verification_issuer": GITHUB_ISSUER,
            "verification_identity_regex": BUILD_IDENTITY_REGEX,
            "verification_not_before_0": "2026-05-01",
            "verification_not_before_1": "00:00:00",
        },
    )

    assert incomplete.status_code == 200 and "set identity or identity_regex" in incomplete.content.decode()
    assert saved.status_code == 302
    gallery.refresh_from_db()
    assert gallery.signature_policy().enforced
    assert gallery.verification is not None and gallery.verification.not_before is not None
    listing = admin_client.get("/admin/backends_app/gallery/").content.decode()
    assert "enforce: identity ~/" in listing and GITHUB_ISSUER in listing

    row = install(make_backend(gallery, "cpu-demo"))
    InstalledVersion.objects.filter(pk=row.pk).update(
        signature="verified", signer_identity=BUILD_IDENTITY, signer_issuer=GITHUB_ISSUER
    )
    installed = admin_client.get("/admin/backends_app/installedversion/").content.decode()
    assert "verified" in installed and BUILD_IDENTITY in installed
    only_verified = admin_client.get("/admin/backends_app/installedversion/?signature=verified")
    assert BUILD_IDENTITY in only_verified.content.decode()


@pytest.mark.django_db
def test_the_settings_page_says_what_each_gallery_requires_and_where_the_trust_root_is(
    admin_client: Any, trusted: Path, settings: Any
) -> None:
    set_policy(Gallery.objects.create(name="signed", url="file:///s.yaml"))
    Gallery.objects.create(name="plain", url="file:///p.yaml")

    page = admin_client.get("/settings/").content.decode()

    assert f"file {trusted}" in page
    assert "enforce: identity ~/" in page and "signatures not checked" in page
    settings.PORTAL_REQUIRE_SIGNATURES = True
    strict = admin_client.get("/settings/").content.decode()
    assert (
        "on: every gallery is enforced" in strict
        and "enforce (strict integrity): no verification policy" in strict
    )


@pytest.mark.django_db
def test_the_backends_page_row_says_who_signed_the_installed_version(
    admin_client: Any, published: Any, registry: Any, sigstore: LocalSigstore, trusted: Path
) -> None:
    set_policy(published.gallery)
    sign_image(sigstore, registry.url, published.ref)
    assert run_op(published.backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED

    page = admin_client.get("/").content.decode()

    assert f"signed by {BUILD_IDENTITY} ({GITHUB_ISSUER})" in page
