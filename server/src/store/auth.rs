//! SQL for identities: API keys (hashed, with roles), volunteer accounts (hashed keys, shared
//! quotas), worker credentials, study ownership, and the replicas a returning worker still holds.

use sqlx::FromRow;
use uuid::Uuid;

use super::{Claimed, Store};
use crate::error::Error;

/// What an API key may do. Mirrors the `api_role` enum; ordered, each role can do everything
/// the ones before it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, sqlx::Type)]
#[sqlx(type_name = "api_role", rename_all = "snake_case")]
pub enum Role {
    /// Queries only: status, findings, the ledger.
    Reader,
    /// A reader that also uploads modules, submits studies, adopts findings and cancels its own
    /// studies.
    Researcher,
    /// Everything, including any study, API keys and blocking workers.
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Researcher => "researcher",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "reader" => Some(Role::Reader),
            "researcher" => Some(Role::Researcher),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// An API key as stored (never the key itself).
#[derive(Debug, Clone, FromRow)]
pub struct ApiKeyRow {
    pub id: i64,
    pub name: String,
    pub role: Role,
    /// The key's first characters, to tell keys apart.
    pub prefix: String,
    pub created_unix: i64,
    /// When it was revoked; a revoked key authenticates nothing.
    pub revoked_unix: Option<i64>,
}

/// What authenticating a worker needs from its row.
#[derive(Debug, Clone, FromRow)]
pub struct WorkerCredential {
    pub token_hash: Vec<u8>,
    pub blocked: bool,
}

const KEY_COLUMNS: &str = "id, name, role, prefix,
    extract(epoch FROM created_at)::bigint AS created_unix,
    extract(epoch FROM revoked_at)::bigint AS revoked_unix";

/// A worker's credential check (on the hot pool: see `store::HOT_STATEMENTS`).
pub(super) const WORKER_CREDENTIAL: &str = "SELECT token_hash, blocked FROM workers WHERE id = $1";

impl Store {
    /// Stores a new key's hash; returns its id.
    pub async fn create_api_key(
        &self,
        name: &str,
        role: Role,
        prefix: &str,
        key_hash: &[u8; 32],
    ) -> Result<i64, Error> {
        Ok(sqlx::query_scalar(
            "INSERT INTO api_keys (name, role, prefix, key_hash) VALUES ($1, $2, $3, $4)
             RETURNING id",
        )
        .bind(name)
        .bind(role)
        .bind(prefix)
        .bind(&key_hash[..])
        .fetch_one(&self.pool)
        .await?)
    }

    /// The key with this hash, revoked or not.
    pub async fn api_key_by_hash(&self, key_hash: &[u8; 32]) -> Result<Option<ApiKeyRow>, Error> {
        Ok(sqlx::query_as::<_, ApiKeyRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1"
        )))
        .bind(&key_hash[..])
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn list_api_keys(&self) -> Result<Vec<ApiKeyRow>, Error> {
        Ok(sqlx::query_as::<_, ApiKeyRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM api_keys ORDER BY id"
        )))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Revokes a key; false if there is no such key or it was already revoked.
    pub async fn revoke_api_key(&self, id: i64) -> Result<bool, Error> {
        Ok(sqlx::query(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1)
    }

    /// Creates a volunteer account with this key hash; false if the name is taken.
    pub async fn create_account(
        &self,
        name: &str,
        prefix: &str,
        key_hash: &[u8; 32],
        daily_quota: i32,
    ) -> Result<bool, Error> {
        Ok(sqlx::query(
            "INSERT INTO accounts (name, prefix, key_hash, daily_quota) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(prefix)
        .bind(&key_hash[..])
        .bind(daily_quota)
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1)
    }

    /// The name of the account whose key has this hash.
    pub async fn account_by_key_hash(&self, key_hash: &[u8; 32]) -> Result<Option<String>, Error> {
        Ok(
            sqlx::query_scalar("SELECT name FROM accounts WHERE key_hash = $1")
                .bind(&key_hash[..])
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Sets an account's daily quota; false if there is no such account.
    pub async fn set_account_quota(&self, name: &str, daily_quota: i32) -> Result<bool, Error> {
        Ok(
            sqlx::query("UPDATE accounts SET daily_quota = $2 WHERE name = $1")
                .bind(name)
                .bind(daily_quota)
                .execute(&self.pool)
                .await?
                .rows_affected()
                == 1,
        )
    }

    /// On the hot path's pool: every worker call checks its credential.
    pub async fn worker_credential(&self, id: Uuid) -> Result<Option<WorkerCredential>, Error> {
        Ok(sqlx::query_as::<_, WorkerCredential>(WORKER_CREDENTIAL)
            .bind(id)
            .fetch_optional(&self.hot)
            .await?)
    }

    /// The key that owns a study: `None` if there is no such study, `Some(None)` if it has no
    /// owner.
    pub async fn study_owner(&self, study: i64) -> Result<Option<Option<i64>>, Error> {
        Ok(
            sqlx::query_scalar("SELECT owner_key FROM studies WHERE id = $1")
                .bind(study)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Up to `max` replicas this worker holds and may still report (in progress, deadline not
    /// passed), for a worker that restarted with its saved credential and lost track of them.
    pub async fn in_flight(&self, worker: Uuid, max: i64) -> Result<Vec<Claimed>, Error> {
        Ok(sqlx::query_as::<_, Claimed>(
            "SELECT r.id AS replica_id, w.id AS wu_id, w.module_hash, w.input, w.input_hash,
                    w.fuel, w.memory_bytes, w.output_bytes, w.wall_ms,
                    extract(epoch FROM r.deadline)::bigint AS deadline_unix
             FROM replicas r JOIN work_units w ON w.id = r.wu_id
             WHERE r.worker_id = $1 AND r.state = 'in_progress' AND r.deadline > now()
               AND w.state = 'pending'
             ORDER BY r.id LIMIT $2",
        )
        .bind(worker)
        .bind(max)
        .fetch_all(&self.pool)
        .await?)
    }
}
