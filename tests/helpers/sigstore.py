"""A Sigstore instance of the tests' own, and cosign's way of attaching signatures to images.

Everything the public-good instance provides, built in memory so the tests never reach the network:

* a Fulcio stand-in: a root CA and an intermediate (P-384) issuing short-lived leaf certificates with
  Fulcio's profile (empty subject, critical SAN, code-signing EKU, the issuer extensions .1.1 and
  .1.8) and an embedded SCT, which sigstore-python requires;
* a CT log key signing those SCTs (RFC 6962 precertificate entries);
* a Rekor-like transparency log: an RFC 6962 Merkle tree, signed checkpoints (signed notes) and
  signed entry timestamps;
* ``trusted_root.json`` naming all three, what ``PORTAL_SIGSTORE_TRUSTED_ROOT`` points at.

`LocalSigstore.sign_digest` signs a manifest digest as ``cosign sign`` v3 does (a DSSE envelope
holding an in-toto statement whose subject is the digest, logged as a ``dsse`` entry) or as a
message signature (``hashedrekord``); `attach_bundle` pushes the bundle as an OCI 1.1 referrer of
the manifest and records it in the referrers tag index (``sha256-<hex>``), as cosign does on a
registry without the referrers API (Debian's docker-registry 2.8).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import secrets
import struct
from dataclasses import dataclass
from typing import Any

import requests
import rfc8785
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
ACCEPT_ALL = ", ".join(
    [
        OCI_MANIFEST,
        OCI_INDEX,
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
BUNDLE_V03 = "application/vnd.dev.sigstore.bundle.v0.3+json"
INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
COSIGN_SIGN_PREDICATE = "https://sigstore.dev/cosign/sign/v1"

OID_ISSUER_V1 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
OID_ISSUER_V2 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8")
OID_SCT_LIST = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")
OID_OTHERNAME_SAN = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.7")

GITHUB_ISSUER = "https://token.actions.githubusercontent.com"
BUILD_IDENTITY = "https://github.com/example/backends/.github/workflows/build.yaml@refs/heads/master"
BUILD_IDENTITY_REGEX = (
    r"^https://github\.com/example/backends/\.github/workflows/build\.yaml@refs/heads/master$"
)
TIMEOUT = (10.0, 60.0)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def der_utf8string(text: str) -> bytes:
    raw = text.encode()
    return b"\x0c" + _der_length(len(raw)) + raw


def _der_octet_string(raw: bytes) -> bytes:
    return b"\x04" + _der_length(len(raw)) + raw


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(key: ec.EllipticCurvePublicKey) -> bytes:
    """RFC 6962 key ID (Rekor's log ID, a CT log's ID): SHA-256 of the DER SubjectPublicKeyInfo."""
    return hashlib.sha256(_spki(key)).digest()


def _ca_cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: dt.datetime,
    path_length: int,
) -> x509.Certificate:
    usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer_key is not key:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    return builder.sign(issuer_key, hashes.SHA384())


class TransparencyLog:
    """A Rekor-v1-like log: RFC 6962 Merkle tree, signed-note checkpoints, signed entry timestamps."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.log_id = key_id(self.key.public_key())
        self.name = name
        self.origin = f"{name} - {secrets.randbits(62)}"
        self.entries: list[tuple[bytes, int]] = []  # (canonical body, integrated time)

    @staticmethod
    def _leaf(data: bytes) -> bytes:
        return hashlib.sha256(b"\x00" + data).digest()

    @staticmethod
    def _node(left: bytes, right: bytes) -> bytes:
        return hashlib.sha256(b"\x01" + left + right).digest()

    def _root(self, leaves: list[bytes]) -> bytes:
        if len(leaves) == 1:
            return leaves[0]
        split = 1 << ((len(leaves) - 1).bit_length() - 1)
        return self._node(self._root(leaves[:split]), self._root(leaves[split:]))

    def _path(self, index: int, leaves: list[bytes]) -> list[bytes]:
        """The audit path of leaf ``index``, bottom-up (RFC 6962 section 2.1.1)."""
        if len(leaves) <= 1:
            return []
        split = 1 << ((len(leaves) - 1).bit_length() - 1)
        if index < split:
            return [*self._path(index, leaves[:split]), self._root(leaves[split:])]
        return [*self._path(index - split, leaves[split:]), self._root(leaves[:split])]

    def append(self, body: bytes, integrated_time: int) -> int:
        self.entries.append((body, integrated_time))
        return len(self.entries) - 1

    def checkpoint(self, size: int, root: bytes) -> str:
        note = f"{self.origin}\n{size}\n{b64(root)}\n"
        signature = self.key.sign(note.encode(), ec.ECDSA(hashes.SHA256()))
        return f"{note}\n\u2014 {self.name} {b64(self.log_id[:4] + signature)}\n"

    def tlog_entry(self, index: int, kind: str) -> dict[str, Any]:
        """A bundle's ``tlogEntries[]`` item for entry ``index``, proven against the current tree head."""
        body, integrated_time = self.entries[index]
        leaves = [self._leaf(entry) for entry, _ in self.entries]
        root = self._root(leaves)
        promise = rfc8785.dumps(
            {
                "body": b64(body),
                "integratedTime": integrated_time,
                "logID": self.log_id.hex(),
                "logIndex": index,
            }
        )
        return {
            "logIndex": str(index),
            "logId": {"keyId": b64(self.log_id)},
            "kindVersion": {"kind": kind, "version": "0.0.1"},
            "integratedTime": str(integrated_time),
            "inclusionPromise": {
                "signedEntryTimestamp": b64(self.key.sign(promise, ec.ECDSA(hashes.SHA256())))
            },
            "inclusionProof": {
                "logIndex": str(index),
                "rootHash": b64(root),
                "treeSize": str(len(leaves)),
                "hashes": [b64(h) for h in self._path(index, leaves)],
                "checkpoint": {"envelope": self.checkpoint(len(leaves), root)},
            },
            "canonicalizedBody": b64(body),
        }


