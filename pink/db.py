"""MariaDB connections and PINK's schema (users, tokens, task archive, logs, events).

Every connection uses TLS verified against the configured CA when one is
set (the design requires TLS to the database). Callers: `pink.users`,
`pink.archive`, the web app (per request) and `pink admin`.
"""

from __future__ import annotations

import time

import pymysql

from pink.errors import Unavailable

SCHEMA = [
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


def connect(db_config, retries: int = 0, delay: float = 1.0):
    """Open a connection; retry `retries` times before raising Unavailable."""
    ssl = {"ca": db_config.ca} if db_config.ca else None
    for attempt in range(retries + 1):
        try:
            return pymysql.connect(host=db_config.host, port=db_config.port, user=db_config.user,
                                   password=db_config.password, database=db_config.database,
                                   ssl=ssl, autocommit=False, connect_timeout=5,
                                   cursorclass=pymysql.cursors.DictCursor, charset="utf8mb4")
        except pymysql.err.OperationalError as exc:
            if attempt == retries:
                raise Unavailable(f"the database at {db_config.host}:{db_config.port} "
                                  f"is unreachable: {exc.args[-1]}") from exc
            time.sleep(delay)


def init_schema(conn) -> None:
    with conn.cursor() as cur:
        for statement in SCHEMA:
            cur.execute(statement)
    conn.commit()
