//! Helper for writing accrete guest experiments: reads JSON input from stdin, calls the task and
//! writes its [`Output`] to stdout in the one canonical rendering that workers hash.
//!
//! A guest binary is one line:
//!
//! ```no_run
//! # mod my_task {
//! #     pub fn run(input: serde_json::Value) -> accrete_guest::Output {
//! #         accrete_guest::Output::new().metric("x", input["x"].as_f64().unwrap_or(0.0))
//! #     }
//! # }
//! fn main() { accrete_guest::run(my_task::run) }
//! ```
//!
//! Native code (tests, the CLI, parity checks) computes the bytes a guest should write with
//! [`execute`], which is the very function [`run`] uses, so the wasm and the native path cannot
//! drift apart.
//!
//! Layout: [`Output`] and its rendering, [`TaskResult`] for tasks that can refuse their input,
//! [`execute`] (bytes in, bytes out) and [`run`] (stdin/stdout and exit codes).

use std::collections::BTreeMap;
use std::fmt::Display;
use std::io::{Read, Write};

use serde::de::DeserializeOwned;
use serde_json::Value;

/// Exit code of a guest whose input could not be parsed or was refused by the task.
pub const EXIT_BAD_INPUT: i32 = 2;

/// The result of one task run: named finite metrics plus an optional free-form payload.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Output {
    /// Metrics by name; rendered in name order.
    pub metrics: BTreeMap<String, f64>,
    /// Any JSON; `Value::Null` means "no payload" and is not rendered.
    pub payload: Value,
}

impl Output {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a metric.
    ///
    /// # Panics
    /// If `value` is not finite: the output contract has no NaN or infinity, and a silent
    /// substitute would turn a guest bug into a plausible-looking finding.
    pub fn metric(mut self, name: impl Into<String>, value: f64) -> Self {
        let name = name.into();
        assert!(value.is_finite(), "metric {name:?} is not finite: {value}");
        self.metrics.insert(name, value);
        self
    }

    /// Sets the payload.
    pub fn payload(mut self, payload: Value) -> Self {
        self.payload = payload;
        self
    }

    /// The exact bytes a guest writes to stdout: compact JSON, object keys sorted at every depth,
    /// `{"metrics":{..}}` followed by `"payload"` unless it is null.
    ///
    /// Keys are sorted here rather than trusting `serde_json::Map`, whose order depends on the
    /// `preserve_order` feature, which another crate in a native build could switch on.
    ///
    /// # Panics
    /// If a metric is not finite (the fields are public, so [`Output::metric`] may be bypassed).
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + 32 * self.metrics.len());
        out.extend_from_slice(b"{\"metrics\":{");
        for (i, (name, value)) in self.metrics.iter().enumerate() {
            assert!(value.is_finite(), "metric {name:?} is not finite: {value}");
            if i > 0 {
                out.push(b',');
            }
            write_json_string(&mut out, name);
            out.push(b':');
            write_scalar(&mut out, value);
        }
        out.push(b'}');
        if !self.payload.is_null() {
            out.extend_from_slice(b",\"payload\":");
            write_canonical(&mut out, &self.payload);
        }
        out.push(b'}');
        out
    }
}

fn write_scalar<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    serde_json::to_writer(out, value).expect("serialising a JSON scalar to memory cannot fail");
}

fn write_json_string(out: &mut Vec<u8>, s: &str) {
    write_scalar(out, s);
}

fn write_canonical(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_string(out, key);
                out.push(b':');
                write_canonical(out, item);
            }
            out.push(b'}');
        }
        scalar => write_scalar(out, scalar),
    }
}

/// What a task function returns: an [`Output`], or a `Result` whose error refuses the input
/// (for example a parameter out of its valid range).
pub trait TaskResult {
    fn into_result(self) -> Result<Output, String>;
}

impl TaskResult for Output {
    fn into_result(self) -> Result<Output, String> {
        Ok(self)
    }
}

impl<E: Display> TaskResult for Result<Output, E> {
    fn into_result(self) -> Result<Output, String> {
        self.map_err(|e| e.to_string())
    }
}

/// Why a guest produced no output.
#[derive(Debug, Clone, PartialEq)]
pub enum GuestError {
    /// The input is not JSON of the task's input type.
    BadJson(String),
    /// The task refused the parsed input.
    Refused(String),
}

