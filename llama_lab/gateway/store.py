"""The gateway's state in SQL: channels, tokens, the request log, reservations, and atomic accounting.

SQLite (WAL) by default; PostgreSQL when several gateway processes share one state. Every method
is synchronous and short: the app runs them on a small thread pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial
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
    and_,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from pydantic import BaseModel

from llama_lab.gateway.schemas import (
    Channel,
    ChannelIn,
    ChannelOut,
    PERIODS,
    LogFilter,
    LogOut,
    TokenCreated,
    TokenIn,
    TokenOut,
    nullable_fields,
    period_bounds,
)

KEY_PREFIX = "sk-"
_T = TypeVar("_T")
_M = TypeVar("_M", bound=BaseModel)


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


@dataclass(frozen=True)
class Window:
    """Where a minute's limit stands after an admission: what OpenAI's ``x-ratelimit-*`` headers report."""

    limit: int
    remaining: int
    reset: int  # seconds until the minute ends and the window starts again from 0


@dataclass(frozen=True)
class Admission:
    """What ``Store.admit`` decided: a reservation id, or the limit that refused (with its numbers)."""

    reservation: int | None
    # None, "quota", "lifetime" (lifetime_cap), "parallel" (max_parallel), "rpm" (rpm_limit or a model's rpm),
    # "tpm" (tpm_limit or a model's tpm) or "too_large" (the request alone needs more than a tpm)
    refused: str | None
    limit: int | None = None
    current: int | None = None
    retry_after: int | None = None  # seconds until the limit may let a request in
    model: str | None = None  # the model whose own limit refused (None: the token's limit)
    requested: int | None = None  # tokens the request counts against a tpm
    requests: Window | None = None  # the tightest requests-per-minute window, when one applies
    tokens: Window | None = None  # the tightest tokens-per-minute window, when one applies


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
    # Sum of this token's live reservations (kept in step with the reservations table, in the same
    # transactions), so one conditional UPDATE of this row decides whether a request fits.
    reserved: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    subnets: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    rpm_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm_limit: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    model_limits: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # {model: {"rpm": n, "tpm": n}}
    max_parallel: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Live reservations of this token (one per request in flight), kept in step like ``reserved``.
    in_flight: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # A quota per period: ``used`` goes back to 0 when a request arrives in a later period than
    # ``period_start``; ``used_total`` keeps counting, for ``lifetime_cap``.
    budget_period: Mapped[str | None] = mapped_column(String(10), nullable=True)
    period_start: Mapped[float | None] = mapped_column(Float, nullable=True)
    lifetime_cap: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    used_total: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))


# Columns added after the first release, per table: (name, DDL type) for ALTER TABLE on an older database.
_ADDED_COLUMNS = {
    "tokens": (("reserved", "BIGINT NOT NULL DEFAULT 0"), ("rpm_limit", "INTEGER"),
               ("max_parallel", "INTEGER"), ("in_flight", "INTEGER NOT NULL DEFAULT 0"),
               ("budget_period", "VARCHAR(10)"), ("period_start", "FLOAT"), ("lifetime_cap", "BIGINT"),
               ("used_total", "BIGINT NOT NULL DEFAULT 0"), ("tpm_limit", "BIGINT"), ("model_limits", "JSON")),
    "rate_windows": (("tokens", "BIGINT NOT NULL DEFAULT 0"),),
    "reservations": (("token_window", "BOOLEAN NOT NULL DEFAULT FALSE"), ("model_window", "VARCHAR(200)")),
}


class RateWindowRow(Base):
    """What a token started in one calendar minute (UTC): requests for ``rpm_limit``, tokens for
    ``tpm_limit``; old minutes are swept."""

    __tablename__ = "rate_windows"

    token_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    minute: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # unix seconds // 60
    requests: Mapped[int] = mapped_column(Integer, default=0)
    # Each admitted request's worst case, replaced by its real usage when it settles in the same minute.
    tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))


class ModelWindowRow(Base):
    """``RateWindowRow`` for one model of a token, for the limits in its ``model_limits``."""

    __tablename__ = "model_windows"

    token_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    minute: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class ChannelLoadRow(Base):
    """Requests one gateway process has in flight on a channel, published every ``load_refresh`` seconds
    for least-busy routing; rows of a process that stopped publishing are ignored once stale."""

    __tablename__ = "channel_loads"

    instance: Mapped[str] = mapped_column(String(64), primary_key=True)
    channel_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    in_flight: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[float] = mapped_column(Float)


class ReservationRow(Base):
    """A request in flight: the tokens it holds (its worst case; 0 for a token without a quota or a
    tokens-per-minute limit) and its place in the token's ``in_flight``; released when it settles, or
    when it expires (its gateway died)."""

    __tablename__ = "reservations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_id: Mapped[int] = mapped_column(Integer, index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[float] = mapped_column(Float, index=True)
    created_at: Mapped[float] = mapped_column(Float)
    # ``amount`` counts in the token's window (tpm_limit) and/or this model's window (its tpm) of the
    # minute of ``created_at``: settling in that minute replaces it there by the real usage.
    token_window: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    model_window: Mapped[str | None] = mapped_column(String(200), nullable=True)


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
        cursor.execute("PRAGMA busy_timeout=30000")
        _use_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


def _use_wal(cursor: Any, deadline_s: float = 30.0) -> None:
    """Switch a SQLite file to WAL (a setting the file keeps), retrying while another process holds it.

    Two gateways opening a new file at once both ask for the exclusive lock the switch needs; SQLite
    answers "database is locked" at once instead of waiting (its busy handler would deadlock them), so
    the busy timeout does not cover it. The loser retries and, once the winner is done, finds WAL set.
    """
    end = time.monotonic() + deadline_s
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > end:
                raise
            time.sleep(0.05)


_SCHEMA_LOCK = 0x6C6C616D  # a PostgreSQL advisory lock id: one gateway process creates the tables at a time


def create_tables(engine: Engine) -> None:
    """Create missing tables, and columns that older versions lacked (``_ADDED_COLUMNS``).

    Several gateway processes may start at once on one database: on PostgreSQL they take turns
    (an advisory lock for the transaction); on SQLite a lost race shows as "already exists", or as
    "database is locked" where a deferred transaction that read the schema cannot wait for the writer,
    and is retried.
    """
    attempts = 50
    for attempt in range(attempts):
        try:
            with engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
                Base.metadata.create_all(conn)
                for table, columns in _ADDED_COLUMNS.items():
                    have = {c["name"] for c in inspect(conn).get_columns(table)}
                    for name, ddl in columns:
                        if name not in have:
                            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}"))
            return
        except OperationalError as exc:
            lost_race = any(m in str(exc) for m in ("already exists", "duplicate column", "database is locked"))
            if not lost_race or attempt == attempts - 1:
                raise
            time.sleep(0.1)


@lru_cache(maxsize=None)
def _window_upsert(table: type[RateWindowRow] | type[ModelWindowRow], dialect: str, rpm: bool, tpm: bool) -> Any:
    """The conditional upsert of a minute's row, built once per shape with bind parameters: building the
    expression per request cost more Python time than the database spent running it."""
    t = table.__table__
    keys = [c.name for c in t.primary_key.columns if c.name != "minute"]
    room = [t.c.requests < bindparam("w_rpm")] if rpm else []
    if tpm:
        room.append(t.c.tokens + bindparam("w_add") <= bindparam("w_tpm"))
    upsert = (sqlite_insert if dialect == "sqlite" else pg_insert)(t)
    return (
        upsert.values(**{k: bindparam(f"w_{k}") for k in keys}, minute=bindparam("w_minute"), requests=1,
                      tokens=bindparam("w_add"))
        .on_conflict_do_update(index_elements=[*keys, "minute"],
                               set_={"requests": t.c.requests + 1, "tokens": t.c.tokens + bindparam("w_add")},
                               where=and_(*room))
        .returning(t.c.requests, t.c.tokens)
    )


def _count_in_window(s: Any, table: type[RateWindowRow] | type[ModelWindowRow], key: dict[str, Any], minute: int,
                     rpm: int | None, tpm: int | None, add: int) -> tuple[int, int] | None:
    """Count one request and ``add`` tokens in a minute's row if both fit: its new (requests, tokens), or None."""
    stmt = _window_upsert(table, s.get_bind().dialect.name, rpm is not None, tpm is not None)
    params = {**{f"w_{k}": v for k, v in key.items()}, "w_minute": minute, "w_add": add}
    if rpm is not None:
        params["w_rpm"] = rpm
    if tpm is not None:
        params["w_tpm"] = tpm
    return s.connection().execute(stmt, params).first()


