"""MariaDB connections and PINK's schema (users, tokens, task archive, logs, events).

Every connection uses TLS verified against the configured CA when one is
set (the design requires TLS to the database). Callers: `pink.users`,
`pink.archive`, the web app (per request) and `pink admin`.
"""

from __future__ import annotations

import time

import pymysql

from pink.errors import Unavailable

# Version 1: the schema as first released. Never edit a released version:
# add the next one to MIGRATIONS, which upgrades a database in place.
SCHEMA_V1 = [
    """CREATE TABLE IF NOT EXISTS users (
        id INT AUTO_INCREMENT PRIMARY KEY,
        name VARCHAR(64) NOT NULL UNIQUE,
        password_hash VARCHAR(255) NOT NULL,
        is_admin BOOLEAN NOT NULL DEFAULT FALSE,
        created_at DOUBLE NOT NULL
    ) ENGINE=InnoDB""",
    """CREATE TABLE IF NOT EXISTS tokens (
        id INT AUTO_INCREMENT PRIMARY KEY,
        user_id INT NOT NULL,
        token_hash CHAR(64) NOT NULL UNIQUE,
        created_at DOUBLE NOT NULL,
        FOREIGN KEY (user_id) REFERENCES users(id) ON DELETE CASCADE
    ) ENGINE=InnoDB""",
    """CREATE TABLE IF NOT EXISTS tasks (
        id VARCHAR(32) PRIMARY KEY,
        user_name VARCHAR(64) NOT NULL,
        name VARCHAR(255) NOT NULL,
        state VARCHAR(16) NOT NULL,
        attempt INT NOT NULL,
        node VARCHAR(128),
        exit_code INT,
        error TEXT,
        image_sha256 CHAR(64) NOT NULL,
        image_size BIGINT NOT NULL,
        output_size BIGINT,
        gpus TEXT,
        submitted_at DOUBLE, started_at DOUBLE, ended_at DOUBLE, finished_at DOUBLE,
        deleted_at DOUBLE,
        record LONGTEXT NOT NULL,
        INDEX (user_name)
    ) ENGINE=InnoDB""",
    """CREATE TABLE IF NOT EXISTS task_logs (
        task_id VARCHAR(32) PRIMARY KEY,
        logs LONGBLOB NOT NULL
    ) ENGINE=InnoDB""",
    """CREATE TABLE IF NOT EXISTS task_events (
        id BIGINT AUTO_INCREMENT PRIMARY KEY,
        task_id VARCHAR(32) NOT NULL,
        at DOUBLE NOT NULL,
        state VARCHAR(16) NOT NULL,
        detail TEXT,
        INDEX (task_id)
    ) ENGINE=InnoDB""",
]

# Version 2: history paged newest first (by submission time, then id), usage
# (GPU count per row), retention (when an output expires and expired).
SCHEMA_V2 = [
    """ALTER TABLE tasks
        ADD COLUMN IF NOT EXISTS gpu_count INT NOT NULL DEFAULT 0,
        ADD COLUMN IF NOT EXISTS output_host VARCHAR(128),
        ADD COLUMN IF NOT EXISTS output_path VARCHAR(1024),
        ADD COLUMN IF NOT EXISTS expires_at DOUBLE,
        ADD COLUMN IF NOT EXISTS expired_at DOUBLE,
        ADD COLUMN IF NOT EXISTS logs_truncated BIGINT NOT NULL DEFAULT 0,
        ADD INDEX IF NOT EXISTS by_time (submitted_at, id),
        ADD INDEX IF NOT EXISTS by_user_time (user_name, submitted_at, id),
        ADD INDEX IF NOT EXISTS by_state_time (state, submitted_at, id),
        ADD INDEX IF NOT EXISTS by_finish (finished_at),
        ADD INDEX IF NOT EXISTS by_expiry (expired_at, expires_at),
        ADD INDEX IF NOT EXISTS by_output_host (output_host, expired_at)""",
    """UPDATE tasks SET gpu_count = COALESCE(JSON_LENGTH(gpus), 0),
        output_host = JSON_VALUE(record, '$.output.host'),
        output_path = JSON_VALUE(record, '$.output.path'),
        expired_at = deleted_at""",
]

