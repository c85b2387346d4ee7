"""What the API shows and accepts. Serializers read rows and validate input; they change nothing."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import ProhibitNullCharactersValidator
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.reverse import reverse

from backends_app import gallery as gallery_index
from backends_app.models import (
    Backend,
    BackendState,
    Gallery,
    JobKind,
    JobStatus,
    Node,
    PortalSettings,
    UpgradeJob,
)
from backends_app.oci import signatures

NAME_MAX_LENGTH = 255

# The JSON type each kind of field takes in a request body; DRF alone would read 12 as "12" and "true" as
# True, so a client's type mistake would go unnoticed.
JSON_TYPES: list[tuple[type[serializers.Field], tuple[type, ...], str]] = [
    (serializers.BooleanField, (bool,), "a boolean"),
    (serializers.IntegerField, (int,), "a whole number"),
    (serializers.FloatField, (int, float), "a number"),
    (serializers.CharField, (str,), "a string"),
    (serializers.TimeField, (str,), "a string (HH:MM[:SS])"),
]


class JsonBodySerializer(serializers.Serializer):
    """A request body whose values must already have the JSON type of their field, and whose every
    key is a field the endpoint takes: a misspelt or read-only field is refused by name, never
    silently ignored (the client would believe it had set something)."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            errors = self.unwritable_fields(data)
            for name, field in self.fields.items():
                if field.read_only or name not in data or (data[name] is None and field.allow_null):
                    continue
                value = data[name]
                for field_class, json_types, described in JSON_TYPES:
                    if isinstance(field, field_class):
                        if not isinstance(value, json_types) or (
                            bool not in json_types and isinstance(value, bool)
                        ):
                            errors[name] = [f"Must be {described}."]
                        break
            if errors:
                raise serializers.ValidationError(errors)
        return super().to_internal_value(data)

    def unwritable_fields(self, data: dict[str, Any]) -> dict[str, list[str]]:
        writable = sorted(name for name, field in self.fields.items() if not field.read_only)
        takes = f"this request takes {', '.join(writable)}" if writable else "this request takes no fields"
        errors = {}
        for key in data:
            field = self.fields.get(key)
            if field is None:
                errors[key] = [f"Unknown field: {takes}."]
            elif field.read_only:
                errors[key] = [f"Read-only field: {takes}."]
        return errors


class EmptyBodySerializer(JsonBodySerializer):
    """The body of a verb that takes no fields: nothing, or an empty object (LocalAI's UI sends `{}`)."""


class BackendStatusSerializer(serializers.Serializer):
    """A backend's state, as the pages, the admin and the commands show it."""

    state = serializers.ChoiceField(choices=BackendState.choices)
    label = serializers.CharField()  # type: ignore[assignment]  # a field named like Field.label
    detail = serializers.CharField(help_text="Why: the check's reason, the hold's reason, the error.")


def backend_ref(backend: Backend) -> str:
    """The name that addresses one backend whatever other galleries hold: `gallery@name`."""
    return f"{backend.gallery.name}@{backend.name}"


class InstalledOnNodeSerializer(serializers.Serializer):
    """The current version of a backend on one node, and how many older ones are kept for rollback."""

    node = serializers.CharField()
    online = serializers.BooleanField(help_text="The node's worker heartbeat is recent.")
    version = serializers.CharField()
    digest = serializers.CharField()
    installed_at = serializers.DateTimeField(allow_null=True)
    state = serializers.CharField()
    kept_versions = serializers.IntegerField()
    problem = serializers.CharField()
    signature = serializers.ChoiceField(
        choices=["", "verified", "unverified"],
        help_text="What the install found of the image's Sigstore signature: verified, unverified "
        "(the gallery only warns) or empty (not checked).",
    )
    signer_identity = serializers.CharField(help_text="The verified signer's identity (certificate SAN).")
    signer_issuer = serializers.CharField(help_text="The verified signer's OIDC issuer.")


