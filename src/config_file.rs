//! `--config hato.toml`: every flag has a key (its long name with `_`
//! for `-`: `signaling_addr`, `max_connections`, …). Precedence: flag >
//! environment > file > default. An unknown key, or a value the flag would
//! refuse, stops start-up with a message that names it.
//!
//! The file is turned into the flags it stands for and parsed by the same
//! clap parser as the command line, so a key takes exactly the values its
//! flag takes; keys whose flag or variable is given are left out.

use crate::Config;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use std::ffi::OsString;

/// Parses the command line, the environment and, when `--config` names
/// one, the file; returns the configuration and the matches it came from
/// (for `--print-config`). An error is what to print before exiting.
pub fn load(args: Vec<OsString>) -> Result<(Config, ArgMatches), clap::Error> {
    let matches = Config::command().try_get_matches_from(&args)?;
    let Some(path) = matches.get_one::<std::path::PathBuf>("config").cloned() else {
        let config = Config::from_arg_matches(&matches)?;
        return Ok((config, matches));
    };
    let fail =
        |message: String| Config::command().error(clap::error::ErrorKind::InvalidValue, message);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| fail(format!("{}: cannot read: {e}", path.display())))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| fail(format!("{}: not TOML: {e}", path.display())))?;
    let command = Config::command();
    let mut argv = args.clone();
    for (key, value) in &table {
        let arg = command
            .get_arguments()
            .find(|a| a.get_id().as_str() == key && a.get_long().is_some() && key != "config")
            .ok_or_else(|| fail(format!("{}: unknown key {key:?}", path.display())))?;
        // A flag or a variable wins over the file.
        if matches!(
            matches.value_source(key),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let flag = format!("--{}", arg.get_long().expect("checked"));
        let takes_value = arg.get_action().takes_values();
        let values: Vec<&toml::Value> = match value {
            toml::Value::Array(items) => items.iter().collect(),
            one => vec![one],
        };
        for v in values {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(fail(format!(
                        "{}: {key}: {other} is not a string, number or boolean",
                        path.display()
                    )))
                }
            };
            if takes_value {
                argv.push(flag.clone().into());
                argv.push(text.into());
            } else {
                match v {
                    toml::Value::Boolean(true) => argv.push(flag.clone().into()),
                    toml::Value::Boolean(false) => {}
                    _ => {
                        return Err(fail(format!(
                            "{}: {key} must be true or false",
                            path.display()
                        )))
                    }
                }
            }
        }
    }
    let matches = Config::command().try_get_matches_from(&argv).map_err(|e| {
        let text = e.to_string();
        let first = text.lines().next().unwrap_or_default();
        fail(format!(
            "{}: {}",
            path.display(),
            first.trim_start_matches("error: ")
        ))
    })?;
    let config = Config::from_arg_matches(&matches)?;
    Ok((config, matches))
}

/// The effective configuration as TOML: every key, whatever set it (the
/// API token, and credentials and query strings in URLs, masked).
pub fn to_toml(matches: &ArgMatches) -> String {
    let mut out = String::from("# hato's effective configuration (hato --print-config)\n");
    for arg in Config::command().get_arguments() {
        let id = arg.get_id().as_str();
        if arg.get_long().is_none() || matches!(id, "config" | "print_config") {
            continue;
        }
        let values: Vec<String> = matches
            .get_raw(id)
            .map(|v| v.map(|s| s.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let value = match (id, &values[..]) {
            (_, []) => continue,
            ("api_token" | "auth_jwt_secret", _) => toml::Value::String("<set>".into()),
            ("cluster_nats_url" | "auth_webhook_url" | "event_webhook_url", [one]) => {
                toml::Value::String(redact_urls(one))
            }
            ("public_ips" | "trusted_proxy", many) => {
                toml::Value::Array(many.iter().map(|v| typed(v)).collect())
            }
            (_, [one]) => typed(one),
            (_, many) => toml::Value::Array(many.iter().map(|v| typed(v)).collect()),
        };
        out.push_str(&format!("{id} = {value}\n"));
    }
    out
}

/// URLs (comma-separated) with their user information and query string
/// masked: `nats://user:pass@host` → `nats://<set>@host`, so that a
/// printed configuration or an error message never shows a secret.
pub fn redact_urls(urls: &str) -> String {
    urls.split(',')
        .map(|u| {
            let (scheme, rest) = u.split_once("://").unwrap_or(("", u));
            let (rest, query) = match rest.split_once('?') {
                Some((r, _)) => (r, "?<set>"),
                None => (rest, ""),
            };
            let end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(end);
            let authority = match authority.rsplit_once('@') {
                Some((_, host)) => format!("<set>@{host}"),
                None => authority.to_owned(),
            };
            let sep = if scheme.is_empty() { "" } else { "://" };
            format!("{scheme}{sep}{authority}{path}{query}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A number or boolean as such, anything else as a string.
fn typed(v: &str) -> toml::Value {
    if let Ok(i) = v.parse::<i64>() {
        toml::Value::Integer(i)
    } else if let Ok(b) = v.parse::<bool>() {
        toml::Value::Boolean(b)
    } else {
        toml::Value::String(v.to_owned())
    }
}