@lru_cache(maxsize=None)
def _admit_update() -> Any:
    """The conditional UPDATE that admits a request on its token's row (``Store.admit``), built once.

    A request in a new budget period sees used as 0 and moves period_start, in the same statement, so the
    reset happens once however many gateways admit requests at the turn of the period.
    """
    t = TokenRow.__table__
    amount = bindparam("t_amount")
    current = case(*((t.c.budget_period == p, bindparam(f"t_{p}")) for p in PERIODS), else_=None)
    new_period = and_(t.c.budget_period.is_not(None), or_(t.c.period_start.is_(None), t.c.period_start < current))
    used = case((new_period, 0), else_=t.c.used)
    return (
        update(t)
        .where(
            t.c.id == bindparam("t_id"),
            or_(t.c.quota.is_(None), used + t.c.reserved + amount <= t.c.quota),
            or_(t.c.lifetime_cap.is_(None), t.c.used_total + t.c.reserved + amount <= t.c.lifetime_cap),
            or_(t.c.max_parallel.is_(None), t.c.in_flight < t.c.max_parallel),
        )
        .values(used=used, period_start=case((new_period, current), else_=t.c.period_start),
                reserved=t.c.reserved + amount, in_flight=t.c.in_flight + 1)
        .returning(t.c.rpm_limit, t.c.tpm_limit, t.c.model_limits)
    )