impl Display for GuestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestError::BadJson(e) => write!(f, "input is not valid JSON for this task: {e}"),
            GuestError::Refused(e) => write!(f, "invalid input: {e}"),
        }
    }
}

impl std::error::Error for GuestError {}

/// Parses `input`, runs `task` and renders its output: the bytes a guest writes to stdout.
pub fn execute<I, R, F>(input: &[u8], task: F) -> Result<Vec<u8>, GuestError>
where
    I: DeserializeOwned,
    R: TaskResult,
    F: FnOnce(I) -> R,
{
    let parsed: I =
        serde_json::from_slice(input).map_err(|e| GuestError::BadJson(e.to_string()))?;
    let output = task(parsed).into_result().map_err(GuestError::Refused)?;
    Ok(output.render())
}

/// The whole `main` of a guest: stdin to [`execute`] to stdout. On bad input it writes the reason
/// to stderr and exits with [`EXIT_BAD_INPUT`], leaving stdout empty.
pub fn run<I, R, F>(task: F)
where
    I: DeserializeOwned,
    R: TaskResult,
    F: FnOnce(I) -> R,
{
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("cannot read stdin: {e}");
        std::process::exit(EXIT_BAD_INPUT);
    }
    match execute(&input, task) {
        Ok(bytes) => {
            let mut stdout = std::io::stdout().lock();
            if let Err(e) = stdout.write_all(&bytes).and_then(|()| stdout.flush()) {
                eprintln!("cannot write stdout: {e}");
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(EXIT_BAD_INPUT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_compact_sorted_json() {
        let out = Output::new()
            .metric("val_loss", 0.25)
            .metric("steps", 100.0)
            .payload(json!({"z": [1, {"b": 2, "a": 1.5}], "a": "x"}));
        assert_eq!(
            String::from_utf8(out.render()).unwrap(),
            r#"{"metrics":{"steps":100.0,"val_loss":0.25},"payload":{"a":"x","z":[1,{"a":1.5,"b":2}]}}"#
        );
    }

    #[test]
    fn null_payload_is_omitted() {
        let out = Output::new().metric("m", -0.5);
        assert_eq!(out.render(), br#"{"metrics":{"m":-0.5}}"#);
        assert_eq!(Output::new().render(), br#"{"metrics":{}}"#);
    }

    #[test]
    fn rendering_round_trips_metrics_exactly() {
        let values = [0.1, 1.0 / 3.0, 1e-300, 6.02214076e23, f64::MAX, -0.0];
        let mut out = Output::new();
        for (i, v) in values.iter().enumerate() {
            out = out.metric(format!("m{i}"), *v);
        }
        let back: Value = serde_json::from_slice(&out.render()).unwrap();
        for (i, v) in values.iter().enumerate() {
            let got = back["metrics"][format!("m{i}")].as_f64().unwrap();
            assert_eq!(got.to_bits(), v.to_bits(), "m{i}");
        }
    }

    #[test]
    #[should_panic(expected = "not finite")]
    fn non_finite_metric_panics() {
        let _ = Output::new().metric("loss", f64::NAN);
    }

    #[test]
    #[should_panic(expected = "not finite")]
    fn non_finite_metric_inserted_directly_panics_on_render() {
        let mut out = Output::new();
        out.metrics.insert("loss".into(), f64::INFINITY);
        let _ = out.render();
    }

    #[derive(serde::Deserialize)]
    struct In {
        x: f64,
    }

    fn double(input: In) -> Result<Output, String> {
        if input.x < 0.0 {
            return Err("x must be >= 0".into());
        }
        Ok(Output::new().metric("y", 2.0 * input.x))
    }

    #[test]
    fn execute_parses_runs_and_renders() {
        assert_eq!(
            execute(br#"{"x": 1.5}"#, double).unwrap(),
            br#"{"metrics":{"y":3.0}}"#
        );
        assert!(matches!(execute(b"{", double), Err(GuestError::BadJson(_))));
        assert_eq!(
            execute(br#"{"x": -1}"#, double),
            Err(GuestError::Refused("x must be >= 0".into()))
        );
        let infallible = |i: In| Output::new().metric("x", i.x);
        assert_eq!(
            execute(br#"{"x": 0}"#, infallible).unwrap(),
            br#"{"metrics":{"x":0.0}}"#
        );
    }
}
