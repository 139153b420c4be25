//! The admin service: API keys (create, list, revoke), worker blocks and volunteer account
//! quotas, for `admin` keys.
//! `accrete-server keys ...` does the key part straight on the database, for the first key.

use accrete_proto::v1::{self as pb, admin_service_server::AdminService};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::auth::{self, Role};
use crate::error::Error;
use crate::service::Api;
use crate::store;

/// Makes a key of `role` and stores its hash; returns the id and the key (shown once).
pub async fn create_key(
    store: &store::Store,
    role: Role,
    name: &str,
) -> Result<(i64, String), Error> {
    let key = auth::new_key();
    let id = store
        .create_api_key(
            &store::clean_text(name, 200),
            role,
            &auth::key_prefix(&key),
            &auth::key_hash(&key),
        )
        .await?;
    Ok((id, key))
}

fn key_to_pb(k: store::ApiKeyRow) -> pb::ApiKey {
    pb::ApiKey {
        id: k.id as u64,
        name: k.name,
        role: k.role.name().to_string(),
        prefix: k.prefix,
        created_unix: k.created_unix,
        revoked_unix: k.revoked_unix.unwrap_or(0),
    }
}

#[tonic::async_trait]
impl AdminService for Api {
    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let caller = self.caller(&request, Role::Admin, "CreateApiKey").await?;
        let r = request.into_inner();
        let role = Role::parse(&r.role).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "unknown role {:?}: reader, researcher or admin",
                r.role
            ))
        })?;
        let (id, key) = create_key(&self.store, role, &r.name).await?;
        tracing::info!(
            key = id,
            role = role.name(),
            by = caller.key_id,
            "API key created"
        );
        Ok(Response::new(pb::CreateApiKeyResponse {
            id: id as u64,
            key,
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        self.caller(&request, Role::Admin, "ListApiKeys").await?;
        let keys = self.store.list_api_keys().await?;
        Ok(Response::new(pb::ListApiKeysResponse {
            keys: keys.into_iter().map(key_to_pb).collect(),
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let caller = self.caller(&request, Role::Admin, "RevokeApiKey").await?;
        let id = request.into_inner().id;
        let id = i64::try_from(id).map_err(|_| Error::NotFound(format!("no API key {id}")))?;
        if !self.store.revoke_api_key(id).await? {
            return Err(
                Error::NotFound(format!("no API key {id}, or it is already revoked")).into(),
            );
        }
        // Here at once; other servers within their cache TTL.
        self.auth.forget_key(id);
        tracing::info!(key = id, by = caller.key_id, "API key revoked");
        Ok(Response::new(pb::RevokeApiKeyResponse {}))
    }

    async fn set_worker_blocked(
        &self,
        request: Request<pb::SetWorkerBlockedRequest>,
    ) -> Result<Response<pb::SetWorkerBlockedResponse>, Status> {
        let caller = self
            .caller(&request, Role::Admin, "SetWorkerBlocked")
            .await?;
        let r = request.into_inner();
        let worker = Uuid::parse_str(&r.worker_id).map_err(|_| {
            Error::InvalidArgument(format!("malformed worker id {:?}", r.worker_id))
        })?;
        if !self.store.set_blocked(worker, r.blocked).await? {
            return Err(Error::NotFound(format!("no worker {worker}")).into());
        }
        self.auth.forget_worker(worker);
        tracing::info!(%worker, blocked = r.blocked, by = caller.key_id, "worker block changed");
        Ok(Response::new(pb::SetWorkerBlockedResponse {}))
    }

    async fn set_account_quota(
        &self,
        request: Request<pb::SetAccountQuotaRequest>,
    ) -> Result<Response<pb::SetAccountQuotaResponse>, Status> {
        let caller = self
            .caller(&request, Role::Admin, "SetAccountQuota")
            .await?;
        let r = request.into_inner();
        let quota = i32::try_from(r.daily_quota).map_err(|_| {
            Error::InvalidArgument(format!("daily quota {} is too large", r.daily_quota))
        })?;
        if !self.store.set_account_quota(&r.account, quota).await? {
            return Err(Error::NotFound(format!("no account {:?}", r.account)).into());
        }
        tracing::info!(account = %r.account, daily_quota = quota, by = caller.key_id,
                       "account quota changed");
        Ok(Response::new(pb::SetAccountQuotaResponse {}))
    }
}

/// `accrete-server keys ...`: API keys straight on the database, for the first admin key and
/// for operators without one.
#[derive(clap::Subcommand, Debug)]
pub enum KeysCommand {
    /// Creates a key and prints it on stdout; it is never shown again (only its hash is kept).
    Create {
        /// reader (queries), researcher (also submit, adopt, cancel own studies) or admin
        /// (everything, plus keys and worker blocks).
        #[arg(long, value_parser = ["reader", "researcher", "admin"])]
        role: String,
        /// Who or what the key is for, shown in listings.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Lists keys (id, role, name, prefix, created, revoked); never the keys themselves.
    List,
    /// Revokes a key by id; every server refuses it within its cache TTL (5 s by default).
    Revoke { id: i64 },
}

/// Runs a `keys` subcommand against the database at `url`.
pub async fn keys_command(url: &str, command: KeysCommand) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let store = store::Store::connect(url, 2)
        .await
        .context("connecting to the database")?;
    match command {
        KeysCommand::Create { role, name } => {
            let role = Role::parse(&role).context("unknown role")?;
            let (id, key) = create_key(&store, role, &name).await?;
            eprintln!(
                "API key {id} ({}{}) created; it is shown only now:",
                role.name(),
                if name.is_empty() {
                    String::new()
                } else {
                    format!(", {name:?}")
                }
            );
            println!("{key}");
        }
        KeysCommand::List => {
            println!(
                "{:>5}  {:<10}  {:<14}  {:<20}  {:<12}  revoked",
                "id", "role", "prefix", "name", "created"
            );
            for k in store.list_api_keys().await? {
                println!(
                    "{:>5}  {:<10}  {:<14}  {:<20}  {:<12}  {}",
                    k.id,
                    k.role.name(),
                    k.prefix,
                    k.name,
                    k.created_unix,
                    k.revoked_unix.map_or("-".to_string(), |t| t.to_string())
                );
            }
        }
        KeysCommand::Revoke { id } => {
            anyhow::ensure!(
                store.revoke_api_key(id).await?,
                "no API key {id}, or it is already revoked"
            );
            eprintln!("API key {id} revoked; servers refuse it within their cache TTL");
        }
    }
    store.close().await;
    Ok(())
}
