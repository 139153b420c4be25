//! Who is calling, and whether they may: API keys (a bearer token in gRPC metadata, with a role)
//! for the research, ledger and admin services; worker credentials (in the message body) for
//! the worker service. Both are checked against short-lived caches of the database's truth, so
//! a revoked key or a blocked worker is refused by every server within [`DEFAULT_CACHE_TTL`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::error::Error;
use crate::store::{Store, WorkerCredential};

pub use crate::store::Role;

/// How long a server trusts what it read about a key or a worker credential. A revocation or a
/// block made through another server (or straight in the database) takes effect within this.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(5);

/// Every API key starts with this, so a key is recognisable in a config file or a leak scan.
pub const KEY_PREFIX: &str = "acc_";

/// Entries kept before expired ones are swept out.
const CACHE_SWEEP_AT: usize = 10_000;

/// A new random API key: the prefix and 32 random bytes in hex.
pub fn new_key() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{KEY_PREFIX}{}", crate::ledger::hex(&bytes))
}

/// What is stored for a key: its BLAKE3 hash (keys are random and long, so no slow hash is
/// needed to resist guessing).
pub fn key_hash(key: &str) -> [u8; 32] {
    *blake3::hash(key.as_bytes()).as_bytes()
}

/// The part of a key shown in listings.
pub fn key_prefix(key: &str) -> String {
    key.chars().take(KEY_PREFIX.len() + 8).collect()
}

/// An authenticated API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub key_id: i64,
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// Refuses with PERMISSION_DENIED unless this key's role is at least `need`.
    pub fn require(&self, need: Role, what: &str) -> Result<(), Error> {
        if self.role >= need {
            Ok(())
        } else {
            Err(Error::PermissionDenied(format!(
                "{what} needs the {} role; API key {} ({:?}) is a {}",
                need.name(),
                self.key_id,
                self.name,
                self.role.name()
            )))
        }
    }
}

type Cached<T> = Mutex<HashMap<T, (Instant, Option<Caller>)>>;

/// Checks API keys and worker credentials, caching what the database said for a short while.
#[derive(Clone)]
pub struct Authenticator {
    store: Store,
    ttl: Duration,
    /// By key hash: the key, or `None` for an unknown or revoked one.
    keys: Arc<Cached<[u8; 32]>>,
    workers: Arc<Mutex<HashMap<Uuid, (Instant, WorkerCredential)>>>,
}

impl Authenticator {
    pub fn new(store: Store, ttl: Duration) -> Authenticator {
        Authenticator {
            store,
            ttl,
            keys: Arc::default(),
            workers: Arc::default(),
        }
    }

    /// The caller behind an `authorization` header value (`None`: the header is missing).
    pub async fn api_key(&self, header: Option<&str>) -> Result<Caller, Error> {
        let header = header.ok_or_else(|| {
            Error::Unauthenticated(
                "this call needs an API key: send the gRPC metadata `authorization: Bearer <key>` \
                 (accrete --api-key or ACCRETE_API_KEY)"
                    .into(),
            )
        })?;
        let key = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                Error::Unauthenticated("the authorization metadata must be `Bearer <key>`".into())
            })?;
        if !key.starts_with(KEY_PREFIX) {
            return Err(Error::Unauthenticated(format!(
                "not an API key (API keys start with {KEY_PREFIX:?}; a worker credential works \
                 only for worker calls)"
            )));
        }
        let hash = key_hash(key);
        let now = Instant::now();
        let cached = self.keys.lock().unwrap().get(&hash).cloned();
        let found = match cached {
            Some((at, found)) if now.duration_since(at) < self.ttl => found,
            _ => {
                let found = self
                    .store
                    .api_key_by_hash(&hash)
                    .await?
                    .filter(|k| k.revoked_unix.is_none())
                    .map(|k| Caller {
                        key_id: k.id,
                        name: k.name,
                        role: k.role,
                    });
                let mut keys = self.keys.lock().unwrap();
                if keys.len() >= CACHE_SWEEP_AT {
                    keys.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
                }
                keys.insert(hash, (now, found.clone()));
                found
            }
        };
        found.ok_or_else(|| Error::Unauthenticated("unknown or revoked API key".into()))
    }

    /// The worker a worker call comes from, if its credential is right and it is not blocked.
    pub async fn worker(&self, worker_id: &str, token: &str) -> Result<Uuid, Error> {
        let id = Uuid::parse_str(worker_id)
            .map_err(|_| Error::Unauthenticated("malformed worker id".into()))?;
        let now = Instant::now();
        let cached = self.workers.lock().unwrap().get(&id).cloned();
        let cred = match cached {
            Some((at, cred)) if now.duration_since(at) < self.ttl => cred,
            _ => {
                let Some(cred) = self.store.worker_credential(id).await? else {
                    return Err(Error::Unauthenticated(
                        "unknown worker; register again".into(),
                    ));
                };
                let mut workers = self.workers.lock().unwrap();
                if workers.len() >= CACHE_SWEEP_AT {
                    workers.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
                }
                workers.insert(id, (now, cred.clone()));
                cred
            }
        };
        if cred.token_hash != blake3::hash(token.as_bytes()).as_bytes() {
            return Err(Error::Unauthenticated("wrong worker token".into()));
        }
        if cred.blocked {
            return Err(Error::PermissionDenied(
                "this worker is blocked by the operator".into(),
            ));
        }
        Ok(id)
    }

    /// Drops what this server cached about a worker, so a block made here applies at once.
    pub fn forget_worker(&self, id: Uuid) {
        self.workers.lock().unwrap().remove(&id);
    }

    /// Drops what this server cached about a key, so a revocation made here applies at once.
    pub fn forget_key(&self, key_id: i64) {
        self.keys
            .lock()
            .unwrap()
            .retain(|_, (_, c)| c.as_ref().is_none_or(|c| c.key_id != key_id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_recognisable_and_stored_as_hashes() {
        let (a, b) = (new_key(), new_key());
        assert_ne!(a, b);
        assert!(
            a.starts_with(KEY_PREFIX) && a.len() == KEY_PREFIX.len() + 64,
            "{a}"
        );
        assert_eq!(key_hash(&a), *blake3::hash(a.as_bytes()).as_bytes());
        assert_eq!(key_prefix(&a), a[..12]);
    }

    #[test]
    fn each_role_includes_the_ones_below_it() {
        let caller = |role| Caller {
            key_id: 7,
            name: "k".into(),
            role,
        };
        assert!(caller(Role::Admin).require(Role::Researcher, "x").is_ok());
        assert!(caller(Role::Researcher).require(Role::Reader, "x").is_ok());
        let Err(Error::PermissionDenied(m)) =
            caller(Role::Reader).require(Role::Researcher, "SubmitStudy")
        else {
            panic!("a reader may not submit");
        };
        assert!(
            m.contains("SubmitStudy needs the researcher role") && m.contains("is a reader"),
            "{m}"
        );
        for r in [Role::Reader, Role::Researcher, Role::Admin] {
            assert_eq!(Role::parse(r.name()), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
    }
}
