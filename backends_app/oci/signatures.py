"""Sigstore signatures of backend images: LocalAI's gallery ``verification`` policy, with sigstore-python.

What LocalAI does (``pkg/oci/cosignverify``), and so what this module does:

* The signature is a Sigstore bundle (``cosign sign --new-bundle-format``) stored as an OCI 1.1
  *referrer* of the image's platform manifest: an artifact manifest whose ``subject`` is that
  manifest and whose ``artifactType`` is ``application/vnd.dev.sigstore.bundle.*+json``, the bundle
  being its first layer. It is found through the referrers API, or under the referrers tag schema
  (``sha256-<hex>``) on registries without that API (Debian's docker-registry 2.8 among them).
* The bundle must verify against the trust root (Fulcio-like CA chain, an SCT embedded in the
  certificate, one transparency-log entry with its inclusion proof and signed checkpoint, a
  verified time) for exactly the manifest digest being installed: a DSSE in-toto statement whose
  subject is that digest (cosign v3's shape), or a message signature over it.
* The certificate's identity must satisfy the gallery's policy: ``issuer`` and/or ``issuer_regex``,
  ``identity`` and/or ``identity_regex`` (both checked when both are given; regexes are unanchored
  searches in Go's syntax, run by RE2 as Go's ``regexp.MatchString`` would), and the earliest
  verified time must not be before ``not_before``.

Where this goes beyond LocalAI: every attached bundle is tried and any one that verifies is enough
(LocalAI verifies only the first that parses, so a junk referrer listed first blocks it); each
referrer's ``subject`` is checked (a tag-schema index can be rewritten by anyone who can push); the
trust root can come from a file, for air-gapped sites; a policy may only warn.

Verification itself is sigstore-python's. The helpers here only do what it leaves to its caller:
the regex identity policy, the ``not_before`` rule and the in-toto subject check. No Django here:
the policy comes in as plain data and the registry through :class:`RegistryClient`.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import re2
from cryptography import x509

from .client import RegistryClient
from .errors import AuthError, NotFound, OCIError, RegistryUnavailable
from .manifest import Descriptor
from .reference import Reference, parse_reference, validate_digest

if TYPE_CHECKING:  # sigstore takes a third of a second to import: only where something is verified
    from sigstore.models import Bundle, TrustedRoot
    from sigstore.verify import Verifier

log = logging.getLogger(__name__)

BUNDLE_ARTIFACT_PREFIX = "application/vnd.dev.sigstore.bundle."
TRUSTED_ROOT_TYPE = "application/vnd.dev.sigstore.trustedroot+json;version=0.1"
CLIENT_TRUST_CONFIG_TYPE = "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json"
INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
INTOTO_STATEMENT_TYPES = frozenset({"https://in-toto.io/Statement/v1", "https://in-toto.io/Statement/v0.1"})

# A bundle is a few kilobytes; anything near this is not one.
MAX_BUNDLE_BYTES = 1024 * 1024
# Bundles tried per image: a registry listing thousands of referrers cannot make a check endless.
MAX_BUNDLES = 16
# Details kept per refusal: some sigstore messages embed a whole inclusion proof.
MAX_DETAIL = 300

# Fulcio's certificate extensions (sigstore-go reads the same ones).
OID_ISSUER_V1 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1")  # raw bytes, deprecated
OID_ISSUER_V2 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8")  # DER UTF8String
OID_OTHERNAME_SAN = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.7")

OFF, WARN, ENFORCE = "off", "warn", "enforce"
MODES = (OFF, WARN, ENFORCE)

#: Why a signature was refused: the stable codes job errors, check results and metadata carry.
REASONS: dict[str, str] = {
    "no_policy": "strict integrity is on and the gallery has no verification policy",
    "invalid_policy": "the gallery's verification policy is incomplete or malformed",
    "trust_root": "the Sigstore trust root could not be loaded",
    "lookup_failed": "the registry could not be asked for signatures",
    "no_signature": "no Sigstore bundle is attached to the image",
    "signed_before_not_before": "signed before the gallery's not_before",
    "wrong_identity": "signed by another identity than the gallery names",
    "wrong_issuer": "signed through another OIDC issuer than the gallery names",
    "digest_mismatch": "the signature is for another image",
    "untrusted_certificate": "the signing certificate does not chain to the trust root",
    "invalid_signature": "the signature or its transparency-log proof does not verify",
    "invalid_bundle": "the attached bundle is malformed or incomplete",
}
# When every bundle fails, the most telling reason is reported.
_REASON_ORDER = (
    "signed_before_not_before",
    "wrong_identity",
    "wrong_issuer",
    "digest_mismatch",
    "untrusted_certificate",
    "invalid_signature",
    "invalid_bundle",
)


class SignatureRejected(OCIError):
    """An image's signature does not satisfy the policy. ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        detail = " ".join(detail.split())
        detail = detail if len(detail) <= MAX_DETAIL else detail[: MAX_DETAIL - 3] + "..."
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class _IdentityMismatch(Exception):
    """Raised by `IdentityPolicy` inside sigstore's verification, which lets it through unwrapped."""