class CTLog:
    """A certificate-transparency log key: signs the SCT embedded in each leaf certificate."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.log_id = key_id(self.key.public_key())

    def sct_extension(
        self, tbs_precert: bytes, issuer_key: ec.EllipticCurvePublicKey, when: dt.datetime
    ) -> x509.UnrecognizedExtension:
        """An embedded SCT list (RFC 6962 section 3.2, precert entry). cryptography cannot build
        SCT objects, so the extension is written as raw DER."""
        ms = int(when.timestamp() * 1000)
        signed = (
            struct.pack("!BBQH", 0, 0, ms, 1)
            + key_id(issuer_key)
            + len(tbs_precert).to_bytes(3, "big")
            + tbs_precert
            + struct.pack("!H", 0)
        )
        signature = self.key.sign(signed, ec.ECDSA(hashes.SHA256()))
        sct = (
            b"\x00"
            + self.log_id
            + struct.pack("!QH", ms, 0)
            + bytes([4, 3])  # sha256, ecdsa
            + struct.pack("!H", len(signature))
            + signature
        )
        sct_list = struct.pack("!H", len(sct) + 2) + struct.pack("!H", len(sct)) + sct
        return x509.UnrecognizedExtension(OID_SCT_LIST, _der_octet_string(sct_list))


class LocalSigstore:
    """A whole Sigstore instance in memory: CA, CT log, transparency log; signs like cosign."""

    def __init__(self, name: str = "portal-test") -> None:
        self.name = name
        self.epoch = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=30)
        root_key = ec.generate_private_key(ec.SECP384R1())
        root_name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{name}-fulcio-root"),
            ]
        )
        self.root_cert = _ca_cert(root_name, root_key, root_name, root_key, self.epoch, 1)
        self.intermediate_key = ec.generate_private_key(ec.SECP384R1())
        intermediate_name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{name}-fulcio-intermediate"),
            ]
        )
        self.intermediate_cert = _ca_cert(
            intermediate_name, self.intermediate_key, root_name, root_key, self.epoch, 0
        )
        self.ct = CTLog()
        self.rekor = TransparencyLog(f"rekor.{name}.invalid")
        # Unrelated entries, so inclusion proofs have several levels.
        for filler in range(5):
            self.rekor.append(rfc8785.dumps({"filler": filler}), int(self.epoch.timestamp()) + filler)

    def issue_leaf(
        self, identity: str, issuer: str, when: dt.datetime, *, sct: bool = True
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A Fulcio-style signing certificate for ``identity`` (URI, email or otherName) from ``issuer``,
        valid ten minutes from ``when``."""
        key = ec.generate_private_key(ec.SECP256R1())
        san: x509.GeneralName
        if "://" in identity:
            san = x509.UniformResourceIdentifier(identity)
        elif "@" in identity:
            san = x509.RFC822Name(identity)
        else:
            san = x509.OtherName(OID_OTHERNAME_SAN, der_utf8string(identity))
        usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.intermediate_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(when)
            .not_valid_after(when + dt.timedelta(minutes=10))
            .add_extension(usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.intermediate_key.public_key()),
                critical=False,
            )
            # An empty subject makes the SAN critical (RFC 5280 4.2.1.6), as Fulcio does.
            .add_extension(x509.SubjectAlternativeName([san]), critical=True)
            .add_extension(x509.UnrecognizedExtension(OID_ISSUER_V1, issuer.encode()), critical=False)
            .add_extension(x509.UnrecognizedExtension(OID_ISSUER_V2, der_utf8string(issuer)), critical=False)
        )
        # The SCT signs the TBSCertificate without the SCT extension: the same builder signed
        # without it gives exactly those bytes.
        precert = builder.sign(self.intermediate_key, hashes.SHA384())
        if not sct:
            return key, precert
        extension = self.ct.sct_extension(
            precert.tbs_certificate_bytes, self.intermediate_key.public_key(), when
        )
        cert = builder.add_extension(extension, critical=False).sign(self.intermediate_key, hashes.SHA384())
        assert cert.tbs_precertificate_bytes == precert.tbs_certificate_bytes, "the SCT would not verify"
        return key, cert

    def trusted_root(self) -> dict[str, Any]:
        """``trusted_root.json`` for this instance (what PORTAL_SIGSTORE_TRUSTED_ROOT names)."""
        valid = {"start": rfc3339(self.epoch)}

        def log_instance(key: ec.EllipticCurvePrivateKey, url: str) -> dict[str, Any]:
            return {
                "baseUrl": url,
                "hashAlgorithm": "SHA2_256",
                "publicKey": {
                    "rawBytes": b64(_spki(key.public_key())),
                    "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                    "validFor": valid,
                },
                "logId": {"keyId": b64(key_id(key.public_key()))},
            }

        chain = [
            {"rawBytes": b64(cert.public_bytes(serialization.Encoding.DER))}
            for cert in (self.intermediate_cert, self.root_cert)  # leaf-most first
        ]
        return {
            "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
            "tlogs": [log_instance(self.rekor.key, f"https://{self.rekor.name}")],
            "certificateAuthorities": [
                {
                    "subject": {"organization": self.name, "commonName": f"{self.name}-fulcio"},
                    "uri": f"https://fulcio.{self.name}.invalid",
                    "certChain": {"certificates": chain},
                    "validFor": valid,
                }
            ],
            "ctlogs": [log_instance(self.ct.key, f"https://ctfe.{self.name}.invalid")],
            "timestampAuthorities": [],
        }

    def client_trust_config(self) -> dict[str, Any]:
        """The same root wrapped as a ClientTrustConfig (what ``sigstore --trust-config`` takes)."""
        service = {"majorApiVersion": 1, "validFor": {"start": rfc3339(self.epoch)}, "operator": self.name}
        return {
            "mediaType": "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json",
            "trustedRoot": self.trusted_root(),
            "signingConfig": {
                "mediaType": "application/vnd.dev.sigstore.signingconfig.v0.2+json",
                "caUrls": [{"url": f"https://fulcio.{self.name}.invalid", **service}],
                "oidcUrls": [{"url": f"https://oidc.{self.name}.invalid", **service}],
                "rekorTlogUrls": [{"url": f"https://{self.rekor.name}", **service}],
                "tsaUrls": [],
                "rekorTlogConfig": {"selector": "ANY"},
                "tsaConfig": {"selector": "ANY"},
            },
        }

    def sign_digest(
        self,
        digest: str,
        *,
        identity: str = BUILD_IDENTITY,
        issuer: str = GITHUB_ISSUER,
        when: dt.datetime | None = None,
        mode: str = "dsse",
    ) -> str:
        """A Sigstore bundle (v0.3 JSON) over the manifest digest ``sha256:<hex>``.

        ``dsse``: cosign v3's ``sign``, a DSSE envelope holding an in-toto v1 statement whose
        subject is the digest (predicate ``https://sigstore.dev/cosign/sign/v1``), logged as
        ``dsse`` 0.0.1. ``message``: a message signature over the digest, logged as
        ``hashedrekord`` 0.0.1.
        """
        when = (when or dt.datetime.now(dt.UTC)).replace(microsecond=0)
        key, cert = self.issue_leaf(identity, issuer, when)
        cert_pem = b64(cert.public_bytes(serialization.Encoding.PEM))
        algorithm, _, hexdigest = digest.partition(":")
        assert algorithm == "sha256"
        content: dict[str, Any]
        if mode == "dsse":
            statement = json.dumps(
                {
                    "_type": "https://in-toto.io/Statement/v1",
                    "subject": [{"digest": {"sha256": hexdigest}}],
                    "predicateType": COSIGN_SIGN_PREDICATE,
                    "predicate": {},
                },
                separators=(",", ":"),
            ).encode()
            pae = b"DSSEv1 %d %s %d %s" % (
                len(INTOTO_PAYLOAD_TYPE),
                INTOTO_PAYLOAD_TYPE.encode(),
                len(statement),
                statement,
            )
            signature = key.sign(pae, ec.ECDSA(hashes.SHA256()))
            envelope = {
                "payload": b64(statement),
                "payloadType": INTOTO_PAYLOAD_TYPE,
                "signatures": [{"sig": b64(signature)}],
            }
            body = rfc8785.dumps(
                {
                    "apiVersion": "0.0.1",
                    "kind": "dsse",
                    "spec": {
                        "envelopeHash": {
                            "algorithm": "sha256",
                            "value": sha256_hex(json.dumps(envelope).encode()),
                        },
                        "payloadHash": {"algorithm": "sha256", "value": sha256_hex(statement)},
                        "signatures": [{"signature": b64(signature), "verifier": cert_pem}],
                    },
                }
            )
            kind, content = "dsse", {"dsseEnvelope": envelope}
        elif mode == "message":
            raw = bytes.fromhex(hexdigest)
            signature = key.sign(raw, ec.ECDSA(Prehashed(hashes.SHA256())))
            body = rfc8785.dumps(
                {
                    "apiVersion": "0.0.1",
                    "kind": "hashedrekord",
                    "spec": {
                        "data": {"hash": {"algorithm": "sha256", "value": hexdigest}},
                        "signature": {"content": b64(signature), "publicKey": {"content": cert_pem}},
                    },
                }
            )
            kind = "hashedrekord"
            content = {
                "messageSignature": {
                    "messageDigest": {"algorithm": "SHA2_256", "digest": b64(raw)},
                    "signature": b64(signature),
                }
            }
        else:
            raise ValueError(mode)
        index = self.rekor.append(body, int(when.timestamp()) + 2)
        bundle = {
            "mediaType": BUNDLE_V03,
            "verificationMaterial": {
                "certificate": {"rawBytes": b64(cert.public_bytes(serialization.Encoding.DER))},
                "tlogEntries": [self.rekor.tlog_entry(index, kind)],
                "timestampVerificationData": {},
            },
            **content,
        }
        return json.dumps(bundle)


