"""The gateway's state in SQL: channels, tokens, the request log, and atomic accounting.

SQLite (WAL) by default; PostgreSQL when several gateway processes share one state. Every method
is synchronous and short: the app runs them on a small thread pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Callable, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from llama_lab.gateway.schemas import (
    Channel,
    ChannelIn,
    ChannelOut,
    ChannelPatch,
    LogOut,
    TokenCreated,
    TokenIn,
    TokenOut,
    TokenPatch,
)

KEY_PREFIX = "sk-"
_T = TypeVar("_T")


class Base(DeclarativeBase):
    pass


class ChannelRow(Base):
    __tablename__ = "channels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    base_url: Mapped[str] = mapped_column(String(1000))
    api_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    models: Mapped[list] = mapped_column(JSON, default=list)
    model_mapping: Mapped[dict] = mapped_column(JSON, default=dict)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    weight: Mapped[int] = mapped_column(Integer, default=1)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    auto_disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_test_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_test_latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)

    @property
    def has_api_key(self) -> bool:
        return bool(self.api_key)


class TokenRow(Base):
    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    key_hint: Mapped[str] = mapped_column(String(32))
    models: Mapped[list] = mapped_column(JSON, default=list)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    quota: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    used: Mapped[int] = mapped_column(BigInteger, default=0)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    subnets: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class LogRow(Base):
    __tablename__ = "request_logs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[float] = mapped_column(Float, index=True)
    token_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    token_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    channel_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    channel_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    total_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    first_byte_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[int] = mapped_column(Integer)
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


def hash_key(key: str) -> str:
    """Keys are 192 random bits, so a plain SHA-256 is enough (no need for a slow KDF)."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_hex(24)


