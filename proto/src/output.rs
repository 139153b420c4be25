//! The guest output contract: stdout is a JSON object whose `"metrics"` member is an object of
//! finite numbers. Anything else is a bad output. Workers check it before reporting and the server
//! checks it again, since a worker is not trusted.

use std::collections::BTreeMap;

/// Named metrics of one result, ordered by name.
pub type Metrics = BTreeMap<String, f64>;

/// Why an output is not acceptable.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OutputError {
    #[error("output is not UTF-8 JSON: {0}")]
    NotJson(String),
    #[error("output is not a JSON object")]
    NotObject,
    #[error("output has no \"metrics\" object")]
    NoMetrics,
    #[error("metric {0:?} is not a finite number")]
    BadMetric(String),
}

/// Parses `output` and returns its metrics.
pub fn parse_metrics(output: &[u8]) -> Result<Metrics, OutputError> {
    let value: serde_json::Value =
        serde_json::from_slice(output).map_err(|e| OutputError::NotJson(e.to_string()))?;
    let object = value.as_object().ok_or(OutputError::NotObject)?;
    let metrics = object
        .get("metrics")
        .and_then(|m| m.as_object())
        .ok_or(OutputError::NoMetrics)?;
    metrics
        .iter()
        .map(|(name, v)| match v.as_f64() {
            // NUL is refused because PostgreSQL's jsonb, where metrics are stored, refuses it.
            _ if name.contains('\0') => Err(OutputError::BadMetric(name.clone())),
            Some(x) if x.is_finite() => Ok((name.clone(), x)),
            _ => Err(OutputError::BadMetric(name.clone())),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_metrics_object_and_payload() {
        let m =
            parse_metrics(br#"{"metrics":{"val_loss":0.25,"steps":100},"payload":[1,2]}"#).unwrap();
        assert_eq!(m["val_loss"], 0.25);
        assert_eq!(m["steps"], 100.0);
    }

    #[test]
    fn refuses_what_is_not_the_contract() {
        assert!(matches!(
            parse_metrics(b"\xff\xfe"),
            Err(OutputError::NotJson(_))
        ));
        assert_eq!(parse_metrics(b"[1]"), Err(OutputError::NotObject));
        assert_eq!(parse_metrics(br#"{"m":{}}"#), Err(OutputError::NoMetrics));
        assert_eq!(
            parse_metrics(br#"{"metrics":{"a":"x"}}"#),
            Err(OutputError::BadMetric("a".into()))
        );
        assert!(matches!(
            parse_metrics(br#"{"metrics":{"a\u0000":1}}"#),
            Err(OutputError::BadMetric(_))
        ));
    }
}
