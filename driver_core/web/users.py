"""Web panel users: create (CLI or the one-time first-admin form), check a login, list, delete."""

from __future__ import annotations

import asyncio
import re

from sqlalchemy import delete, func, select, text
from sqlalchemy.exc import IntegrityError

from driver_core.storage.db import Database
from driver_core.storage.models import User
from driver_core.timefmt import utcnow

from .passwords import DUMMY_HASH, hash_password, verify_password

USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
PASSWORD_MIN = 8
PASSWORD_MAX = 1024


class UserError(Exception):
    """A user cannot be created; ``field`` is the form field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def check_username(username: str) -> str:
    if not USERNAME.fullmatch(username):
        raise UserError(
            "username",
            "1 to 64 characters: letters, digits and _ . @ -, starting with a letter or digit",
        )
    return username


def check_password(password: str) -> str:
    if len(password) < PASSWORD_MIN:
        raise UserError("password", f"at least {PASSWORD_MIN} characters")
    if len(password) > PASSWORD_MAX:
        raise UserError("password", f"at most {PASSWORD_MAX} characters")
    return password


async def _new_user(username: str, password: str) -> User:
    check_username(username)
    check_password(password)
    password_hash = await asyncio.to_thread(hash_password, password)
    return User(username=username, password_hash=password_hash, created_at=utcnow())


async def create_user(db: Database, username: str, password: str) -> User:
    """Add a user; UserError when the name is taken or an input is invalid."""
    user = await _new_user(username, password)
    taken = UserError("username", f"a user named {username!r} already exists")
    try:
        async with db.session() as session, session.begin():
            if await session.scalar(select(User.id).where(User.username == username)):
                raise taken
            session.add(user)
    except IntegrityError:
        raise taken from None
    return user


async def create_first_user(db: Database, username: str, password: str) -> User | None:
    """Add ``username`` only while there is no user at all; None when someone was first."""
    user = await _new_user(username, password)
    async with db.session() as session, session.begin():
        if db.dialect == "postgresql":  # two first visits at once: one wins
            await session.execute(text("LOCK TABLE users IN EXCLUSIVE MODE"))
        if await session.scalar(select(func.count(User.id))):
            return None
        session.add(user)
    return user


async def count_users(db: Database) -> int:
    async with db.session() as session:
        return int(await session.scalar(select(func.count(User.id))) or 0)


async def list_users(db: Database) -> list[User]:
    async with db.session() as session:
        return list(await session.scalars(select(User).order_by(User.username)))


async def get_user(db: Database, user_id: int) -> User | None:
    async with db.session() as session:
        return await session.get(User, user_id)


async def delete_user(db: Database, username: str) -> bool:
    """Remove ``username``; their open sessions end on their next request."""
    async with db.session() as session, session.begin():
        result = await session.execute(delete(User).where(User.username == username))
    return bool(result.rowcount)


async def authenticate(db: Database, username: str, password: str) -> User | None:
    """The user when the password matches; the same work is done for an unknown name."""
    async with db.session() as session:
        user = await session.scalar(select(User).where(User.username == username))
    stored = user.password_hash if user is not None else DUMMY_HASH
    ok = await asyncio.to_thread(verify_password, password, stored)
    return user if ok and user is not None else None