# --- the registry side: what cosign pushes --------------------------------------------------------


@dataclass(frozen=True)
class ManifestDescriptor:
    media_type: str
    digest: str
    size: int

    def as_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


def manifest_descriptor(registry_url: str, repo: str, reference: str) -> ManifestDescriptor:
    """The descriptor of a manifest (by tag or digest): what a referrer's ``subject`` names."""
    response = requests.get(
        f"{registry_url}/v2/{repo}/manifests/{reference}", headers={"Accept": ACCEPT_ALL}, timeout=TIMEOUT
    )
    response.raise_for_status()
    media_type = response.headers["Content-Type"].split(";")[0]
    return ManifestDescriptor(media_type, "sha256:" + sha256_hex(response.content), len(response.content))


def _push_blob(session: requests.Session, registry_url: str, repo: str, data: bytes) -> dict[str, Any]:
    digest = "sha256:" + sha256_hex(data)
    started = session.post(f"{registry_url}/v2/{repo}/blobs/uploads/", timeout=TIMEOUT)
    started.raise_for_status()
    location = started.headers["Location"]
    location = location if location.startswith("http") else registry_url + location
    done = session.put(
        location,
        params={"digest": digest},
        data=data,
        headers={"Content-Type": "application/octet-stream"},
        timeout=TIMEOUT,
    )
    done.raise_for_status()
    return {"digest": digest, "size": len(data)}


