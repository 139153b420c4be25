//! An optional TOML configuration file under clap's flags and environment variables, shared by
//! `accrete-server` and `accrete-worker`. Precedence: flags > environment > file > defaults.
//!
//! The file's keys are the long flag names (`max-module-bytes` or `max_module_bytes`); a value
//! from the file is used only where neither a flag nor an environment variable gave one. It is
//! applied by appending the file's values as flags and parsing again, so clap validates them
//! exactly as it validates the command line.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::parser::ValueSource;
use clap::{ArgAction, Parser};

/// Parses the process's arguments into `T`, merging the TOML file named by the argument whose id
/// is `config` (a `PathBuf`; give it `env` too). Exits like clap on `--help` or a bad flag.
pub fn parse<T: Parser>() -> anyhow::Result<T> {
    parse_from(std::env::args_os().collect())
}

/// [`parse`] over an explicit argument list (the program name first), for tests.
pub fn parse_from<T: Parser>(argv: Vec<OsString>) -> anyhow::Result<T> {
    let cmd = T::command();
    let first = match cmd.clone().ignore_errors(true).try_get_matches_from(&argv) {
        Ok(m) => m,
        Err(e) => e.exit(),
    };
    let Some(path) = first.get_one::<PathBuf>("config").cloned() else {
        return Ok(T::parse_from(argv));
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))?;
    let mut extra: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let id = key.replace('-', "_");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id().as_str() == id && a.get_long().is_some())
            .with_context(|| format!("{}: unknown setting {key:?}", path.display()))?;
        let given = matches!(
            first.value_source(&id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if given || id == "config" {
            continue;
        }
        let long = format!("--{}", arg.get_long().unwrap_or_default());
        let values: Vec<&toml::Value> = match value {
            toml::Value::Array(items) => items.iter().collect(),
            v => vec![v],
        };
        for v in values {
            match (v, arg.get_action()) {
                (toml::Value::Boolean(true), ArgAction::SetTrue) => extra.push(long.clone().into()),
                (toml::Value::Boolean(false), ArgAction::SetTrue) => {}
                (toml::Value::String(s), _) => extra.push(format!("{long}={s}").into()),
                (toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_), _) => {
                    extra.push(format!("{long}={v}").into())
                }
                _ => anyhow::bail!("{}: setting {key:?} has an unusable value", path.display()),
            }
        }
    }
    // Right after the program name, so they land before any subcommand.
    let mut all = argv;
    let at = 1.min(all.len());
    all.splice(at..at, extra);
    let matches = match cmd.try_get_matches_from(&all) {
        Ok(m) => m,
        Err(e) => e.exit(),
    };
    T::from_arg_matches(&matches).map_err(|e| anyhow::anyhow!("{e}"))
}
