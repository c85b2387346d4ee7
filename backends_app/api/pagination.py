"""The API's page numbers (kept apart from the views: DRF's settings import it while loading views)."""

from __future__ import annotations

from typing import Any

from rest_framework import exceptions
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request


class PortalPagination(PageNumberPagination):
    """`?page=` and `?page_size=` (at most 1000). A malformed value is a 400, not silently replaced by the
    default; a page past the end is DRF's 404."""

    page_size_query_param = "page_size"
    max_page_size = 1000

    def get_page_size(self, request: Request) -> int:
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None:
            return self.page_size or self.max_page_size
        try:
            value = int(raw)
        except ValueError:
            raise exceptions.ValidationError({"page_size": "must be a whole number"}) from None
        if not 1 <= value <= self.max_page_size:
            raise exceptions.ValidationError({"page_size": f"must be between 1 and {self.max_page_size}"})
        return value

    def get_page_number(self, request: Request, paginator: Any) -> int:
        raw = request.query_params.get(self.page_query_param)
        if raw is None:
            return 1
        try:
            value = int(raw)
        except ValueError:
            raise exceptions.ValidationError({"page": "must be a whole number"}) from None
        if value < 1:
            raise exceptions.ValidationError({"page": "must be 1 or more"})
        return value

    def get_paginated_response_schema(self, schema: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "required": ["count", "next", "previous", "results"],
            "properties": {
                "count": {"type": "integer"},
                "next": {"type": "string", "nullable": True, "format": "uri"},
                "previous": {"type": "string", "nullable": True, "format": "uri"},
                "results": schema,
            },
        }

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == "page":
                parameter["schema"]["minimum"] = 1
            if parameter["name"] == "page_size":
                parameter["schema"].update(minimum=1, maximum=self.max_page_size)
        return parameters