@lru_cache(maxsize=None)
def _reservation_insert() -> Any:
    return insert(ReservationRow.__table__).returning(ReservationRow.__table__.c.id)


@dataclass(frozen=True)
class _SettleStatements:
    release: Any
    charge: Any
    token_window: Any
    model_window: Any
    log: Any


@lru_cache(maxsize=None)
def _settle_statements() -> _SettleStatements:
    """``Store.settle``'s statements, built once with bind parameters (see ``_window_upsert``)."""
    r, t, w, m = (ReservationRow.__table__, TokenRow.__table__, RateWindowRow.__table__, ModelWindowRow.__table__)
    total, held = bindparam("c_total"), bindparam("c_held")
    return _SettleStatements(
        release=delete(r).where(r.c.id == bindparam("r_id"))
        .returning(r.c.amount, r.c.token_id, r.c.created_at, r.c.token_window, r.c.model_window),
        charge=update(t).where(t.c.id == bindparam("c_id"))
        .values(used=t.c.used + total, used_total=t.c.used_total + total, reserved=t.c.reserved - held,
                in_flight=t.c.in_flight - bindparam("c_released")),
        token_window=update(w).where(w.c.token_id == bindparam("c_token"), w.c.minute == bindparam("c_minute"))
        .values(tokens=w.c.tokens + bindparam("c_delta")),
        model_window=update(m).where(m.c.token_id == bindparam("c_token"), m.c.model == bindparam("c_model"),
                                     m.c.minute == bindparam("c_minute"))
        .values(tokens=m.c.tokens + bindparam("c_delta")),
        log=insert(LogRow.__table__),
    )


