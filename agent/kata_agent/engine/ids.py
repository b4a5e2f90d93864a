"""Container and exec ids: what runc accepts, and nothing that could name a path.

Its own small module so the state store can check ids without loading the spec parser.
"""

from __future__ import annotations

import re

from kata_agent.engine.errors import SpecError

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
MAX_ID = 128


def validate_id(container_id: object, field_name: str = "id") -> str:
    if not isinstance(container_id, str) or not container_id:
        raise SpecError("must be a non-empty string", field=field_name)
    if len(container_id) > MAX_ID:
        raise SpecError(f"longer than {MAX_ID} characters", field=field_name)
    if not ID_RE.fullmatch(container_id):
        raise SpecError(f"invalid id {container_id!r}: must match {ID_RE.pattern}",
                        field=field_name)
    return container_id