class _IssuerMismatch(Exception):
    """As `_IdentityMismatch`, for the issuer."""


# --- the policy ---------------------------------------------------------------------------------


def parse_rfc3339(text: str) -> dt.datetime:
    """An RFC 3339 time with its zone (Go's ``time.RFC3339``); ValueError otherwise."""
    try:
        moment = dt.datetime.fromisoformat(text.strip().upper())
    except ValueError:
        raise ValueError(f"{text!r} is not an RFC 3339 time (e.g. 2026-05-01T00:00:00Z)") from None
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone (RFC 3339 needs one, e.g. Z)")
    return moment


def format_rfc3339(moment: dt.datetime) -> str:
    text = moment.astimezone(dt.UTC).replace(microsecond=0).isoformat()
    return text.removesuffix("+00:00") + "Z"


@dataclass(frozen=True)
class Verification:
    """LocalAI's gallery ``verification`` block (core/config/gallery.go), with its field names."""

    KEYS = ("issuer", "issuer_regex", "identity", "identity_regex", "not_before")

    issuer: str = ""
    issuer_regex: str = ""
    identity: str = ""
    identity_regex: str = ""
    not_before: dt.datetime | None = None

    @classmethod
    def from_json(cls, data: Any) -> Verification:
        """Read the block as JSON or YAML gives it; ValueError names what is wrong.

        Unlike Go's decoder, an unknown key is refused: a misspelt ``identity_regexp`` must not
        quietly leave the policy weaker than its author meant.
        """
        if not isinstance(data, Mapping):
            raise ValueError(
                "verification must be an object with issuer/issuer_regex and identity/identity_regex"
            )
        unknown = sorted(str(key) for key in data if key not in cls.KEYS)
        if unknown:
            raise ValueError(
                f"verification: unknown key(s) {', '.join(unknown)}; known: {', '.join(cls.KEYS)}"
            )
        values: dict[str, Any] = {}
        for key in cls.KEYS:
            value = data.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                raise ValueError(f"verification: {key} must be a string")
            values[key] = value.strip()
        not_before = values.pop("not_before", "")
        block = cls(**values, not_before=parse_rfc3339(not_before) if not_before else None)
        block.validate()
        return block

    def to_json(self) -> dict[str, str]:
        """The block as LocalAI writes it: empty values left out."""
        data = {key: getattr(self, key) for key in self.KEYS[:4] if getattr(self, key)}
        if self.not_before is not None:
            data["not_before"] = format_rfc3339(self.not_before)
        return data

    @property
    def is_empty(self) -> bool:
        return not any((self.issuer, self.issuer_regex, self.identity, self.identity_regex, self.not_before))

    def problems(self) -> dict[str, str]:
        """What LocalAI's ``Policy.Validate`` refuses, plus regexes that do not compile; by field."""
        found: dict[str, str] = {}
        if not (self.issuer or self.issuer_regex):
            found["issuer"] = "set issuer or issuer_regex"
        if not (self.identity or self.identity_regex):
            found["identity"] = "set identity or identity_regex"
        for key in ("issuer_regex", "identity_regex"):
            pattern = getattr(self, key)
            if pattern:
                try:
                    compile_regex(pattern)
                except ValueError as exc:
                    found[key] = str(exc)
        return found

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("verification: " + "; ".join(f"{k}: {v}" for k, v in problems.items()))

    def describe(self) -> str:
        issuer = self.issuer or f"~/{self.issuer_regex}/"
        identity = self.identity or f"~/{self.identity_regex}/"
        text = f"identity {identity} from {issuer}"
        if self.not_before is not None:
            text += f", signed since {format_rfc3339(self.not_before)}"
        return text


