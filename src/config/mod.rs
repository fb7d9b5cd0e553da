//! Configuration: the YAML file ([`file`]), how it is read ([`parse`]) and how it
//! is validated and compiled into an immutable [`crate::snapshot::Snapshot`]
//! ([`compile`]).
//!
//! Every problem found is reported, each with the key path it concerns
//! (`routes[2].upstream: no upstream named "userz"`), so an operator fixes a
//! file in one pass instead of one error per attempt.

pub mod compile;
pub mod file;
pub mod values;

use file::{FileConfig, RouteSpec, ServerSection, UpstreamSpec};
use serde::de::DeserializeOwned;
use serde_yaml::Value;
use std::fmt;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Key path, e.g. `routes[2].upstream`; empty for whole-file problems.
    pub location: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(location: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            location: location.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.location.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.location, self.message)
        }
    }
}

/// Every problem found in a config file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

const TOP_LEVEL_KEYS: &str = "server, listen, admin, upstreams, routes";

/// Reads the file's text into its typed form. Each section, each upstream and
/// each route is deserialized on its own, so one mistake does not hide others.
pub fn parse(text: &str) -> Result<FileConfig, ConfigErrors> {
    let (config, errors) = parse_partial(text)?;
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Like [`parse`], but returns what did parse along with the errors, so that
/// validation can still report problems in the well-formed parts. Fails
/// outright only when the file is not YAML or not a mapping.
pub fn parse_partial(text: &str) -> Result<(FileConfig, Vec<ConfigError>), ConfigErrors> {
    let root: Value = serde_yaml::from_str(text)
        .map_err(|e| ConfigErrors(vec![ConfigError::new("", format!("invalid YAML: {e}"))]))?;
    let mut errors = Vec::new();
    let mut config = FileConfig::default();
    let root = match root {
        Value::Mapping(m) => m,
        Value::Null => {
            return Err(ConfigErrors(vec![ConfigError::new(
                "",
                "the file is empty",
            )]));
        }
        _ => {
            return Err(ConfigErrors(vec![ConfigError::new(
                "",
                "the file must be a mapping with the keys server, listen, admin, upstreams, routes",
            )]));
        }
    };
    for (key, value) in root {
        let Some(key) = key.as_str().map(str::to_owned) else {
            errors.push(ConfigError::new("", format!("non-string key {key:?}")));
            continue;
        };
        match key.as_str() {
            "server" => {
                if let Some(s) = section::<ServerSection>(&key, value, &mut errors) {
                    config.server = s;
                }
            }
            "listen" => {
                if let Some(l) = section::<Vec<String>>(&key, value, &mut errors) {
                    config.listen = l;
                }
            }
            "admin" => config.admin = section::<Option<String>>(&key, value, &mut errors).flatten(),
            "upstreams" => parse_upstreams(value, &mut config, &mut errors),
            "routes" => parse_routes(value, &mut config, &mut errors),
            other => errors.push(ConfigError::new(
                other,
                format!("unknown key (expected one of {TOP_LEVEL_KEYS})"),
            )),
        }
    }
    Ok((config, errors))
}

/// Deserializes one subtree, recording an error under `location` extended
/// with the path inside the subtree (`upstreams.a.timeouts.connect`).
fn section<T: DeserializeOwned>(
    location: &str,
    value: Value,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    match serde_path_to_error::deserialize(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            let at = if inner == "." {
                location.to_owned()
            } else if inner.starts_with('[') {
                format!("{location}{inner}")
            } else {
                format!("{location}.{inner}")
            };
            errors.push(ConfigError::new(at, e.into_inner().to_string()));
            None
        }
    }
}

fn parse_upstreams(value: Value, config: &mut FileConfig, errors: &mut Vec<ConfigError>) {
    let map = match value {
        Value::Mapping(m) => m,
        Value::Null => return,
        _ => {
            errors.push(ConfigError::new(
                "upstreams",
                "expected a mapping of upstream name to upstream",
            ));
            return;
        }
    };
    for (name, spec) in map {
        let Some(name) = name.as_str().map(str::to_owned) else {
            errors.push(ConfigError::new(
                "upstreams",
                format!("non-string upstream name {name:?}"),
            ));
            continue;
        };
        let location = format!("upstreams.{name}");
        match section::<UpstreamSpec>(&location, spec, errors) {
            Some(spec) => {
                config.upstreams.insert(name, spec);
            }
            None => {
                config.unparsed_upstreams.insert(name);
            }
        }
    }
}

fn parse_routes(value: Value, config: &mut FileConfig, errors: &mut Vec<ConfigError>) {
    let list = match value {
        Value::Sequence(s) => s,
        Value::Null => return,
        _ => {
            errors.push(ConfigError::new("routes", "expected a list of routes"));
            return;
        }
    };
    for (i, spec) in list.into_iter().enumerate() {
        if let Some(route) = section::<RouteSpec>(&format!("routes[{i}]"), spec, errors) {
            config.routes.push(route);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_errors_at_every_level() {
        let text = r#"
listen: ["127.0.0.1:1"]
bogus: 1
upstreams:
  a:
    targets: ["127.0.0.1:2"]
    timeouts: { conect: 1s }
routes:
  - { name: r, path_prefix: /, upstream: a, colour: red }
"#;
        let errors = parse(text).unwrap_err().0;
        let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 3, "{shown:#?}");
        assert!(shown[0].starts_with("bogus: unknown key"), "{shown:#?}");
        assert!(
            shown[1].starts_with("upstreams.a.timeouts") && shown[1].contains("conect"),
            "{shown:#?}"
        );
        assert!(
            shown[2].starts_with("routes[0].colour: unknown field"),
            "{shown:#?}"
        );
    }

    #[test]
    fn yaml_syntax_errors_carry_a_position() {
        let err = parse("listen: [unclosed").unwrap_err();
        assert!(err.to_string().contains("line"), "{err}");
    }
}