# Version 3: accounts people manage. Tokens have a name, a scope (`user`: the
# API as that user; `metrics`: only /metrics), an expiry and a last use;
# users can be disabled; a new password ends the sessions opened before it.
# Revoked and expired tokens are deleted, not kept.
SCHEMA_V3 = [
    """ALTER TABLE users
        ADD COLUMN IF NOT EXISTS disabled_at DOUBLE,
        ADD COLUMN IF NOT EXISTS last_used_at DOUBLE,
        ADD COLUMN IF NOT EXISTS password_changed_at DOUBLE""",
    """ALTER TABLE tokens
        ADD COLUMN IF NOT EXISTS name VARCHAR(128) NOT NULL DEFAULT 'token',
        ADD COLUMN IF NOT EXISTS scope VARCHAR(16) NOT NULL DEFAULT 'user',
        ADD COLUMN IF NOT EXISTS last_used_at DOUBLE,
        ADD COLUMN IF NOT EXISTS expires_at DOUBLE,
        ADD INDEX IF NOT EXISTS by_expiry (expires_at)""",
    # Tokens made before expiry existed would otherwise live for ever: 90 days from the upgrade.
    "UPDATE tokens SET expires_at = UNIX_TIMESTAMP() + 90 * 86400 WHERE expires_at IS NULL",
]

# Version 4: big logs and single copies. A log is stored as pieces of a bounded
# size (`seq` orders them; an older log is its one piece 0), so no statement
# outgrows the server's max_allowed_packet whatever the log cap. `output_peer`
# names an output's second holder: the sweep finds outputs with none by index.
# `by_user_outputs` sums each user's stored outputs from the index alone (the
# per-user output cap, on by default).
SCHEMA_V4 = [
    """ALTER TABLE task_logs
        ADD COLUMN IF NOT EXISTS seq INT NOT NULL DEFAULT 0,
        DROP PRIMARY KEY,
        ADD PRIMARY KEY (task_id, seq)""",
    """ALTER TABLE tasks
        ADD COLUMN IF NOT EXISTS output_peer VARCHAR(128),
        ADD INDEX IF NOT EXISTS by_single_copy (output_host, output_peer, expired_at),
        ADD INDEX IF NOT EXISTS by_user_outputs (expired_at, user_name, output_size)""",
    """UPDATE tasks SET output_peer = JSON_VALUE(record, '$.output.copies[1]')
        WHERE output_path IS NOT NULL""",
]

# Version 5: notifications (pink.notifications). A user's webhook, e-mail
# and signing secret; one row per delivery (task, event, attempt, channel:
# unique, so a job run twice delivers once) with its state; one row per try
# of it, with the receiver's HTTP status or the error.
SCHEMA_V5 = [
    """CREATE TABLE IF NOT EXISTS notification_settings (
        user_id INT PRIMARY KEY,
        webhook_url TEXT,
        email VARCHAR(254),
        on_running BOOLEAN NOT NULL DEFAULT FALSE,
        secret VARCHAR(128) NOT NULL,
        updated_at DOUBLE NOT NULL,
        FOREIGN KEY (user_id) REFERENCES users(id) ON DELETE CASCADE
    ) ENGINE=InnoDB""",
    """CREATE TABLE IF NOT EXISTS notifications (
        id BIGINT AUTO_INCREMENT PRIMARY KEY,
        delivery CHAR(32) NOT NULL,
        task_id VARCHAR(32) NOT NULL,
        user_name VARCHAR(64) NOT NULL,
        event VARCHAR(16) NOT NULL,
        task_attempt INT NOT NULL,
        channel VARCHAR(16) NOT NULL,
        target TEXT NOT NULL,
        payload MEDIUMTEXT NOT NULL,
        state VARCHAR(16) NOT NULL,
        attempts INT NOT NULL DEFAULT 0,
        last_error TEXT,
        created_at DOUBLE NOT NULL,
        updated_at DOUBLE NOT NULL,
        UNIQUE KEY one_delivery (task_id, event, task_attempt, channel),
        INDEX by_created (created_at),
        INDEX by_state_updated (state, updated_at),
        INDEX by_state_created (state, created_at)
    ) ENGINE=InnoDB""",
    """CREATE TABLE IF NOT EXISTS notification_attempts (
        notification_id BIGINT NOT NULL,
        attempt INT NOT NULL,
        at DOUBLE NOT NULL,
        status INT,
        error TEXT,
        PRIMARY KEY (notification_id, attempt),
        FOREIGN KEY (notification_id) REFERENCES notifications(id) ON DELETE CASCADE
    ) ENGINE=InnoDB""",
]