@dataclass(frozen=True)
class SignaturePolicy:
    """What an install from one gallery requires, strict mode already applied.

    ``mode``: ``off`` (not checked), ``warn`` (checked; a failure is recorded and the install goes
    on) or ``enforce`` (a failure refuses the install). ``strict`` is LocalAI's
    ``LOCALAI_REQUIRE_BACKEND_INTEGRITY``: every install is enforced, and a gallery without a
    verification block refuses them all.
    """

    mode: str
    verification: Verification | None
    gallery: str = ""
    strict: bool = False

    @classmethod
    def effective(
        cls, mode: str, verification: Verification | None, *, gallery: str = "", strict: bool = False
    ) -> SignaturePolicy:
        if verification is not None and verification.is_empty:
            verification = None
        if strict:
            mode = ENFORCE
        return cls(
            mode=mode if mode in MODES else OFF, verification=verification, gallery=gallery, strict=strict
        )

    @property
    def checks(self) -> bool:
        return self.mode != OFF

    @property
    def enforced(self) -> bool:
        return self.mode == ENFORCE

    def describe(self) -> str:
        if not self.checks:
            return "signatures not checked"
        strict = " (strict integrity)" if self.strict else ""
        if self.verification is None:
            return f"{self.mode}{strict}: no verification policy, nothing can be installed"
        return f"{self.mode}{strict}: {self.verification.describe()}"


@dataclass(frozen=True)
class VerifiedSignature:
    """A signature that satisfied the policy: who signed which digest, when, and where it was found."""

    digest: str
    identity: str
    issuer: str
    signed_at: dt.datetime
    bundle_digest: str
    content: str
    """``dsse-envelope`` (cosign v3) or ``message-signature``."""
    predicate_type: str = ""
    log_index: int = -1
    found_through: str = ""
    """``referrers API`` or ``referrers tag sha256-...``."""

    def to_json(self) -> dict[str, Any]:
        return {
            "status": "verified",
            "digest": self.digest,
            "identity": self.identity,
            "issuer": self.issuer,
            "signed_at": format_rfc3339(self.signed_at),
            "bundle": self.bundle_digest,
            "log_index": self.log_index,
        }


@dataclass(frozen=True)
class SignatureOutcome:
    """What applying a policy to one image gave: ``verified``, ``unverified`` (warn: ``problem``
    says why) or ``skipped`` (policy off)."""

    status: str
    signature: VerifiedSignature | None = None
    problem: SignatureRejected | None = None
    digest: str = ""

    def to_json(self) -> dict[str, Any] | None:
        """What metadata.json keeps of it (under a key LocalAI does not read), or None if nothing."""
        if self.signature is not None:
            return self.signature.to_json()
        if self.problem is not None:
            return {
                "status": "unverified",
                "digest": self.digest,
                "reason": self.problem.reason,
                "detail": self.problem.detail,
            }
        return None

    def summary(self) -> str:
        if self.signature is not None:
            return f"signed by {self.signature.identity} ({self.signature.issuer})"
        if self.problem is not None:
            return f"signature not verified (warn): {self.problem}"
        return ""


# --- the trust root -----------------------------------------------------------------------------

_trust_cache: dict[tuple[str, float], TrustedRoot] = {}
_trust_lock = threading.Lock()


def load_trusted_root(path: str | os.PathLike[str] | None) -> TrustedRoot:
    """The trust root to verify against: a file, or sigstore's public-good root with no network.

    ``path`` names a ``trusted_root.json`` or a ``ClientTrustConfig`` (what ``sigstore
    --trust-config`` takes), told apart by ``mediaType``. Without one, the public-good root that
    ships inside the installed sigstore release is used offline (``ClientTrustConfig.production(
    offline=True)``): it is as recent as that release. Loaded once per process and file version.
    Raises ``SignatureRejected("trust_root", ...)``.
    """
    key_path = os.fspath(path) if path else ""
    try:
        mtime = os.stat(key_path).st_mtime if key_path else 0.0
    except OSError as exc:
        raise SignatureRejected("trust_root", f"{key_path}: {exc.strerror}") from None
    with _trust_lock:
        cached = _trust_cache.get((key_path, mtime))
        if cached is not None:
            return cached
        root = _read_trusted_root(key_path)
        _trust_cache.clear()
        _trust_cache[(key_path, mtime)] = root
        return root


