"""What `coap-driver user add/list/remove` calls (wired in driver_core/cli.py).

Thin, printable wrappers around users.py: the CLI opens the database, calls
one of these and prints the returned line(s); a UserError is one line for the user.
"""

from __future__ import annotations

from driver_core.storage.db import Database

from . import users
from .users import UserError

__all__ = ["UserError", "create_user", "delete_user", "list_users"]


async def create_user(db: Database, username: str, password: str) -> str:
    """Create a web panel user; returns the confirmation line, raises UserError."""
    await users.create_user(db, username, password)
    return f"user {username!r} created; log in at the web panel"


async def list_users(db: Database) -> list[str]:
    """One line per user: name and creation time."""
    return [
        f"{user.username:<32} {user.created_at.isoformat()}" for user in await users.list_users(db)
    ]


async def delete_user(db: Database, username: str) -> bool:
    """Delete ``username``; False when there is no such user."""
    return await users.delete_user(db, username)