def _put_manifest(
    session: requests.Session, registry_url: str, repo: str, reference: str, body: bytes, media_type: str
) -> requests.Response:
    response = session.put(
        f"{registry_url}/v2/{repo}/manifests/{reference}",
        data=body,
        headers={"Content-Type": media_type},
        timeout=TIMEOUT,
    )
    assert response.status_code == 201, (
        f"PUT manifest {repo}:{reference}: {response.status_code} {response.text}"
    )
    return response


def referrers_tag(digest: str) -> str:
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}-{hexpart}"[:128]


def attach_bundle(
    registry_url: str,
    repo: str,
    subject: ManifestDescriptor,
    bundle_json: str,
    *,
    in_tag_index: bool = True,
    content: str = "dsse-envelope",
) -> str:
    """Push ``bundle_json`` as cosign does: an OCI artifact manifest (``artifactType`` the bundle's
    media type, empty config, the bundle as its one layer, ``subject`` the image's manifest), then,
    the registry lacking the referrers API, its descriptor added to the referrers tag index.
    Returns the artifact manifest's digest."""
    data = bundle_json.encode()
    with requests.Session() as session:
        layer = _push_blob(session, registry_url, repo, data)
        config = _push_blob(session, registry_url, repo, b"{}")
        annotations = {
            "dev.sigstore.bundle.content": content,
            "org.opencontainers.image.created": rfc3339(dt.datetime.now(dt.UTC)),
        }
        if content == "dsse-envelope":
            annotations["dev.sigstore.bundle.predicateType"] = COSIGN_SIGN_PREDICATE
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": BUNDLE_V03,
                "config": {"mediaType": OCI_EMPTY, **config},
                "layers": [{"mediaType": BUNDLE_V03, **layer}],
                "subject": subject.as_json(),
                "annotations": annotations,
            }
        ).encode()
        referrer = "sha256:" + sha256_hex(manifest)
        answer = _put_manifest(session, registry_url, repo, referrer, manifest, OCI_MANIFEST)
        if in_tag_index and "OCI-Subject" not in answer.headers:
            add_to_tag_index(
                registry_url,
                repo,
                subject.digest,
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": referrer,
                    "size": len(manifest),
                    "artifactType": BUNDLE_V03,
                    "annotations": annotations,
                },
            )
    return referrer


