"""A route class for the prediction endpoints: FastAPI's route, without its per-request work.

FastAPI's request handler solves each endpoint's dependencies and validates its parameters
for every request; for ``/predict`` and the Open Inference Protocol's infer, whose endpoints
read their request themselves (service/parsing.py, service/oip_codec.py), that machinery
cost ~0.1-0.2 ms a request, 2-4 % of a 96x128 prediction (docs/service.md, "Where the time
goes"). A :class:`LeanRoute` calls its endpoint with the request and the path's parameters
and nothing else, and checks when the route is built that the endpoint asks for nothing
more, so that no dependency or parameter is silently dropped. The route is otherwise
FastAPI's: it is matched, documented in the OpenAPI schema and answered by the app's
error handlers as any other.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class LeanRoute(APIRoute):
    """An ``APIRoute`` whose endpoint is ``async def f(request: Request, **path_params: str)``,
    called directly (no dependency solving, no parameter validation: path parameters are
    strings as matched)."""

    def get_route_handler(self) -> Handler:
        # called while FastAPI builds the route, once the endpoint's signature is read
        d, name = self.dependant, self.dependant.request_param_name
        extra = d.query_params + d.header_params + d.cookie_params + d.body_params
        if d.dependencies or extra or name is None:
            raise TypeError(
                f"{self.name}: a LeanRoute endpoint takes the request and path parameters only"
                " (no dependencies, query, header, cookie or body parameters)"
            )
        for field in d.path_params:
            if field.field_info.annotation is not str:
                raise TypeError(f"{self.name}: path parameter {field.name!r} must be str")
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            return await endpoint(**{name: request}, **request.path_params)

        return handler
