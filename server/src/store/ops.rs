//! The operator's queries: a liveness ping for the health service and the gauges the metrics
//! endpoint reads at scrape time. Each one walks an index or a small table.

use super::Store;
use crate::error::Error;

/// What `/metrics` reports from the database.
#[derive(Debug, Default)]
pub struct Gauges {
    /// (study, replicas still to hand out) for studies with pending work.
    pub queue_depth: Vec<(i64, i64)>,
    pub in_flight: i64,
    pub validations: i64,
    pub valid: i64,
    pub invalid: i64,
    pub errors: i64,
    pub timeouts: i64,
    /// (arch/os, workers, workers seen in the last 5 minutes).
    pub platforms: Vec<(String, i64, i64)>,
}

impl Store {
    /// Succeeds if PostgreSQL answers.
    pub async fn ping(&self) -> Result<(), Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// The gauges, in one read-only transaction so they describe one moment.
    pub async fn gauges(&self) -> Result<Gauges, Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION READ ONLY")
            .execute(&mut *tx)
            .await?;
        // The partial index work_units_dispatch holds exactly the units with replicas to send.
        let queue_depth: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT study_id, sum(unsent)::bigint FROM work_units
             WHERE state = 'pending' AND unsent > 0 GROUP BY study_id ORDER BY study_id",
        )
        .fetch_all(&mut *tx)
        .await?;
        // The partial index replicas_deadline holds exactly the replicas in progress.
        let in_flight: i64 =
            sqlx::query_scalar("SELECT count(*) FROM replicas WHERE state = 'in_progress'")
                .fetch_one(&mut *tx)
                .await?;
        let validations: i64 = sqlx::query_scalar("SELECT count(*) FROM findings")
            .fetch_one(&mut *tx)
            .await?;
        let (valid, invalid, errors, timeouts): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT coalesce(sum(valid_count), 0)::bigint, coalesce(sum(invalid_count), 0)::bigint,
                    coalesce(sum(error_count), 0)::bigint, coalesce(sum(timeout_count), 0)::bigint
             FROM workers",
        )
        .fetch_one(&mut *tx)
        .await?;
        let platforms: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT arch || '/' || os, count(*),
                    count(*) FILTER (WHERE last_seen > now() - interval '5 minutes')
             FROM workers GROUP BY 1 ORDER BY 1",
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Gauges {
            queue_depth,
            in_flight,
            validations,
            valid,
            invalid,
            errors,
            timeouts,
            platforms,
        })
    }
}
