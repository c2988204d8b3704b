//! The ledger's schema as numbered migrations on `PRAGMA user_version`.
//!
//! Migration `i` (0-based) moves a ledger from `user_version = i` to `i + 1`.
//! Migrations are append-only: a released one is never edited, a change is a
//! new entry at the end. Every column carries a comment saying what it holds.

/// All migrations, in order. `MIGRATIONS.len()` is the schema version this
/// build writes.
pub(crate) const MIGRATIONS: &[&str] = &[
    MIGRATION_1,
    MIGRATION_2,
    MIGRATION_3,
    MIGRATION_4,
    MIGRATION_5,
    MIGRATION_6,
];

/// The first schema: inventory, reservations calendar, clusters, peers, events.
const MIGRATION_1: &str = r#"
-- One row per physical host of the site (or one row named "nodes" for the
-- `nodes = N` shorthand of the config). Rewritten from the config at start.
CREATE TABLE inventory (
    name        TEXT PRIMARY KEY,          -- host name from the config
    cores       INTEGER NOT NULL,          -- CPU cores of the host
    memory_mib  INTEGER NOT NULL,          -- memory of the host, MiB
    disk_gib    INTEGER NOT NULL,          -- disk of the host, GiB
    slots       INTEGER NOT NULL CHECK (slots >= 0) -- node slots of the site's node shape it holds
) STRICT;

-- Small site-wide settings that are not rows of their own (the node shape).
CREATE TABLE settings (
    key         TEXT PRIMARY KEY,          -- setting name
    value       TEXT NOT NULL              -- setting value, JSON
) STRICT;

-- The reservation calendar. A row is a block of nodes of one shape over a
-- half-open window [start_ms, end_ms), held (until lease_expires_at_ms) or
-- committed for one cluster on behalf of one requesting site.
CREATE TABLE reservations (
    id                  INTEGER PRIMARY KEY, -- local row id
    idem_key            TEXT NOT NULL UNIQUE, -- idempotency key chosen by the requester
    cluster_id          TEXT NOT NULL,       -- cluster the nodes are for
    requester           TEXT NOT NULL,       -- site that asked (the cluster's master)
    start_ms            INTEGER NOT NULL,    -- window start, unix ms, inclusive
    end_ms              INTEGER NOT NULL,    -- window end, unix ms, exclusive
    nodes               INTEGER NOT NULL CHECK (nodes > 0), -- number of nodes
    cores               INTEGER NOT NULL,    -- per-node cores
    memory_mib          INTEGER NOT NULL,    -- per-node memory, MiB
    disk_gib            INTEGER NOT NULL,    -- per-node disk, GiB
    state               TEXT NOT NULL CHECK (state IN ('held', 'committed', 'released', 'expired')),
    lease_expires_at_ms INTEGER,             -- unix ms after which a held row no longer counts; NULL once committed
    created_at_ms       INTEGER NOT NULL,    -- when the hold was taken, unix ms
    updated_at_ms       INTEGER NOT NULL,    -- last state change, unix ms
    CHECK (end_ms > start_ms)
) STRICT;
CREATE INDEX reservations_by_state_end ON reservations (state, end_ms);
CREATE INDEX reservations_by_cluster ON reservations (cluster_id);

-- Virtual clusters this site knows about: the ones it masters and the ones it
-- serves as a worker.
CREATE TABLE clusters (
    id            TEXT PRIMARY KEY,          -- federation-wide cluster id
    name          TEXT NOT NULL,             -- name given by the requester
    master_site   TEXT NOT NULL,             -- site that masters the cluster
    request_json  TEXT NOT NULL,             -- the original request, JSON
    state         TEXT NOT NULL,             -- lifecycle state (requested ... finished | failed)
    reason        TEXT,                      -- why it failed, when it did
    created_at_ms INTEGER NOT NULL,          -- when this site learnt of it, unix ms
    updated_at_ms INTEGER NOT NULL           -- last state change, unix ms
) STRICT;

-- Where a cluster's nodes are: one row per site taking part.
CREATE TABLE cluster_parts (
    cluster_id      TEXT NOT NULL REFERENCES clusters (id) ON DELETE CASCADE, -- the cluster
    site            TEXT NOT NULL,           -- site holding this part
    nodes           INTEGER NOT NULL CHECK (nodes > 0), -- nodes at that site
    reservation_key TEXT,                    -- idempotency key of the reservation at that site
    PRIMARY KEY (cluster_id, site)
) STRICT;

-- Federation members this site has heard of, so that a restart rejoins
-- without bootstrap.
CREATE TABLE peers (
    peer_id       TEXT PRIMARY KEY,          -- libp2p peer id of the site's agent
    site_name     TEXT,                      -- site name, once known
    addrs_json    TEXT NOT NULL,             -- known multiaddrs, JSON array of strings
    first_seen_ms INTEGER NOT NULL,          -- first contact, unix ms
    last_seen_ms  INTEGER NOT NULL           -- latest contact, unix ms
) STRICT;

-- Append-only log of what happened at this site, for operators and tests.
CREATE TABLE events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT, -- order of events
    at_ms       INTEGER NOT NULL,          -- when, unix ms
    kind        TEXT NOT NULL,             -- what happened, e.g. "reservation.held"
    subject     TEXT NOT NULL,             -- what it happened to (a key, a cluster id)
    detail_json TEXT NOT NULL              -- more, JSON object
) STRICT;
"#;

