"""The FastAPI application: the composition root of the service.

``create_app(settings)`` builds one app around a :class:`~service.state.Service` (the state and
lifecycle of one server): the error handlers (service/errors.py, one mapping from typed errors
to statuses), the gate (service/gate.py: admission, body limit and timeout, metrics) and one
router per area (service/routers/). A new area is one more ``include_router`` line here.
"""

from __future__ import annotations

from fastapi import FastAPI

import dymu

from . import errors
from .gate import Gate
from .routers import admin, explorer, health, model, oip, predict, preference
from .settings import Settings
from .state import Service

DESCRIPTION = """\
Serve a controllable dynamic multi-task network: post a preference (r, c), get its
tree-structured sub-network, and predict with it. Every prediction reports what it cost.
See docs/service.md.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    svc = Service(settings)
    app = FastAPI(
        title="dymu",
        version=dymu.__version__,
        description=DESCRIPTION,
        lifespan=svc.lifespan,
    )
    app.state.service = svc
    errors.install(app)
    # the hot paths first: routes are matched in order, a regex match per route passed over
    app.include_router(predict.router)
    app.include_router(oip.router)
    app.include_router(health.router)
    app.include_router(model.router)
    app.include_router(preference.router)
    app.include_router(explorer.router)
    app.include_router(admin.router(enabled=settings.admin_token is not None))
    app.mount("/explorer/static", explorer.static_files(), name="explorer-static")
    app.add_middleware(Gate, service=svc, api=app)
    return app
