-- Version 1: the tables of runs, hosts, steps, audit events and deploy lock holders.
-- Timestamps are UTC text in the fixed form 'YYYY-MM-DD HH:MM:SS.ffffff', which sorts in time order.
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY,
    environment TEXT NOT NULL,
    fraise TEXT NOT NULL,
    task TEXT NOT NULL,
    status TEXT NOT NULL,
    started_at TEXT NOT NULL,
    ended_at TEXT,
    release_id TEXT,
    git_ref TEXT,
    git_commit TEXT,
    started_by TEXT,
    controller TEXT,
    ci_job TEXT,
    exit_code INTEGER,
    error_code TEXT,
    error_message TEXT,
    rollback_reason TEXT
);

CREATE TABLE run_hosts (
    run_id TEXT NOT NULL,
    host TEXT NOT NULL,
    status TEXT NOT NULL,
    previous_release TEXT,
    new_release TEXT,
    final_release TEXT,
    started_at TEXT,
    ended_at TEXT,
    error_code TEXT,
    error_message TEXT,
    PRIMARY KEY (run_id, host)
);

CREATE TABLE run_steps (
    run_id TEXT NOT NULL,
    host TEXT NOT NULL,
    position INTEGER NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    started_at TEXT NOT NULL,
    ended_at TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    exit_status INTEGER,
    stdout_tail TEXT NOT NULL,
    stderr_tail TEXT NOT NULL,
    output_truncated INTEGER NOT NULL,
    error_code TEXT,
    PRIMARY KEY (run_id, host, position)
);

CREATE TABLE audit_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_key TEXT NOT NULL UNIQUE,
    run_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    at TEXT NOT NULL,
    environment TEXT,
    fraise TEXT,
    host TEXT,
    detail TEXT NOT NULL
);

CREATE TABLE deploy_locks (
    environment TEXT NOT NULL,
    fraise TEXT NOT NULL,
    run_id TEXT NOT NULL,
    user_name TEXT NOT NULL,
    controller TEXT NOT NULL,
    pid INTEGER,
    since TEXT NOT NULL,
    PRIMARY KEY (environment, fraise)
);

CREATE TABLE schema_version (
    version INTEGER PRIMARY KEY,
    applied_at TEXT NOT NULL
);