class BackendSerializer(serializers.ModelSerializer):
    """A gallery entry with what is installed where, what the last check found, and the operator's holds.

    Expects backends from `Backend.objects.with_installations()` (installed rows and active jobs
    prefetched), so a page of backends costs the same few queries whatever its length.
    """

    ref = serializers.SerializerMethodField(help_text="`gallery@name`: addresses this entry unambiguously.")
    url = serializers.SerializerMethodField()
    gallery = serializers.CharField(source="gallery.name")
    declared_version = serializers.CharField(source="version", help_text="The gallery entry's `version`.")
    installed = serializers.SerializerMethodField()
    drift = serializers.SerializerMethodField(help_text="The nodes that have it run different builds.")
    active_job = serializers.SerializerMethodField(help_text="Id of a queued or running job, else null.")
    status = serializers.SerializerMethodField(help_text="What state the backend is in (`Backend.status`).")

    class Meta:
        model = Backend
        fields = [
            "ref",
            "url",
            "name",
            "gallery",
            "is_meta",
            "uri",
            "mirrors",
            "declared_version",
            "alias",
            "gone",
            "installed",
            "drift",
            "available_version",
            "latest_digest",
            "upgrade_available",
            "upgrade_reason",
            "pinned",
            "held_version",
            "held_digest",
            "held_reason",
            "last_checked_at",
            "last_error",
            "active_job",
            "status",
        ]
        read_only_fields = fields

    def get_ref(self, backend: Backend) -> str:
        return backend_ref(backend)

    def get_url(self, backend: Backend) -> str:
        return reverse(
            "api:backend-detail", kwargs={"name": backend_ref(backend)}, request=self.context.get("request")
        )

    @extend_schema_field(InstalledOnNodeSerializer(many=True))
    def get_installed(self, backend: Backend) -> list[dict[str, Any]]:
        return [
            {
                "node": row.node.name,
                "online": row.node.online,
                "version": row.version,
                "digest": row.digest,
                "installed_at": row.installed_at,
                "state": row.state,
                "kept_versions": len(backend.kept_versions_on(row.node_id)),
                "problem": row.problem,
                "signature": row.signature,
                "signer_identity": row.signer_identity,
                "signer_issuer": row.signer_issuer,
            }
            for row in backend.current_versions()
        ]

    @extend_schema_field(BackendStatusSerializer())
    def get_status(self, backend: Backend) -> dict[str, str]:
        status = backend.status
        return {"state": status.state, "label": status.label, "detail": status.detail}

    @extend_schema_field(serializers.BooleanField())
    def get_drift(self, backend: Backend) -> bool:
        return backend.drift

    @extend_schema_field(serializers.IntegerField(allow_null=True))
    def get_active_job(self, backend: Backend) -> int | None:
        jobs = getattr(backend, "active_jobs", None)
        if jobs is None:
            jobs = list(backend.jobs.filter(status__in=JobStatus.ACTIVE).order_by("-id")[:1])
        return jobs[0].pk if jobs else None


class UpgradeJobSerializer(serializers.ModelSerializer):
    """One job: what it does, where it is, and how it ended."""

    url = serializers.SerializerMethodField()
    backend = serializers.SerializerMethodField(help_text="The backend's name; null for a check.")
    gallery = serializers.SerializerMethodField(help_text="The backend's gallery; null for a check.")
    node = serializers.SerializerMethodField()
    parent: serializers.PrimaryKeyRelatedField[UpgradeJob] = serializers.PrimaryKeyRelatedField(  # type: ignore[assignment]
        read_only=True, allow_null=True
    )
    children = serializers.SerializerMethodField()
    duration_seconds = serializers.SerializerMethodField()

    class Meta:
        model = UpgradeJob
        fields = [
            "id",
            "uuid",
            "url",
            "kind",
            "status",
            "phase",
            "backend",
            "gallery",
            "node",
            "force",
            "cancel_requested",
            "bytes_done",
            "bytes_total",
            "percent",
            "message",
            "error",
            "from_version",
            "from_digest",
            "to_version",
            "to_digest",
            "source",
            "requested_by",
            "created_at",
            "started_at",
            "finished_at",
            "duration_seconds",
            "parent",
            "children",
        ]
        read_only_fields = fields

    def get_url(self, job: UpgradeJob) -> str:
        return reverse("api:job-detail", kwargs={"pk": job.pk}, request=self.context.get("request"))

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_backend(self, job: UpgradeJob) -> str | None:
        return job.backend.name if job.backend else None

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_gallery(self, job: UpgradeJob) -> str | None:
        return job.backend.gallery.name if job.backend else None

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_node(self, job: UpgradeJob) -> str | None:
        return job.node.name if job.node else None

    @extend_schema_field(serializers.ListField(child=serializers.IntegerField()))
    def get_children(self, job: UpgradeJob) -> list[int]:
        return sorted(child.pk for child in job.children.all())

    @extend_schema_field(serializers.FloatField(allow_null=True))
    def get_duration_seconds(self, job: UpgradeJob) -> float | None:
        duration: dt.timedelta | None = job.duration
        return round(duration.total_seconds(), 3) if duration is not None else None