def add_to_tag_index(registry_url: str, repo: str, subject_digest: str, entry: dict[str, Any]) -> None:
    """Read, extend and write back the referrers tag index of ``subject_digest`` (as ggcr does)."""
    tag = referrers_tag(subject_digest)
    with requests.Session() as session:
        found = session.get(
            f"{registry_url}/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT_ALL}, timeout=TIMEOUT
        )
        if found.status_code == 200:
            index = found.json()
        else:
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        index["manifests"] = [m for m in index["manifests"] if m["digest"] != entry["digest"]] + [entry]
        _put_manifest(session, registry_url, repo, tag, json.dumps(index).encode(), OCI_INDEX)


def sign_image(
    sigstore: LocalSigstore,
    registry_url: str,
    ref: str,
    *,
    signed_digest: str | None = None,
    **sign: Any,
) -> ManifestDescriptor:
    """Sign the manifest ``ref`` (``host/repo:tag``) points at and attach the bundle to it, as
    ``cosign sign`` does; ``signed_digest`` signs another digest instead (a bundle copied from
    another image). Returns the descriptor of the manifest the bundle is attached to."""
    repo, _, tag = ref.partition("/")[2].rpartition(":")
    subject = manifest_descriptor(registry_url, repo, tag)
    mode = sign.get("mode", "dsse")
    bundle = sigstore.sign_digest(signed_digest or subject.digest, **sign)
    attach_bundle(
        registry_url,
        repo,
        subject,
        bundle,
        content="dsse-envelope" if mode == "dsse" else "message-signature",
    )
    return subject