def _window_state(s: Any, table: type[RateWindowRow] | type[ModelWindowRow], key: dict[str, Any],
                  minute: int) -> tuple[int, int]:
    """A minute's (requests, tokens) so far, for the numbers of a refusal."""
    where = [getattr(table, k) == v for k, v in key.items()]
    row = s.execute(select(table.requests, table.tokens).where(*where, table.minute == minute)).first()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def _tightest(windows: list[Window]) -> Window | None:
    """The window a client should pace itself by: the least room left."""
    return min(windows, key=lambda w: (w.remaining, w.limit)) if windows else None


class Store:
    """All reads and writes of the gateway's tables; one instance per process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        create_tables(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gateway-db")

    async def run(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run a store method on the DB threads, so a busy SQLite never stalls the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.engine.dispose()

    # -- the CRUD shape every admin collection shares -----------------------------------------
    def _insert(self, row: Base, out: type[_M]) -> _M:
        with self._session.begin() as s:
            s.add(row)
            s.flush()
            return out.model_validate(row)

    def _all(self, table: type[Base], out: type[_M]) -> list[_M]:
        with self._session() as s:
            return [out.model_validate(r) for r in s.scalars(select(table).order_by(table.id))]

    def _one(self, table: type[Base], out: type[_M], item_id: int) -> _M | None:
        with self._session() as s:
            row = s.get(table, item_id)
            return out.model_validate(row) if row is not None else None

    def _patch(self, table: type[Base], out: type[_M], item_id: int, patch: BaseModel,
               nullable: frozenset[str]) -> _M | None:
        """Apply the fields the PATCH gave; ``None`` clears only the fields where null means something."""
        with self._session.begin() as s:
            row = s.get(table, item_id)
            if row is None:
                return None
            for field, value in patch.model_dump(exclude_unset=True).items():
                if value is not None or field in nullable:
                    setattr(row, field, value)
            if getattr(patch, "enabled", None) is True and isinstance(row, ChannelRow):
                row.auto_disabled, row.disabled_reason = False, None  # an admin enabling it overrides auto-disable
            s.flush()
            return out.model_validate(row)

    def _remove(self, table: type[Base], item_id: int) -> bool:
        with self._session.begin() as s:
            return s.execute(delete(table).where(table.id == item_id)).rowcount > 0

    # -- channels -------------------------------------------------------------------------
    def create_channel(self, data: ChannelIn) -> ChannelOut:
        return self._insert(ChannelRow(**data.model_dump(), created_at=time.time()), ChannelOut)

    def channels(self) -> list[Channel]:
        """Every channel with its upstream key, for the router."""
        return self._all(ChannelRow, Channel)

    def list_channels(self) -> list[ChannelOut]:
        return self._all(ChannelRow, ChannelOut)

    def get_channel(self, channel_id: int) -> Channel | None:
        """With its upstream key, for the router and ``channel test`` (the API answers a ``ChannelOut``)."""
        return self._one(ChannelRow, Channel, channel_id)

    def update_channel(self, channel_id: int, patch: BaseModel) -> ChannelOut | None:
        return self._patch(ChannelRow, ChannelOut, channel_id, patch, nullable_fields(ChannelIn))

    def delete_channel(self, channel_id: int) -> bool:
        return self._remove(ChannelRow, channel_id)

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
        row = TokenRow(**data.model_dump(), key_hash=hash_key(key), key_hint=f"{key[:7]}...{key[-4:]}", used=0,
                       reserved=0, created_at=time.time())
        return TokenCreated(**self._insert(row, TokenOut).model_dump(), key=key)

    def token_by_key(self, key: str) -> TokenOut | None:
        with self._session() as s:
            row = s.scalar(select(TokenRow).where(TokenRow.key_hash == hash_key(key)))
            return TokenOut.model_validate(row) if row else None

    def get_token(self, token_id: int) -> TokenOut | None:
        return self._one(TokenRow, TokenOut, token_id)

    def list_tokens(self) -> list[TokenOut]:
        return self._all(TokenRow, TokenOut)

    def update_token(self, token_id: int, patch: BaseModel) -> TokenOut | None:
        return self._patch(TokenRow, TokenOut, token_id, patch, nullable_fields(TokenIn))

    def delete_token(self, token_id: int) -> bool:
        return self._remove(TokenRow, token_id)

    # -- reservations ---------------------------------------------------------------------
    def reserve(self, token_id: int, amount: int, ttl: float) -> int | None:
        """Hold ``amount`` tokens of a token's quota if they fit; the reservation's id, or None."""
        return self.admit(token_id, amount, ttl).reservation

    def admit(self, token_id: int, amount: int, ttl: float, now: float | None = None,
              model: str | None = None) -> Admission:
        """Let one request in, or say which limit refuses it: quota, requests in flight, requests or tokens
        per minute (the token's, and ``model``'s own in the token's ``model_limits``).

        One transaction: a conditional UPDATE of the token's row holds ``amount`` of its quota and a
        place in flight only if both fit, then a conditional upsert of the minute's row (the token's, then
        the model's) counts the request and its ``amount`` of tokens only if the minute has room; a refusal
        rolls all of it back. The database serializes writers of a row and re-checks the condition, so any
        number of gateway processes on one database let through at most each limit.
        """
        now = time.time() if now is None else now
        with self._session() as s:
            try:
                decision = self._admit(s, token_id, amount, ttl, now, model)
                if decision.reservation is None:
                    s.rollback()
                else:
                    s.commit()
                return decision
            except BaseException:
                s.rollback()
                raise

    @staticmethod
    def _admit(s: Any, token_id: int, amount: int, ttl: float, now: float, model: str | None) -> Admission:
        fits = s.connection().execute(
            _admit_update(), {"t_id": token_id, "t_amount": amount,
                              **{f"t_{p}": period_bounds(p, now)[0] for p in PERIODS}}).first()
        if fits is None:
            row = s.execute(select(TokenRow.max_parallel, TokenRow.in_flight, TokenRow.lifetime_cap,
                                   TokenRow.used_total, TokenRow.reserved).where(TokenRow.id == token_id)).first()
            if row is not None and row[0] is not None and row[1] >= row[0]:
                return Admission(None, "parallel", limit=row[0], current=row[1], retry_after=1)
            if row is not None and row[2] is not None and row[3] + row[4] + amount > row[2]:
                return Admission(None, "lifetime", limit=row[2], current=row[3])
            return Admission(None, "quota")
        rpm, tpm, per_model = fits
        own = per_model.get(model) if model and isinstance(per_model, dict) else None
        model_rpm, model_tpm = (own.get("rpm"), own.get("tpm")) if isinstance(own, dict) else (None, None)
        windows = []  # (table, key, rpm, tpm, whose limits: None for the token's, else the model)
        if rpm is not None or tpm is not None:
            windows.append((RateWindowRow, {"token_id": token_id}, rpm, tpm, None))
        if model_rpm is not None or model_tpm is not None:
            windows.append((ModelWindowRow, {"token_id": token_id, "model": model}, model_rpm, model_tpm, model))
        minute, reset = int(now // 60), max(1, 60 - int(now % 60))
        requests: list[Window] = []
        tokens: list[Window] = []
        for table, key, w_rpm, w_tpm, whose in windows:
            add = amount if w_tpm is not None else 0
            if w_tpm is not None and add > w_tpm:  # never fits, however empty the minute
                spent = _window_state(s, table, key, minute)[1]
                return Admission(None, "too_large", limit=w_tpm, current=spent, model=whose, requested=add,
                                 tokens=Window(w_tpm, max(w_tpm - spent, 0), reset))
            counted = _count_in_window(s, table, key, minute, w_rpm, w_tpm, add)
            if counted is None:
                started, spent = _window_state(s, table, key, minute)
                if w_rpm is not None and started >= w_rpm:
                    return Admission(None, "rpm", limit=w_rpm, current=started, retry_after=reset, model=whose,
                                     requests=Window(w_rpm, 0, reset))
                return Admission(None, "tpm", limit=w_tpm, current=spent, retry_after=reset, model=whose, requested=add,
                                 tokens=Window(w_tpm, max(w_tpm - spent, 0), reset))
            if w_rpm is not None:
                requests.append(Window(w_rpm, max(w_rpm - counted[0], 0), reset))
            if w_tpm is not None:
                tokens.append(Window(w_tpm, max(w_tpm - counted[1], 0), reset))
        reservation = s.connection().execute(
            _reservation_insert(),
            {"token_id": token_id, "amount": amount, "expires_at": now + ttl, "created_at": now,
             "token_window": tpm is not None, "model_window": model if model_tpm is not None else None},
        ).scalar_one()
        return Admission(reservation, None, requests=_tightest(requests), tokens=_tightest(tokens))

    def quota_state(self, token_id: int) -> tuple[int, int, int | None]:
        """``(used, reserved, quota)`` of a token, for the message that says why a request did not fit."""
        with self._session() as s:
            row = s.execute(select(TokenRow.used, TokenRow.reserved, TokenRow.quota).where(TokenRow.id == token_id)).first()
            return (int(row[0]), int(row[1] or 0), row[2]) if row else (0, 0, None)

    # -- routing statistics shared between gateway processes -------------------------------
    def exchange_loads(self, instance: str, loads: dict[int, int], fresh_after: float) -> dict[int, int]:
        """Publish this process's in-flight count per channel; the other processes' fresh counts, summed."""
        now = time.time()
        with self._session.begin() as s:
            s.execute(delete(ChannelLoadRow).where(ChannelLoadRow.instance == instance)
                      .execution_options(synchronize_session=False))
            s.add_all(ChannelLoadRow(instance=instance, channel_id=cid, in_flight=n, updated_at=now)
                      for cid, n in loads.items() if n > 0)
            # a heartbeat row, so that an idle process's zero counts are fresh too
            s.add(ChannelLoadRow(instance=instance, channel_id=0, in_flight=0, updated_at=now))
            rows = s.execute(
                select(ChannelLoadRow.channel_id, func.sum(ChannelLoadRow.in_flight))
                .where(ChannelLoadRow.instance != instance, ChannelLoadRow.updated_at >= fresh_after)
                .group_by(ChannelLoadRow.channel_id)
            ).all()
            s.execute(delete(ChannelLoadRow).where(ChannelLoadRow.updated_at < now - 3600)
                      .execution_options(synchronize_session=False))
        return {int(cid): int(n or 0) for cid, n in rows if cid}

    def recent_first_byte(self, since: float) -> dict[int, float]:
        """Mean time to first byte (ms) of each channel's answered requests since ``since`` (latency routing)."""
        with self._session() as s:
            rows = s.execute(
                select(LogRow.channel_id, func.avg(LogRow.first_byte_ms))
                .where(LogRow.time >= since, LogRow.status == 200, LogRow.first_byte_ms.is_not(None),
                       LogRow.channel_id.is_not(None))
                .group_by(LogRow.channel_id)
            ).all()
        return {int(cid): float(ms) for cid, ms in rows}

    def quota_states(self) -> list[tuple[str, int, int, int | None]]:
        """``(name, used, reserved, quota)`` of every token, in one query (the gateway's /metrics)."""
        with self._session() as s:
            rows = s.execute(select(TokenRow.name, TokenRow.used, TokenRow.reserved, TokenRow.quota)
                             .order_by(TokenRow.id)).all()
            return [(str(r[0]), int(r[1]), int(r[2] or 0), r[3]) for r in rows]

    def renew(self, reservation_ids: list[int], ttl: float) -> None:
        """Push back the expiry of reservations whose requests are still running here."""
        if not reservation_ids:
            return
        with self._session.begin() as s:
            s.execute(
                update(ReservationRow)
                .where(ReservationRow.id.in_(reservation_ids))
                .values(expires_at=time.time() + ttl)
                .execution_options(synchronize_session=False)
            )

    def expire_reservations(self) -> int:
        """Release reservations nobody renewed (their gateway crashed); how many were released."""
        with self._session.begin() as s:
            gone = s.execute(
                delete(ReservationRow).where(ReservationRow.expires_at < time.time())
                .returning(ReservationRow.token_id, ReservationRow.amount)
                .execution_options(synchronize_session=False)
            ).all()
            held: dict[int, tuple[int, int]] = {}
            for token_id, amount in gone:
                total, count = held.get(token_id, (0, 0))
                held[token_id] = (total + int(amount), count + 1)
            for token_id in sorted(held):  # one order for every process: no deadlock between sweepers
                s.execute(
                    update(TokenRow).where(TokenRow.id == token_id)
                    .values(reserved=TokenRow.reserved - held[token_id][0],
                            in_flight=TokenRow.in_flight - held[token_id][1])
                    .execution_options(synchronize_session=False)
                )
            # minutes that can no longer refuse anything
            for window in (RateWindowRow, ModelWindowRow):
                s.execute(delete(window).where(window.minute < int(time.time() // 60) - 1)
                          .execution_options(synchronize_session=False))
            return len(gone)

    # -- accounting -----------------------------------------------------------------------
    def settle(self, log: dict[str, Any], reservation_id: int | None = None, now: float | None = None) -> None:
        """Charge a request's tokens, release its reservation and write its log row in one transaction.

        The charge is a relative ``used = used + n`` so concurrent requests (and several gateway
        processes on one PostgreSQL) never lose an update, and the charged total always equals
        the sum of the logged usages. A reservation already released by expiry is not released twice.
        A request settled in the minute it was admitted in has its worst case in that minute's
        tokens-per-minute windows replaced by its real usage (later, the minute no longer matters).
        """
        now = time.time() if now is None else now
        total = int(log.get("prompt_tokens", 0)) + int(log.get("completion_tokens", 0))
        # Client-supplied text (a model name, an error quoting it) may hold NUL, which PostgreSQL refuses.
        log = {k: v.replace("\x00", "\ufffd") if isinstance(v, str) else v for k, v in log.items()}
        unknown = log.keys() - LogRow.__table__.c.keys()
        if unknown:  # a Core insert would drop them silently
            raise TypeError(f"not request-log fields: {sorted(unknown)}")
        stmts = _settle_statements()
        with self._session.begin() as s:
            conn = s.connection()
            gone = None
            if reservation_id is not None:
                gone = conn.execute(stmts.release, {"r_id": reservation_id}).first()
            held, released = (int(gone[0]), 1) if gone is not None else (0, 0)
            if log.get("token_id") is not None and (total or released):
                conn.execute(stmts.charge, {"c_id": log["token_id"], "c_total": total, "c_held": held,
                                            "c_released": released})
            if gone is not None and total != held and int(gone[2] // 60) == int(now // 60):
                # after the token's row, as admit locks them: no deadlock between the two
                _, token_id, created, in_token_window, model = gone
                window = {"c_token": token_id, "c_minute": int(created // 60), "c_delta": total - held}
                if in_token_window:
                    conn.execute(stmts.token_window, window)
                if model is not None:
                    conn.execute(stmts.model_window, {**window, "c_model": model})
            conn.execute(stmts.log, {"total_tokens": total, **log})

    def logs(self, filters: LogFilter | None = None, **fields: Any) -> list[LogOut]:
        """Newest first, filtered (a ``LogFilter``, or its fields as keywords)."""
        f = filters or LogFilter(**fields)
        query = select(LogRow)
        for column, value in (
            (LogRow.token_id, f.token_id),
            (LogRow.channel_id, f.channel_id),
            (LogRow.model, f.model),
            (LogRow.status, f.status),
        ):
            if value is not None:
                query = query.where(column == value)
        if f.since is not None:
            query = query.where(LogRow.time >= f.since)
        if f.until is not None:
            query = query.where(LogRow.time < f.until)
        query = query.order_by(LogRow.id.desc()).limit(f.limit).offset(f.offset)
        with self._session() as s:
            return [LogOut.model_validate(r) for r in s.scalars(query)]