class ConflictSerializer(serializers.Serializer):
    """409: `code` says why; `job` is the job already queued or running, when that is the reason."""

    detail = serializers.CharField()
    code = serializers.ChoiceField(choices=["active_job", "refused", "finished"])
    job = UpgradeJobSerializer(required=False)


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()


def node_named(value: str) -> Node:
    node = Node.objects.filter(name=value).first()
    if node is None:
        raise serializers.ValidationError(f"no node named {value!r}")
    return node


class OperationRequestSerializer(JsonBodySerializer):
    """The optional body of install, upgrade, rollback and uninstall."""

    force = serializers.BooleanField(default=False, help_text="Upgrade even when the backend is pinned.")
    node = serializers.CharField(
        required=False, max_length=200, help_text="Name of the node to act on; default the portal's own node."
    )

    def validate_node(self, value: str) -> Node:
        return node_named(value)


class ApplyRequestSerializer(JsonBodySerializer):
    """The optional body of "apply all upgrades"."""

    node = serializers.CharField(
        required=False,
        max_length=200,
        help_text="Name of the node to upgrade; default the portal's own node.",
    )

    def validate_node(self, value: str) -> Node:
        return node_named(value)


class SkippedBackendSerializer(serializers.Serializer):
    backend = serializers.CharField(help_text="`gallery@name`")
    reason = serializers.CharField()
    job = serializers.IntegerField(allow_null=True, help_text="The job already active, if that is why.")


class ApplyResultSerializer(serializers.Serializer):
    jobs = UpgradeJobSerializer(many=True, help_text="Upgrade jobs queued by this request.")
    skipped = SkippedBackendSerializer(many=True)


class FilterText(serializers.CharField):
    """A name or search term from the query string. Any text is accepted: one holding characters no name
    can hold (NUL) simply matches nothing, as any other unknown name does."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(required=False, allow_blank=True, **kwargs)
        self.validators = [v for v in self.validators if not isinstance(v, ProhibitNullCharactersValidator)]


class BackendFilterSerializer(serializers.Serializer):
    """The query parameters of the backend list; malformed values are a 400, unknown names match nothing."""

    upgrade_available = serializers.BooleanField(required=False)
    installed = serializers.BooleanField(
        required=False, help_text="Installed (current) on any node, or on `node` when given."
    )
    pinned = serializers.BooleanField(required=False)
    node = FilterText(max_length=200)
    gallery = FilterText(max_length=100)
    search = FilterText(max_length=NAME_MAX_LENGTH, help_text="Part of the name.")


class JobFilterSerializer(serializers.Serializer):
    """The query parameters of the job list."""

    status = serializers.ChoiceField(
        choices=[*JobStatus.values, "active", "finished"],
        required=False,
        help_text="A status, or `active` (queued or running) or `finished` (any end state).",
    )
    kind = serializers.ChoiceField(choices=JobKind.values, required=False)
    backend = FilterText(max_length=NAME_MAX_LENGTH + 101, help_text="Name or gallery@name.")


@extend_schema_field(
    {
        "type": "string",
        "nullable": True,
        "pattern": r"^([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?$",
        "example": "22:00",
    }
)
class ServerTime(serializers.TimeField):
    """A time of day on the server's clock, "HH:MM[:SS]".

    DRF would silently drop an offset ("Z", "+02:00"); it is refused instead, so nobody mistakes the
    window for UTC.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(required=False, allow_null=True, **kwargs)

    def to_internal_value(self, value: Any) -> Any:
        if isinstance(value, str) and re.search(r"[zZ]|[+-]\d{2}:?\d{2}$", value):
            self.fail("offset")
        return super().to_internal_value(value)

    default_error_messages = {
        **serializers.TimeField.default_error_messages,
        "offset": "Give the time without a UTC offset: the window is on the server's clock (TIME_ZONE).",
    }


