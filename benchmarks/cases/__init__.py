"""The built-in cases, registered in the issue's order (importing this package registers them).

1 proportionality, 2 peers, 3 switch, 4 backends, 5 server (and 5b overload, 5c request_path),
6 scaling, 7 paper_scale, and the profile of case 1's worst ratio last (it reads case 1's result).
"""

from . import (  # noqa: F401
    backends,
    overload,
    paper_scale,
    peers,
    profile,
    proportionality,
    request_path,
    scaling,
    server,
    switch,
)
