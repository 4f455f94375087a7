-- Version 1: the tables of runs, hosts, steps, audit events and deploy lock holders.
-- Timestamps are DATETIME(6) holding UTC; key columns are VARCHAR so that InnoDB can index them,
-- and long text is MEDIUMTEXT (up to 16 MiB). utf8mb4_bin compares keys byte for byte.
CREATE TABLE runs (
    run_id VARCHAR(191) NOT NULL PRIMARY KEY,
    environment VARCHAR(255) NOT NULL,
    fraise VARCHAR(255) NOT NULL,
    task VARCHAR(64) NOT NULL,
    status VARCHAR(32) NOT NULL,
    started_at DATETIME(6) NOT NULL,
    ended_at DATETIME(6) NULL,
    release_id TEXT,
    git_ref TEXT,
    git_commit TEXT,
    started_by TEXT,
    controller TEXT,
    ci_job TEXT,
    exit_code INTEGER,
    error_code VARCHAR(255),
    error_message MEDIUMTEXT,
    rollback_reason TEXT
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE run_hosts (
    run_id VARCHAR(191) NOT NULL,
    host VARCHAR(255) NOT NULL,
    status VARCHAR(32) NOT NULL,
    previous_release TEXT,
    new_release TEXT,
    final_release TEXT,
    started_at DATETIME(6) NULL,
    ended_at DATETIME(6) NULL,
    error_code VARCHAR(255),
    error_message MEDIUMTEXT,
    PRIMARY KEY (run_id, host)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE run_steps (
    run_id VARCHAR(191) NOT NULL,
    host VARCHAR(255) NOT NULL,
    position INTEGER NOT NULL,
    name VARCHAR(255) NOT NULL,
    status VARCHAR(32) NOT NULL,
    started_at DATETIME(6) NOT NULL,
    ended_at DATETIME(6) NOT NULL,
    attempts INTEGER NOT NULL,
    exit_status INTEGER,
    stdout_tail MEDIUMTEXT NOT NULL,
    stderr_tail MEDIUMTEXT NOT NULL,
    output_truncated BOOLEAN NOT NULL,
    error_code VARCHAR(255),
    PRIMARY KEY (run_id, host, position)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE audit_events (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    event_key CHAR(64) NOT NULL UNIQUE,
    run_id VARCHAR(191) NOT NULL,
    kind VARCHAR(64) NOT NULL,
    at DATETIME(6) NOT NULL,
    environment VARCHAR(255),
    fraise VARCHAR(255),
    host VARCHAR(255),
    detail MEDIUMTEXT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE deploy_locks (
    environment VARCHAR(255) NOT NULL,
    fraise VARCHAR(255) NOT NULL,
    run_id VARCHAR(191) NOT NULL,
    user_name VARCHAR(255) NOT NULL,
    controller VARCHAR(255) NOT NULL,
    pid INTEGER,
    since DATETIME(6) NOT NULL,
    PRIMARY KEY (environment, fraise)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE schema_version (
    version INTEGER NOT NULL PRIMARY KEY,
    applied_at DATETIME(6) NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
