"""Organisations: who owns an object, and whether a caller acts for that owner. Pure."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # tokens.py imports this module to check org claims
    from sandbox.auth.tokens import Principal

ORG_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
_ORG = re.compile(ORG_PATTERN)

# The owner of a row whose creating org could not be recovered (migration 0008). It cannot match
# ORG_PATTERN, and tokens whose org does not match it are refused, so no caller ever owns it: such
# an object fails closed until an operator assigns it.
UNKNOWN_OWNER = "?unknown"


def is_org_name(value: str) -> bool:
    return bool(_ORG.fullmatch(value))


def owns(principal: Principal, owner_org: str | None) -> bool:
    """Whether `principal` is a steward of `owner_org`, the org that owns an object."""
    return principal.role == "steward" and owner_org is not None and owner_org == principal.org