def make_engine(url: str) -> Engine:
    """An engine tuned per backend: SQLite gets WAL, a busy timeout and a thread-safe pool."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    database = parsed.database
    if not database or database == ":memory:":
        engine = create_engine(url, connect_args={"check_same_thread": False}, poolclass=StaticPool)
    else:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    return engine


_NULLABLE = {"api_key", "expires_at", "quota"}


def _apply(row: Any, patch: dict[str, Any]) -> None:
    for field, value in patch.items():
        if value is None and field not in _NULLABLE:
            continue
        setattr(row, field, value)


class Store:
    """All reads and writes of the gateway's tables; one instance per process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        Base.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gateway-db")

    async def run(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run a store method on the DB threads, so a busy SQLite never stalls the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.engine.dispose()

    # -- channels -------------------------------------------------------------------------
    def create_channel(self, data: ChannelIn) -> ChannelOut:
        with self._session.begin() as s:
            row = ChannelRow(**data.model_dump(), created_at=time.time())
            s.add(row)
            s.flush()
            return ChannelOut.model_validate(row)

    def channels(self) -> list[Channel]:
        """Every channel with its upstream key, for the router."""
        with self._session() as s:
            rows = s.scalars(select(ChannelRow).order_by(ChannelRow.id)).all()
            return [Channel.model_validate(r) for r in rows]

    def list_channels(self) -> list[ChannelOut]:
        return [ChannelOut.model_validate(c.model_dump()) for c in self.channels()]

    def get_channel(self, channel_id: int) -> Channel | None:
        with self._session() as s:
            row = s.get(ChannelRow, channel_id)
            return Channel.model_validate(row) if row else None

    def update_channel(self, channel_id: int, patch: ChannelPatch) -> ChannelOut | None:
        with self._session.begin() as s:
            row = s.get(ChannelRow, channel_id)
            if row is None:
                return None
            changes = patch.model_dump(exclude_unset=True)
            _apply(row, changes)
            if changes.get("enabled") is True:
                row.auto_disabled, row.disabled_reason = False, None
            s.flush()
            return ChannelOut.model_validate(row)

    def delete_channel(self, channel_id: int) -> bool:
        with self._session.begin() as s:
            return s.execute(delete(ChannelRow).where(ChannelRow.id == channel_id)).rowcount > 0

    def set_auto_disabled(self, channel_id: int, disabled: bool, reason: str | None = None) -> None:
        with self._session.begin() as s:
            s.execute(
                update(ChannelRow)
                .where(ChannelRow.id == channel_id)
                .values(auto_disabled=disabled, disabled_reason=reason if disabled else None)
            )

    def record_test(self, channel_id: int, latency_ms: float | None) -> None:
        with self._session.begin() as s:
            s.execute(
                update(ChannelRow)
                .where(ChannelRow.id == channel_id)
                .values(last_test_at=time.time(), last_test_latency_ms=latency_ms)
            )

    # -- tokens ---------------------------------------------------------------------------
    def create_token(self, data: TokenIn) -> TokenCreated:
        key = new_key()
        with self._session.begin() as s:
            row = TokenRow(
                **data.model_dump(),
                key_hash=hash_key(key),
                key_hint=f"{key[:7]}...{key[-4:]}",
                used=0,
                created_at=time.time(),
            )
            s.add(row)
            s.flush()
            return TokenCreated(**TokenOut.model_validate(row).model_dump(), key=key)

    def token_by_key(self, key: str) -> TokenOut | None:
        with self._session() as s:
            row = s.scalar(select(TokenRow).where(TokenRow.key_hash == hash_key(key)))
            return TokenOut.model_validate(row) if row else None

    def get_token(self, token_id: int) -> TokenOut | None:
        with self._session() as s:
            row = s.get(TokenRow, token_id)
            return TokenOut.model_validate(row) if row else None

    def list_tokens(self) -> list[TokenOut]:
        with self._session() as s:
            return [TokenOut.model_validate(r) for r in s.scalars(select(TokenRow).order_by(TokenRow.id))]

    def update_token(self, token_id: int, patch: TokenPatch) -> TokenOut | None:
        with self._session.begin() as s:
            row = s.get(TokenRow, token_id)
            if row is None:
                return None
            _apply(row, patch.model_dump(exclude_unset=True))
            s.flush()
            return TokenOut.model_validate(row)

    def delete_token(self, token_id: int) -> bool:
        with self._session.begin() as s:
            return s.execute(delete(TokenRow).where(TokenRow.id == token_id)).rowcount > 0

    # -- accounting -----------------------------------------------------------------------
    def settle(self, log: dict[str, Any]) -> None:
        """Charge a request's tokens and write its log row in one transaction.

        The charge is a relative ``used = used + n`` so concurrent requests (and several gateway
        processes on one PostgreSQL) never lose an update, and the charged total always equals
        the sum of the logged usages.
        """
        total = int(log.get("prompt_tokens", 0)) + int(log.get("completion_tokens", 0))
        with self._session.begin() as s:
            if log.get("token_id") is not None and total:
                s.execute(
                    update(TokenRow).where(TokenRow.id == log["token_id"]).values(used=TokenRow.used + total)
                )
            s.add(LogRow(total_tokens=total, **log))

    def logs(
        self,
        *,
        token_id: int | None = None,
        channel_id: int | None = None,
        model: str | None = None,
        status: int | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[LogOut]:
        """Newest first, filtered."""
        query = select(LogRow)
        for column, value in (
            (LogRow.token_id, token_id),
            (LogRow.channel_id, channel_id),
            (LogRow.model, model),
            (LogRow.status, status),
        ):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(LogRow.time >= since)
        if until is not None:
            query = query.where(LogRow.time < until)
        query = query.order_by(LogRow.id.desc()).limit(limit).offset(offset)
        with self._session() as s:
            return [LogOut.model_validate(r) for r in s.scalars(query)]

    def logged_tokens(self, token_id: int) -> int:
        with self._session() as s:
            return int(
                s.scalar(select(func.coalesce(func.sum(LogRow.total_tokens), 0)).where(LogRow.token_id == token_id))
            )