/// Cluster parts become one row per reservation attempt, with the peer id of
/// the site, the part's own state and whether it carries the frontend, so a
/// restarted master knows which commits or releases to send again.
const MIGRATION_2: &str = r#"
CREATE TABLE cluster_parts_v2 (
    cluster_id      TEXT NOT NULL REFERENCES clusters (id) ON DELETE CASCADE, -- the cluster
    site            TEXT NOT NULL,           -- name of the site holding this part
    peer_id         TEXT,                    -- peer id of that site's agent
    attempt         INTEGER NOT NULL DEFAULT 0, -- reservation attempt at that site (0: the master's own part)
    nodes           INTEGER NOT NULL CHECK (nodes >= 0), -- compute nodes in this part (0: frontend only)
    frontend        INTEGER NOT NULL DEFAULT 0 CHECK (frontend IN (0, 1)), -- 1 if the part also holds the frontend
    state           TEXT NOT NULL DEFAULT 'held', -- reserving, held, committing, committed, releasing, released
    reservation_key TEXT,                    -- idempotency key of the reservation at that site
    PRIMARY KEY (cluster_id, site, attempt)
) STRICT;
INSERT INTO cluster_parts_v2 (cluster_id, site, nodes, reservation_key)
    SELECT cluster_id, site, nodes, reservation_key FROM cluster_parts;
DROP TABLE cluster_parts;
ALTER TABLE cluster_parts_v2 RENAME TO cluster_parts;
"#;

/// What the sites of a cluster exchange with the reservation to build its
/// network: the overlay segment id chosen by the master, and each site's
/// gateway (endpoint and WireGuard key), so nothing is guessed at start time.
const MIGRATION_3: &str = r#"
ALTER TABLE clusters ADD COLUMN segment INTEGER; -- overlay segment id (GRE key) chosen by the master
ALTER TABLE cluster_parts ADD COLUMN gateway_json TEXT; -- that site's gateway as exchanged: {"endpoint", "public_key"}
"#;

/// What a cluster runs at this site: the local VLAN id it took from the
/// site's pool (a row from start until the teardown is done, so a restarted
/// agent knows what it had started), and the last known state of each node.
const MIGRATION_4: &str = r#"
CREATE TABLE cluster_runs (
    cluster_id    TEXT PRIMARY KEY,          -- the cluster running (or being torn down) here
    vlan          INTEGER NOT NULL UNIQUE CHECK (vlan BETWEEN 1 AND 4094), -- local VLAN id from the [clusters] pool
    started_at_ms INTEGER NOT NULL           -- when this site started it, unix ms
) STRICT;
CREATE TABLE cluster_nodes (
    cluster_id    TEXT NOT NULL,             -- the cluster
    site          TEXT NOT NULL,             -- site the node runs at
    idx           INTEGER NOT NULL CHECK (idx >= 0), -- node number in the cluster (0: the frontend)
    frontend      INTEGER NOT NULL CHECK (frontend IN (0, 1)), -- 1 for the frontend
    state_json    TEXT NOT NULL,             -- the node's state as the driver reported it, JSON object
    updated_at_ms INTEGER NOT NULL,          -- when it was reported, unix ms
    PRIMARY KEY (cluster_id, site, idx)
) STRICT;
"#;

/// The disk volumes a compute driver made for the nodes of clusters running
/// here, one row per volume from its creation until it is deleted, so that an
/// agent restarted after a crash finds (and can delete) the volumes it had
/// made, including those of nodes that never booted.
const MIGRATION_5: &str = r#"
CREATE TABLE volumes (
    host          TEXT NOT NULL,             -- libvirt URI of the hypervisor host the volume is on
    pool          TEXT NOT NULL,             -- storage pool name on that host
    name          TEXT NOT NULL,             -- volume name in the pool
    cluster_id    TEXT NOT NULL,             -- the cluster whose node it is the disk of
    node          INTEGER NOT NULL,          -- node number within the cluster (0: the frontend)
    size_bytes    INTEGER NOT NULL CHECK (size_bytes > 0), -- capacity of the volume, bytes
    created_at_ms INTEGER NOT NULL,          -- when the driver made it, unix ms
    PRIMARY KEY (host, pool, name)
) STRICT;
CREATE INDEX volumes_by_cluster ON volumes (cluster_id);
"#;

/// Healing a cluster that lost a site (issue 18): the cluster's membership
/// epoch, raised by its master each time it fences a lost part, so that a
/// worker never goes back to an older list of parts; each part's first node
/// number, fixed when the part is committed, so that nodes keep their numbers
/// (and MACs) when other parts come and go; and when the master declared the
/// part lost.
const MIGRATION_6: &str = r#"
ALTER TABLE clusters ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0 CHECK (epoch >= 0); -- membership epoch: raised by the master at each fence
ALTER TABLE cluster_parts ADD COLUMN first_node INTEGER CHECK (first_node >= 1); -- number of the part's first compute node (NULL: numbered in (site, attempt) order, as before epochs)
ALTER TABLE cluster_parts ADD COLUMN lost_at_ms INTEGER; -- when the master declared the part's site lost, unix ms (NULL: not lost)
"#;