class PortalSettingsSerializer(JsonBodySerializer, serializers.ModelSerializer):
    """The operator's runtime settings, checked with the model's own validators before anything is saved."""

    maintenance_window_start = ServerTime(
        help_text="Automatic upgrades only start inside the window (server time). Set both ends or neither."
    )
    maintenance_window_end = ServerTime(help_text="End of the maintenance window (server time).")
    set_by_environment = serializers.SerializerMethodField(
        help_text="The fields the environment decides while it is set (e.g. LOCALAI_AUTO_UPGRADE_BACKENDS), "
        "each with why; they show the environment's value, and a change to them is a 400."
    )

    class Meta:
        model = PortalSettings
        fields = [
            "auto_upgrade_backends",
            "check_interval_minutes",
            "maintenance_window_start",
            "maintenance_window_end",
            "versions_kept",
            "health_check_command",
            "health_check_timeout",
            "last_check_at",
            "updated_at",
            "set_by_environment",
        ]
        read_only_fields = ["last_check_at", "updated_at", "set_by_environment"]

    @extend_schema_field({"type": "object", "additionalProperties": {"type": "string"}})
    def get_set_by_environment(self, row: PortalSettings) -> dict[str, str]:
        return {name: str(lock) for name, lock in row.environment_locks().items()}

    def to_representation(self, instance: PortalSettings) -> dict[str, Any]:
        data = super().to_representation(instance)
        for name in instance.environment_locks():  # what the portal runs with
            data[name] = instance.effective(name)
        return data

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if self.instance is not None:
            try:
                attrs = self.instance.without_locked(attrs)
            except DjangoValidationError as exc:
                raise serializers.ValidationError(exc.message_dict) from exc
        start = attrs.get(
            "maintenance_window_start", getattr(self.instance, "maintenance_window_start", None)
        )
        end = attrs.get("maintenance_window_end", getattr(self.instance, "maintenance_window_end", None))
        if (start is None) != (end is None):
            raise serializers.ValidationError(
                {"maintenance_window_start": "set both ends of the maintenance window, or neither"}
            )
        if start is not None and start == end:
            raise serializers.ValidationError(
                {"maintenance_window_end": "the maintenance window must not start and end at the same time"}
            )
        # The model's validators (and its clean(), if it grows one) decide, as in the admin.
        candidate = PortalSettings(**{**self._current_values(), **attrs})
        try:
            candidate.full_clean(exclude=["id"])
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.message_dict) from exc
        return attrs

    def _current_values(self) -> dict[str, Any]:
        if self.instance is None:
            return {}
        names = [f for f in self.Meta.fields if f not in self.Meta.read_only_fields]
        return {name: getattr(self.instance, name) for name in names}