def _read_trusted_root(path: str) -> TrustedRoot:
    from sigstore.errors import Error as SigstoreError
    from sigstore.models import ClientTrustConfig, TrustedRoot

    if not path:
        try:
            return ClientTrustConfig.production(offline=True).trusted_root
        except (SigstoreError, OSError, ValueError) as exc:
            raise SignatureRejected(
                "trust_root", f"sigstore's public-good root could not be read offline: {exc}"
            ) from None
    try:
        with open(path, "rb") as handle:
            raw = handle.read(16 * 1024 * 1024)
        media_type = json.loads(raw).get("mediaType", "")
        if media_type == CLIENT_TRUST_CONFIG_TYPE:
            return ClientTrustConfig.from_json(raw.decode()).trusted_root
        if media_type == TRUSTED_ROOT_TYPE:
            return TrustedRoot.from_file(path)
        raise ValueError(f"mediaType {media_type!r} is neither a trusted root nor a client trust config")
    except (OSError, ValueError, AttributeError, SigstoreError) as exc:
        raise SignatureRejected("trust_root", f"{path}: {exc}") from None


def describe_trust_root(path: str | os.PathLike[str] | None) -> str:
    """Where the trust root comes from, in one line for the settings page."""
    if not path:
        from sigstore import __version__

        return (
            f"Sigstore public-good root, read offline: the copy shipped with sigstore {__version__} "
            "(or a newer one in its cache); no TUF update"
        )
    return f"file {os.fspath(path)}"


# --- the certificate's identity -----------------------------------------------------------------


def certificate_issuer(cert: x509.Certificate) -> str:
    """The OIDC issuer as sigstore-go reads it: extension .1.8 (DER UTF8String), else .1.1 (raw)."""
    try:
        value = cert.extensions.get_extension_for_oid(OID_ISSUER_V2).value
        raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
        text = _der_utf8string(raw)
        if text is not None:
            return text
    except x509.ExtensionNotFound:
        pass
    try:
        value = cert.extensions.get_extension_for_oid(OID_ISSUER_V1).value
        if isinstance(value, x509.UnrecognizedExtension):
            return value.value.decode(errors="replace")
    except x509.ExtensionNotFound:
        pass
    return ""


def _der_utf8string(raw: bytes) -> str | None:
    if len(raw) < 2 or raw[0] != 0x0C:
        return None
    length, offset = raw[1], 2
    if length & 0x80:
        width = length & 0x7F
        length, offset = int.from_bytes(raw[2 : 2 + width], "big"), 2 + width
    body = raw[offset : offset + length]
    return body.decode(errors="replace") if len(body) == length else None


