"""The notification URLs under /api/notification-targets/ (docs/notifications.md).

The URLs hold secrets, so reading them needs the settings permission too (not just a signed-in user),
and no answer ever carries a URL whole: `url` is written, `masked_url` is read.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import exceptions, mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response

from backends_app import notify, permissions
from backends_app.api.serializers import EmptyBodySerializer, ErrorSerializer, JsonBodySerializer
from backends_app.models import NotificationTarget


class SettingsOnly(BasePermission):
    """Reading or changing the notification URLs needs the settings permission: they hold secrets."""

    message = (
        "You do not have permission to do this: it needs "
        f"{permissions.needs(permissions.CHANGE_SETTINGS)} (notification URLs hold secrets)."
    )

    def has_permission(self, request: Request, view: Any) -> bool:
        return permissions.can(request.user, permissions.CHANGE_SETTINGS)


class NotificationTargetSerializer(JsonBodySerializer, serializers.ModelSerializer):
    """One Apprise URL notifications go to. `url` is written only; answers show `masked_url`."""

    url = serializers.CharField(
        write_only=True,
        max_length=notify.MAX_URL_LENGTH,
        help_text="An Apprise URL (json://, ntfys://, slack://, mailtos://, ...). Never shown again: "
        "answers carry `masked_url`.",
    )
    masked_url = serializers.CharField(read_only=True, help_text="scheme://host/****: no secret in it.")

    class Meta:
        model = NotificationTarget
        fields = ["id", "label", "url", "masked_url", "enabled", "created_at", "updated_at"]
        read_only_fields = ["id", "created_at", "updated_at"]

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        # The model's clean() decides (Apprise can use the URL, not listed twice), as in the admin.
        candidate = NotificationTarget(
            pk=self.instance.pk if self.instance else None,
            label=attrs.get("label", getattr(self.instance, "label", "")),
            url=attrs.get("url", getattr(self.instance, "url", "")),
            enabled=attrs.get("enabled", getattr(self.instance, "enabled", True)),
        )
        try:
            candidate.full_clean(exclude=["id", "created_at", "updated_at"])
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.message_dict) from exc
        if "url" in attrs:
            attrs["url"] = candidate.url
        return attrs


class TestResultSerializer(serializers.Serializer):
    """What sending the test message to one URL did."""

    id = serializers.IntegerField()
    label = serializers.CharField()  # type: ignore[assignment]  # a field named like Field.label
    masked_url = serializers.CharField()
    ok = serializers.BooleanField()
    result = serializers.ChoiceField(choices=[r.value for r in notify.Result])
    detail = serializers.CharField(help_text="Why it failed (no secret in it); empty when delivered.")


class TestResultsSerializer(serializers.Serializer):
    results = TestResultSerializer(many=True)


TARGET_ID = OpenApiParameter("id", OpenApiTypes.INT, OpenApiParameter.PATH, description="The URL's id.")
NOT_FOUND = OpenApiResponse(ErrorSerializer, description="No such notification URL.")
URL_EXAMPLE = OpenApiExample(
    "A JSON webhook", value={"label": "ops", "url": "json://127.0.0.1:9/hooks/portal", "enabled": True}
)


def test_response(targets: list[NotificationTarget]) -> Response:
    results = [
        {
            "id": target.pk,
            "label": target.label,
            "masked_url": target.masked_url,
            "ok": outcome.ok,
            "result": outcome.result.value,
            "detail": outcome.detail,
        }
        for target, outcome in NotificationTarget.send_test(targets)
    ]
    return Response({"results": results})


@extend_schema_view(
    list=extend_schema(summary="Notification URLs (masked)"),
    retrieve=extend_schema(
        summary="One notification URL (masked)",
        parameters=[TARGET_ID],
        responses={200: NotificationTargetSerializer, 404: NOT_FOUND},
    ),
    create=extend_schema(
        summary="Add a notification URL",
        description="Checked with Apprise (scheme known, parts present), not contacted: use `test`.",
        examples=[URL_EXAMPLE],
        responses={201: NotificationTargetSerializer, 400: OpenApiTypes.OBJECT},
    ),
    partial_update=extend_schema(
        summary="Change a notification URL",
        description="Only the fields sent change; `url` replaces the stored URL.",
        parameters=[TARGET_ID],
        responses={200: NotificationTargetSerializer, 400: OpenApiTypes.OBJECT, 404: NOT_FOUND},
    ),
    destroy=extend_schema(
        summary="Remove a notification URL", parameters=[TARGET_ID], responses={204: None, 404: NOT_FOUND}
    ),
)
@extend_schema(tags=["notifications"])
class NotificationTargetViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Where notifications go: Apprise URLs. Readable and writable with the settings permission only."""

    serializer_class = NotificationTargetSerializer
    permission_classes = [SettingsOnly]
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]
    lookup_value_regex = r"[^/]+"

    def get_queryset(self) -> QuerySet[NotificationTarget]:
        return NotificationTarget.objects.order_by("pk")

    def get_object(self) -> NotificationTarget:
        raw = self.kwargs["pk"]
        found = None
        if raw.isascii() and raw.isdigit() and len(raw) <= 18:
            found = self.get_queryset().filter(pk=int(raw)).first()
        if found is None:
            raise exceptions.NotFound(f"no notification URL with id {raw!r}")
        self.check_object_permissions(self.request, found)
        return found

    @extend_schema(
        summary="Send a test message to every enabled URL",
        operation_id="api_notification_targets_test_all",
        description="Sent now (at most PORTAL_NOTIFY_TEST_TIMEOUT seconds); the answer says, per URL, "
        "whether it was delivered or why not. 409 when no URL is enabled.",
        request=EmptyBodySerializer,
        responses={
            200: TestResultsSerializer,
            409: OpenApiResponse(ErrorSerializer, description="No URL is enabled."),
        },
    )
    @action(detail=False, methods=["post"], url_path="test")
    def test_all(self, request: Request) -> Response:
        EmptyBodySerializer(data=request.data or {}).is_valid(raise_exception=True)
        targets = list(NotificationTarget.objects.filter(enabled=True).order_by("pk"))
        if not targets:
            return Response(
                {"detail": "No notification URL is enabled: add one first."},
                status=status.HTTP_409_CONFLICT,
            )
        return test_response(targets)

    @extend_schema(
        summary="Send a test message to this URL",
        operation_id="api_notification_targets_test_one",
        description="Sent now, enabled or not; the answer says whether it was delivered or why not.",
        parameters=[TARGET_ID],
        request=EmptyBodySerializer,
        responses={200: TestResultsSerializer, 404: NOT_FOUND},
    )
    @action(detail=True, methods=["post"], url_path="test")
    def test_one(self, request: Request, pk: str) -> Response:
        EmptyBodySerializer(data=request.data or {}).is_valid(raise_exception=True)
        return test_response([self.get_object()])