@extend_schema_field(
    {
        "type": "object",
        "nullable": True,
        "properties": {
            "issuer": {"type": "string"},
            "issuer_regex": {"type": "string"},
            "identity": {"type": "string"},
            "identity_regex": {"type": "string"},
            "not_before": {"type": "string", "format": "date-time"},
        },
        "additionalProperties": False,
        "example": {
            "issuer": "https://token.actions.githubusercontent.com",
            "identity_regex": r"^https://github\.com/mudler/LocalAI/\.github/workflows/.+@refs/heads/master$",
        },
    }
)
class VerificationField(serializers.Field):
    """LocalAI's gallery `verification` block, read and written whole (null: none)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(source="*", required=False, allow_null=True, **kwargs)

    def validate_empty_values(self, data: Any) -> tuple[bool, Any]:
        if data is None:  # null clears the block
            return True, self.to_internal_value({})
        return super().validate_empty_values(data)

    def to_representation(self, gallery: Gallery) -> dict[str, str] | None:
        block = gallery.verification
        return block.to_json() if block is not None else None

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        try:
            block = signatures.Verification.from_json(data) if data else signatures.Verification()
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from exc
        return {field: getattr(block, key) for key, field in Gallery.VERIFICATION_FIELDS.items()}


class GallerySerializer(JsonBodySerializer, serializers.ModelSerializer):
    """A gallery index the portal follows: name, url, enabled and its signature policy are written.

    `url` is answered without credentials; `has_credentials` says whether some are kept apart.
    A URL set here may not reach this machine: file:// only under PORTAL_GALLERY_FILE_ROOTS, no
    loopback or link-local host (docs/galleries.md). `verification` is LocalAI's block; given
    without `signature_mode` on a gallery that does not check signatures, it enforces (as in
    LocalAI); null clears it (docs/signatures.md).
    """

    has_credentials = serializers.BooleanField(
        read_only=True, help_text="A user, password or query values were given with the URL; never shown."
    )
    verification = VerificationField(
        help_text="LocalAI's verification block: issuer or issuer_regex, and identity or identity_regex; "
        "not_before (RFC 3339) refuses older signatures."
    )

    class Meta:
        model = Gallery
        fields = [
            "name",
            "url",
            "has_credentials",
            "enabled",
            "signature_mode",
            "verification",
            "entry_count",
            "last_synced_at",
            "last_attempt_at",
            "last_error",
        ]
        read_only_fields = ["entry_count", "last_synced_at", "last_attempt_at", "last_error"]

    def validate_url(self, value: str) -> str:
        if self.instance is not None and value.strip() == self.instance.url:
            return self.instance.url  # unchanged: however it was set, it stays as it was
        try:
            gallery_index.check_web_url(value, settings.PORTAL_GALLERY_FILE_ROOTS)
        except gallery_index.GalleryError as exc:
            raise serializers.ValidationError(str(exc)) from exc
        return value.strip()

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """The model's signature rules decide, on the gallery as it would be saved."""
        names = ["signature_mode", *Gallery.VERIFICATION_FIELDS.values()]
        candidate = Gallery(**{n: getattr(self.instance, n) for n in names} if self.instance else {})
        block_given = "verification_issuer" in attrs
        if block_given:
            for field_name in Gallery.VERIFICATION_FIELDS.values():
                setattr(candidate, field_name, attrs[field_name])
        if "signature_mode" in attrs:
            candidate.signature_mode = attrs["signature_mode"]
        elif block_given:
            candidate.set_verification(candidate.verification)  # a block alone enforces, as in LocalAI
            attrs["signature_mode"] = candidate.signature_mode
        problems = candidate.signature_problems()
        if problems:
            field_name = "signature_mode" if "signature_mode" in problems else "verification"
            raise serializers.ValidationError({field_name: list(problems.values())})
        return attrs

    def create(self, validated_data: dict[str, Any]) -> Gallery:
        return super().create({**validated_data, "set_through_web": True})

    def update(self, instance: Gallery, validated_data: dict[str, Any]) -> Gallery:
        if validated_data.get("url", instance.url) != instance.url:
            validated_data["set_through_web"] = True
        return super().update(instance, validated_data)


class SyncRequestSerializer(JsonBodySerializer):
    force = serializers.BooleanField(
        default=False, help_text="Fetch and compare even if the ETag is unchanged."
    )


class SyncResultSerializer(serializers.Serializer):
    """What one gallery sync did."""

    gallery = serializers.CharField()
    ok = serializers.BooleanField()
    summary = serializers.CharField()
    error = serializers.CharField()
    not_modified = serializers.BooleanField()
    total = serializers.IntegerField()
    created = serializers.IntegerField()
    updated = serializers.IntegerField()
    gone = serializers.IntegerField()
    duplicates = serializers.ListField(child=serializers.CharField())