def certificate_identity(cert: x509.Certificate) -> str:
    """The SAN sigstore-go matches: the first URI, else the first email, else Fulcio's otherName."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if uris:
        return str(uris[0])
    emails = san.get_values_for_type(x509.RFC822Name)
    if emails:
        return str(emails[0])
    for other in san.get_values_for_type(x509.OtherName):
        if other.type_id == OID_OTHERNAME_SAN:
            text = _der_utf8string(other.value)
            if text is not None:
                return text
    return ""


def compile_regex(pattern: str) -> Any:
    """A policy regex compiled by RE2: Go's syntax, as LocalAI (sigstore-go) reads it, and matching
    in linear time whatever the pattern and the certificate's text (Python's `re` backtracks).
    ValueError when RE2 refuses it (a backreference, a lookaround, a bad escape...)."""
    options = re2.Options()
    options.log_errors = False  # said in the ValueError instead of on stderr
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else ""
        text = reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
        raise ValueError(f"not a valid regular expression: {text}") from None


class IdentityPolicy:
    """A sigstore-python verification policy with sigstore-go's ``CertificateIdentity`` rules.

    sigstore-python's own policies match exactly only, and read the deprecated issuer extension.
    Here the exact value and the regex are both checked when both are set, and regexes are RE2
    searches (unanchored, as Go's ``regexp.MatchString``): anchor them with ``^...$``.
    """

    def __init__(self, verification: Verification) -> None:
        self.verification = verification
        self._issuer = compile_regex(verification.issuer_regex) if verification.issuer_regex else None
        self._identity = compile_regex(verification.identity_regex) if verification.identity_regex else None

    def verify(self, cert: x509.Certificate) -> None:
        v = self.verification
        issuer, identity = certificate_issuer(cert), certificate_identity(cert)
        if v.issuer and issuer != v.issuer:
            raise _IssuerMismatch(f'expected issuer "{v.issuer}", got "{issuer}"')
        if self._issuer is not None and not self._issuer.search(issuer):
            raise _IssuerMismatch(f'expected issuer to match "{v.issuer_regex}", got "{issuer}"')
        if not identity:
            raise _IdentityMismatch("the certificate names no identity (no subject alternative name)")
        if v.identity and identity != v.identity:
            raise _IdentityMismatch(f'expected identity "{v.identity}", got "{identity}"')
        if self._identity is not None and not self._identity.search(identity):
            raise _IdentityMismatch(f'expected identity to match "{v.identity_regex}", got "{identity}"')


def verified_times(bundle: Bundle) -> list[dt.datetime]:
    """The bundle's times that sigstore-python verified, read after a successful verification.

    sigstore-python does not return them. The log's integrated time counts only with an inclusion
    promise (the signed entry timestamp binds it; that is sigstore's own rule); RFC 3161 timestamps
    count too. Counting a timestamp sigstore did not accept could only make the earliest time
    earlier, that is, refuse more, never less.
    """
    material = json.loads(bundle.to_json()).get("verificationMaterial") or {}
    times: list[dt.datetime] = []
    for entry in material.get("tlogEntries") or []:
        if entry.get("integratedTime") and entry.get("inclusionPromise"):
            times.append(dt.datetime.fromtimestamp(int(entry["integratedTime"]), dt.UTC))
    for stamp in (material.get("timestampVerificationData") or {}).get("rfc3161Timestamps") or []:
        from rfc3161_client import decode_timestamp_response

        response = decode_timestamp_response(base64.b64decode(stamp["signedTimestamp"]))
        times.append(response.tst_info.gen_time.astimezone(dt.UTC))
    return times


# --- finding the bundles ------------------------------------------------------------------------


def referrers_tag(digest: str) -> str:
    """The referrers tag schema of the distribution spec: ``<alg>-<hex>``, at most 128 characters."""
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}-{hexpart}"[:128]


@dataclass
class FoundBundle:
    referrer: str
    """The digest of the artifact manifest holding the bundle."""
    data: bytes


@dataclass
class BundleSearch:
    """The bundles attached to one manifest, where they were found, and what was passed over."""

    found_through: str
    bundles: list[FoundBundle] = field(default_factory=list)
    passed_over: list[str] = field(default_factory=list)


def find_bundles(client: RegistryClient, ref: str | Reference, digest: str) -> BundleSearch:
    """The Sigstore bundles attached to ``digest`` in ``ref``'s repository.

    The referrers API first; where the registry has none, the referrers tag ``sha256-<hex>``. Of
    the referrers listed, those with a Sigstore bundle ``artifactType`` are fetched by digest
    (verified); one whose manifest's ``subject`` is not ``digest`` is passed over (anyone who can
    push can edit the tag index), as is one whose bundle is missing or larger than
    :data:`MAX_BUNDLE_BYTES`. At most :data:`MAX_BUNDLES` are fetched. Registry failures other than
    a missing referrer raise ``OCIError``.
    """
    reference = parse_reference(ref)
    digest = validate_digest(digest)
    index = client.referrers(reference, digest)
    search = BundleSearch(found_through="referrers API")
    if index is None:
        tag = referrers_tag(digest)
        search.found_through = f"referrers tag {tag[:19]}..."
        try:
            index, _ = client.fetch_manifest(reference, tag)
        except NotFound:
            return search
    entries = index.get("manifests")
    seen: set[str] = set()
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, Mapping):
            continue
        artifact_type = str(entry.get("artifactType") or "")
        if not (artifact_type.startswith(BUNDLE_ARTIFACT_PREFIX) and artifact_type.endswith("+json")):
            continue
        referrer = str(entry.get("digest") or "")
        if referrer in seen:
            continue
        seen.add(referrer)
        if len(search.bundles) + len(search.passed_over) >= MAX_BUNDLES:
            search.passed_over.append(f"more than {MAX_BUNDLES} bundles listed; the rest not read")
            break
        try:
            manifest, _ = client.fetch_manifest(reference, validate_digest(referrer))
            subject = manifest.get("subject")
            if not isinstance(subject, Mapping) or subject.get("digest") != digest:
                search.passed_over.append(f"{referrer[:19]}...: its subject is another manifest")
                continue
            layers = manifest.get("layers")
            if not isinstance(layers, list) or not layers:
                search.passed_over.append(f"{referrer[:19]}...: no layer")
                continue
            layer = Descriptor.from_json(layers[0], f"{reference.name}@{referrer} layers[0]")
            data = client.fetch_blob(reference, layer, MAX_BUNDLE_BYTES)
        except (AuthError, RegistryUnavailable):
            raise
        except OCIError as exc:  # missing, malformed, too big, not what its digest says: skip it
            search.passed_over.append(f"{referrer[:19]}...: {exc}")
            continue
        search.bundles.append(FoundBundle(referrer=referrer, data=data))
    return search


# --- verifying ----------------------------------------------------------------------------------


def verify_bundle(
    verifier: Verifier, data: bytes, digest: str, verification: Verification
) -> VerifiedSignature:
    """Verify one bundle for ``digest`` under ``verification``; ``SignatureRejected`` says why not."""
    from sigstore.errors import Error as SigstoreError
    from sigstore.errors import VerificationError
    from sigstore.hashes import Hashed
    from sigstore.models import Bundle
    from sigstore_models.common.v1 import HashAlgorithm

    try:
        document = json.loads(data)
        if not isinstance(document, dict):
            raise ValueError("a bundle is a JSON object")
        bundle = Bundle.from_json(data)
    except (SigstoreError, ValueError) as exc:
        raise SignatureRejected("invalid_bundle", str(exc)) from None
    algorithm, _, hexdigest = digest.partition(":")
    if algorithm != "sha256":
        raise SignatureRejected("digest_mismatch", f"only sha256 image digests can be verified, not {digest}")
    policy = IdentityPolicy(verification)
    predicate_type = ""
    try:
        if "dsseEnvelope" in document:
            payload_type, payload = verifier.verify_dsse(bundle, policy)
            predicate_type = _check_statement(payload_type, payload, digest)
            content = "dsse-envelope"
        else:
            hashed = Hashed(algorithm=HashAlgorithm.SHA2_256, digest=bytes.fromhex(hexdigest))
            verifier.verify_artifact(hashed, bundle, policy)
            content = "message-signature"
    except _IssuerMismatch as exc:
        raise SignatureRejected("wrong_issuer", str(exc)) from None
    except _IdentityMismatch as exc:
        raise SignatureRejected("wrong_identity", str(exc)) from None
    except VerificationError as exc:
        raise SignatureRejected(_classify(str(exc)), str(exc)) from None
    except SignatureRejected:
        raise
    except (SigstoreError, ValueError, KeyError, TypeError) as exc:
        # A hostile bundle may break sigstore's parsing in ways it does not wrap.
        raise SignatureRejected("invalid_bundle", f"{type(exc).__name__}: {exc}") from None
    times = verified_times(bundle)
    if not times:
        raise SignatureRejected("invalid_bundle", "no verified timestamp in the bundle")
    signed_at = min(times)
    if verification.not_before is not None and signed_at < verification.not_before:
        raise SignatureRejected(
            "signed_before_not_before",
            f"signature integrated time {format_rfc3339(signed_at)} is before not_before "
            f"{format_rfc3339(verification.not_before)}",
        )
    entries = (document.get("verificationMaterial") or {}).get("tlogEntries") or [{}]
    log_index = entries[0].get("logIndex") if isinstance(entries[0], dict) else None
    cert = bundle.signing_certificate
    return VerifiedSignature(
        digest=digest,
        identity=certificate_identity(cert),
        issuer=certificate_issuer(cert),
        signed_at=signed_at,
        bundle_digest="",
        content=content,
        predicate_type=predicate_type,
        log_index=int(str(log_index)) if str(log_index or "").isdigit() else -1,
    )


def _check_statement(payload_type: str, payload: bytes, digest: str) -> str:
    """The DSSE payload must be an in-toto statement naming ``digest``; returns its predicate type.

    sigstore-python returns the payload unchecked; sigstore-go checks the subject against the
    artifact digest, and so do we. cosign's subjects have no ``name``, which sigstore-python's own
    ``Statement`` model refuses, so the JSON is read here.
    """
    if payload_type != INTOTO_PAYLOAD_TYPE:
        raise SignatureRejected("invalid_bundle", f"DSSE payload type is {payload_type!r}, not in-toto")
    try:
        statement = json.loads(payload)
    except ValueError as exc:
        raise SignatureRejected("invalid_bundle", f"DSSE payload is not JSON: {exc}") from None
    if not isinstance(statement, dict) or statement.get("_type") not in INTOTO_STATEMENT_TYPES:
        raise SignatureRejected("invalid_bundle", "DSSE payload is not an in-toto statement")
    hexdigest = digest.partition(":")[2]
    subjects = [
        str((s.get("digest") or {}).get("sha256", ""))
        for s in statement.get("subject") or []
        if isinstance(s, dict) and isinstance(s.get("digest"), dict)
    ]
    if hexdigest not in subjects:
        shown = ", ".join(f"sha256:{s[:12]}.." for s in subjects) or "none"
        raise SignatureRejected("digest_mismatch", f"the statement signs {shown}, not {digest}")
    return str(statement.get("predicateType") or "")


def _classify(message: str) -> str:
    """A reason code for a sigstore VerificationError; sigstore has one exception type for all."""
    lowered = message.lower()
    if (
        "message digest mismatch" in lowered
        or "signature is invalid for input" in lowered
        or "inconsistent with other materials" in lowered
    ):
        return "digest_mismatch"
    if "certificate chain" in lowered:
        return "untrusted_certificate"
    return "invalid_signature"


def verify_image(
    client: RegistryClient,
    ref: str | Reference,
    digest: str,
    verification: Verification,
    trusted_root: TrustedRoot,
) -> VerifiedSignature:
    """Verify the image manifest ``digest`` of ``ref``'s repository: any attached bundle that verifies
    is enough; otherwise ``SignatureRejected`` with the most telling reason among the bundles'."""
    try:
        verification.validate()
    except ValueError as exc:
        raise SignatureRejected("invalid_policy", str(exc)) from None
    try:
        search = find_bundles(client, ref, digest)
    except SignatureRejected:
        raise
    except OCIError as exc:
        raise SignatureRejected("lookup_failed", f"looking for the signatures of {digest}: {exc}") from None
    if not search.bundles:
        skipped = f"; passed over: {'; '.join(search.passed_over)}" if search.passed_over else ""
        raise SignatureRejected(
            "no_signature", f"no Sigstore bundle attached to {digest} ({search.found_through}){skipped}"
        )
    from sigstore.verify import Verifier

    verifier = Verifier(trusted_root=trusted_root)
    failures: list[SignatureRejected] = []
    for found in search.bundles:
        try:
            signature = verify_bundle(verifier, found.data, digest, verification)
        except SignatureRejected as exc:
            log.info("bundle %s for %s refused: %s", found.referrer, digest, exc)
            failures.append(exc)
            continue
        return dataclasses.replace(
            signature, bundle_digest=found.referrer, found_through=search.found_through
        )
    failures.sort(key=lambda e: _REASON_ORDER.index(e.reason) if e.reason in _REASON_ORDER else 99)
    first = failures[0]
    if len(failures) > 1:
        raise SignatureRejected(
            first.reason, f"{first.detail} (and {len(failures) - 1} other bundle(s) refused)"
        )
    raise first


def apply_policy(
    client: RegistryClient,
    ref: str | Reference,
    digest: str,
    policy: SignaturePolicy,
    trusted_root: Callable[[], TrustedRoot],
) -> SignatureOutcome:
    """What ``policy`` says of the image ``digest``: raises ``SignatureRejected`` when it is enforced
    and not satisfied; under ``warn`` the problem comes back in the outcome instead.

    ``trusted_root`` is called only when something is to be verified (an ``off`` policy never
    loads it).
    """
    if not policy.checks:
        return SignatureOutcome(status="skipped", digest=digest)
    try:
        if policy.verification is None:
            raise SignatureRejected(
                "no_policy",
                f"strict integrity: gallery {policy.gallery!r} has no verification policy"
                if policy.strict
                else f"gallery {policy.gallery!r} asks for signatures but has no verification block",
            )
        signature = verify_image(client, ref, digest, policy.verification, trusted_root())
    except SignatureRejected as exc:
        if policy.enforced:
            raise
        return SignatureOutcome(status="unverified", problem=exc, digest=digest)
    return SignatureOutcome(status="verified", signature=signature, digest=digest)