# Version 6: sweeps (pink.sweeps). A task's sweep id, computed by MariaDB from
# the archived record (no writer changes), indexed so a sweep's view reads
# its own rows, never the whole history. VIRTUAL, not PERSISTENT: added in
# place, where a stored column would rebuild the tasks table (the history) at
# the upgrade; MariaDB indexes a virtual column (the index alone is built).
SCHEMA_V6 = [
    """ALTER TABLE tasks
        ADD COLUMN IF NOT EXISTS sweep_id VARCHAR(32) AS (JSON_VALUE(record, '$.sweep.id')) VIRTUAL,
        ADD INDEX IF NOT EXISTS by_sweep (sweep_id)""",
]

# Version 7: GPU usage (pink.gpu_usage). A task's mean utilisation and idle
# minutes, computed by MariaDB from the archived record (NULL: not measured),
# so `pink usage` sums GPU-hours used and idle from the rows its finish-time
# index selects. VIRTUAL, not PERSISTENT: a virtual column is added in place,
# where a stored one would rebuild the whole tasks table (the history) at the
# upgrade; they are computed only for the rows `pink usage` sums.
SCHEMA_V7 = [
    """ALTER TABLE tasks
        ADD COLUMN IF NOT EXISTS gpu_mean_percent DOUBLE
            AS (JSON_VALUE(record, '$.gpu_usage.mean_percent')) VIRTUAL,
        ADD COLUMN IF NOT EXISTS gpu_idle_minutes DOUBLE
            AS (JSON_VALUE(record, '$.gpu_usage.idle_minutes')) VIRTUAL""",
]

MIGRATIONS = [SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5,
              SCHEMA_V6, SCHEMA_V7]  # MIGRATIONS[n - 1] brings a database to version n
VERSION = len(MIGRATIONS)


def connect(db_config, retries: int = 0, delay: float = 1.0, connect_timeout: float = 5,
            read_timeout: float | None = None):
    """Open a connection; retry `retries` times before raising Unavailable.
    `read_timeout` bounds each reply (None: wait as long as MariaDB takes)."""
    ssl = {"ca": db_config.ca} if db_config.ca else None
    for attempt in range(retries + 1):
        try:
            return pymysql.connect(host=db_config.host, port=db_config.port, user=db_config.user,
                                   password=db_config.password, database=db_config.database,
                                   ssl=ssl, autocommit=False, connect_timeout=connect_timeout,
                                   read_timeout=read_timeout,
                                   cursorclass=pymysql.cursors.DictCursor, charset="utf8mb4")
        except pymysql.err.OperationalError as exc:
            if attempt == retries:
                raise Unavailable(f"the database at {db_config.host}:{db_config.port} "
                                  f"is unreachable: {exc.args[-1]}") from exc
            time.sleep(delay)


def schema_version(conn) -> int:
    """The database's schema version; 0 for an empty one.

    A database made before versions were recorded has the tables of
    version 1 and no `schema_version` table.
    """
    with conn.cursor() as cur:
        cur.execute("SHOW TABLES LIKE 'schema_version'")
        if cur.fetchone():
            cur.execute("SELECT version FROM schema_version")
            row = cur.fetchone()
            return row["version"] if row else 0
        cur.execute("SHOW TABLES LIKE 'tasks'")
        return 1 if cur.fetchone() else 0


def migrate(conn) -> tuple[int, int]:
    """Bring the schema up to VERSION in place; returns (from, to).

    Serialised by a named lock, so web nodes and workers starting together
    run each step once. A database newer than this code is refused: old code
    must not write rows it does not understand.
    """
    with conn.cursor() as cur:
        cur.execute("SELECT GET_LOCK('pink_schema', 60) AS got")
        if not cur.fetchone()["got"]:
            raise Unavailable("another process has been migrating the database for 60 s")
    try:
        before = schema_version(conn)
        if before > VERSION:
            raise Unavailable(f"the database schema is version {before}, newer than this PINK "
                              f"({VERSION}): upgrade PINK")
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INT NOT NULL) ENGINE=InnoDB")
            for version in range(before + 1, VERSION + 1):
                for statement in MIGRATIONS[version - 1]:
                    cur.execute(statement)
                cur.execute("DELETE FROM schema_version")
                cur.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
                conn.commit()
        return before, VERSION
    finally:
        with conn.cursor() as cur:
            cur.execute("DO RELEASE_LOCK('pink_schema')")
        conn.commit()


def init_schema(conn) -> None:
    """Create or upgrade the schema (cheap when it is current)."""
    with conn.cursor() as cur:
        cur.execute("SHOW TABLES LIKE 'schema_version'")
        current = cur.fetchone() is not None
        if current:
            cur.execute("SELECT version FROM schema_version")
            row = cur.fetchone()
            current = bool(row) and row["version"] == VERSION
    conn.commit()
    if not current:
        migrate(conn)
