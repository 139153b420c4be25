//! A throwaway PostgreSQL for the demo and for first runs: `DATABASE_URL` if given; else a fresh
//! database on the local server at 127.0.0.1:5432 if it accepts connections; else a private
//! cluster made with `initdb`/`pg_ctl` under a directory of the caller's. Removed on `stop`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::Connection;
use sqlx::postgres::PgConnection;

/// The local server tried before making a private cluster.
pub const LOCAL_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";

enum Kind {
    /// Given by the user; left alone.
    External,
    /// A database made on a running server; dropped at the end.
    Database { admin_url: String, name: String },
    /// A whole cluster made for this run; stopped and deleted at the end.
    Cluster {
        dir: PathBuf,
        pg_ctl: PathBuf,
        as_postgres: bool,
        /// The server options it was started with, so it can be started again the same way.
        opts: String,
    },
}

/// A database that lives as long as this handle.
pub struct DevDb {
    pub url: String,
    /// Where it came from, for people: "DATABASE_URL", "local server", "private cluster".
    pub origin: &'static str,
    kind: Kind,
}

impl DevDb {
    /// Finds or makes a database as described in the module docs. `scratch` is where a private
    /// cluster may be made (e.g. `target/`).
    pub async fn start(database_url: Option<String>, scratch: &Path) -> anyhow::Result<DevDb> {
        if let Some(url) = database_url {
            return Ok(DevDb {
                url,
                origin: "DATABASE_URL",
                kind: Kind::External,
            });
        }
        let name = format!(
            "accrete_demo_{}_{}",
            std::process::id(),
            rand::random::<u32>()
        );
        if let Ok(db) = Self::on_server(LOCAL_SERVER, &name).await {
            return Ok(db);
        }
        Self::cluster(scratch, &name).await
    }

    /// Makes a fresh database `name` on the server at `admin_url`.
    pub async fn on_server(admin_url: &str, name: &str) -> anyhow::Result<DevDb> {
        let mut conn =
            tokio::time::timeout(Duration::from_secs(3), PgConnection::connect(admin_url))
                .await
                .context("timed out connecting")??;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await?;
        let base = admin_url.rsplit_once('/').map_or(admin_url, |(b, _)| b);
        Ok(DevDb {
            url: format!("{base}/{name}"),
            origin: "local server",
            kind: Kind::Database {
                admin_url: admin_url.to_string(),
                name: name.to_string(),
            },
        })
    }

    /// Makes a private cluster under `scratch`, or under the system's temporary directory when
    /// run as root (what `start` falls back to).
    pub async fn cluster(scratch: &Path, name: &str) -> anyhow::Result<DevDb> {
        let bin = pg_bin_dir().context(
            "no PostgreSQL server at 127.0.0.1:5432 and no initdb found: set DATABASE_URL or install PostgreSQL",
        )?;
        // initdb refuses to run as root; run the cluster as the postgres user then, in the
        // system's temporary directory: `scratch` may sit under a directory that user cannot
        // enter (a checkout in /root, or in a `mktemp -d`).
        let as_postgres = is_root();
        let dir = if as_postgres {
            std::env::temp_dir().join(format!("accrete-pg-{name}-{}", std::process::id()))
        } else {
            std::path::absolute(scratch.join(format!("pg-{name}")))?
        };
        std::fs::create_dir_all(&dir)?;
        if as_postgres {
            run(Command::new("chown").arg("-R").arg("postgres").arg(&dir))?;
        }
        let data = dir.join("data");
        let port = free_port()?;
        run(pg_command(&bin.join("initdb"), as_postgres)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data))
        .context("initdb")?;
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={} -c fsync=off",
            dir.display()
        );
        let db = DevDb {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            origin: "private cluster",
            kind: Kind::Cluster {
                dir,
                pg_ctl: bin.join("pg_ctl"),
                as_postgres,
                opts,
            },
        };
        db.start_cluster()?;
        Ok(db)
    }

    /// Where a private cluster keeps its data and socket (`None` for a database on a server).
    pub fn cluster_dir(&self) -> Option<&Path> {
        match &self.kind {
            Kind::Cluster { dir, .. } => Some(dir),
            _ => None,
        }
    }

    /// Stops a private cluster's PostgreSQL as a crash would (`pg_ctl stop -m immediate`),
    /// keeping its data: fault tests take the database away under load with this.
    pub fn stop_cluster(&self) -> anyhow::Result<()> {
        let Kind::Cluster {
            dir,
            pg_ctl,
            as_postgres,
            ..
        } = &self.kind
        else {
            bail!("only a private cluster can be stopped and started");
        };
        run(pg_command(pg_ctl, *as_postgres)
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"]))
        .context("pg_ctl stop")
    }

    /// Starts a private cluster's PostgreSQL (again), on the same port and data.
    pub fn start_cluster(&self) -> anyhow::Result<()> {
        let Kind::Cluster {
            dir,
            pg_ctl,
            as_postgres,
            opts,
        } = &self.kind
        else {
            bail!("only a private cluster can be stopped and started");
        };
        run(pg_command(pg_ctl, *as_postgres)
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-o", opts, "-w", "-l"])
            .arg(dir.join("log"))
            .arg("start"))
        .context("pg_ctl start")
    }

    /// Removes what `start` made. Also done on drop, but this reports failures.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let kind = std::mem::replace(&mut self.kind, Kind::External);
        match kind {
            Kind::External => Ok(()),
            Kind::Database { admin_url, name } => {
                let mut conn = PgConnection::connect(&admin_url).await?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await?;
                Ok(())
            }
            Kind::Cluster {
                dir,
                pg_ctl,
                as_postgres,
                ..
            } => remove_cluster(&dir, &pg_ctl, as_postgres),
        }
    }
}

impl Drop for DevDb {
    fn drop(&mut self) {
        // Best effort when `stop` was not reached (an error or a panic on the way out).
        match std::mem::replace(&mut self.kind, Kind::External) {
            Kind::External => {}
            Kind::Database { name, .. } => {
                let _ = Command::new("psql")
                    .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qc"])
                    .arg(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .output();
            }
            Kind::Cluster {
                dir,
                pg_ctl,
                as_postgres,
                ..
            } => {
                let _ = remove_cluster(&dir, &pg_ctl, as_postgres);
            }
        }
    }
}

fn remove_cluster(dir: &Path, pg_ctl: &Path, as_postgres: bool) -> anyhow::Result<()> {
    let stopped = run(pg_command(pg_ctl, as_postgres)
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-m", "immediate", "-w", "stop"]));
    std::fs::remove_dir_all(dir)?;
    stopped
}

fn pg_command(program: &Path, as_postgres: bool) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        // From a directory the postgres user may enter, whatever the caller's is.
        c.args(["-u", "postgres", "--"])
            .arg(program)
            .current_dir("/");
        c
    } else {
        Command::new(program)
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// The directory with `initdb` and `pg_ctl`: on PATH, or Debian's versioned directory.
fn pg_bin_dir() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"));
    on_path
        .chain(debian)
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
