//! Configuration: the YAML file ([`file`]), how it is read ([`parse`]) and how it
//! is validated and compiled into an immutable [`crate::snapshot::Snapshot`]
//! ([`compile`]).
//!
//! Every problem found is reported, each with the key path it concerns
//! (`routes[2].upstream: no upstream named "userz"`), so an operator fixes a
//! file in one pass instead of one error per attempt.

mod access;
pub mod compile;
pub mod file;
mod limits;
pub mod values;

use file::{
    AccessLogSpec, AdminSpec, AuthSpec, ConsumerSpec, DurationText, FileConfig, LimitsSpec,
    RedisSpec, RouteSpec, ServerSection, UpstreamSpec,
};
use serde::de::DeserializeOwned;
use serde_yaml::Value;
use std::collections::BTreeMap;
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
        let message = without_userinfo(&self.message);
        if self.location.is_empty() {
            f.write_str(&message)
        } else {
            write!(f, "{}: {}", self.location, message)
        }
    }
}

/// A message with the user info of every URL-like word masked: errors are
/// shown by `-t`, logged on reload and served by `/config`, and a value a
/// parser quotes back (a malformed `redis://:password@host`) may hold a
/// password. Before each `@`, what follows the word's last `/` (or its
/// first `:`, or its start) becomes `***`.
fn without_userinfo(message: &str) -> std::borrow::Cow<'_, str> {
    if !message.contains('@') {
        return std::borrow::Cow::Borrowed(message);
    }
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find('@') {
        let before = &rest[..at];
        let word = before
            .rfind(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '`')
            .map_or(0, |i| i + 1);
        let userinfo = match before[word..].rfind('/') {
            Some(slash) => word + slash + 1,
            None => before[word..]
                .find(':')
                .map_or(word, |colon| word + colon + 1),
        };
        out.push_str(&before[..userinfo]);
        if userinfo < at {
            out.push_str("***");
        }
        out.push('@');
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
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

const TOP_LEVEL_KEYS: &str =
    "server, listen, admin, limits, trust_request_id, trusted_proxies, redis, access_log, slow_request_threshold, auth, consumers, upstreams, routes";

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
    check_shape(text).map_err(|e| ConfigErrors(vec![ConfigError::new("", e)]))?;
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
                "the file must be a mapping with the keys server, listen, admin, limits, upstreams, routes",
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
                if let Some(l) = section::<Vec<file::ListenSpec>>(&key, value, &mut errors) {
                    config.listen = l;
                }
            }
            "admin" => {
                config.admin = section::<Option<AdminSpec>>(&key, value, &mut errors).flatten()
            }
            "limits" => {
                if let Some(l) = section::<LimitsSpec>(&key, value, &mut errors) {
                    config.limits = l;
                }
            }
            "auth" => {
                if let Some(a) = section::<AuthSpec>(&key, value, &mut errors) {
                    config.auth = a;
                }
            }
            "consumers" => {
                if let Some(c) = section::<BTreeMap<String, ConsumerSpec>>(&key, value, &mut errors)
                {
                    config.consumers = c;
                }
            }
            "trust_request_id" => {
                config.trust_request_id = section::<bool>(&key, value, &mut errors);
            }
            "access_log" => {
                config.access_log =
                    section::<Option<AccessLogSpec>>(&key, value, &mut errors).flatten();
            }
            "slow_request_threshold" => {
                config.slow_request_threshold =
                    section::<Option<DurationText>>(&key, value, &mut errors).flatten();
            }
            "redis" => {
                config.redis = section::<Option<RedisSpec>>(&key, value, &mut errors).flatten();
            }
            "trusted_proxies" => {
                if let Some(list) = section::<Vec<String>>(&key, value, &mut errors) {
                    config.trusted_proxies = list;
                }
            }
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

/// The largest config file read: real ones are a few hundred kilobytes at
/// 10,000 routes.
pub const MAX_FILE_BYTES: u64 = 4 << 20;
/// The deepest nesting accepted; the schema itself needs about six levels.
pub const MAX_DEPTH: usize = 64;

/// Refuses, before the YAML parser sees it, a file too large or nested too
/// deep: the parser's time grows steeply with nesting (a 200 KB file of
/// brackets took 40 s of CPU to refuse), and a reload must stay cheap.
///
/// The depth counted is an upper bound of the real one: open flow brackets
/// plus block levels (indentation steps and `- ` entries on a line), with
/// quoted text and comments skipped.
pub fn check_shape(text: &str) -> Result<(), String> {
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "the file is {} bytes; at most {MAX_FILE_BYTES} are read",
            text.len()
        ));
    }
    let too_deep = || format!("the file nests deeper than {MAX_DEPTH} levels");
    let mut flow = 0usize;
    let mut indents: Vec<usize> = Vec::new();
    for line in text.lines() {
        let content = line.trim_start_matches(' ');
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let mut depth_here = 0;
        if flow == 0 {
            let indent = line.len() - content.len();
            while indents.last().is_some_and(|&i| i >= indent) {
                indents.pop();
            }
            indents.push(indent);
            let mut rest = content;
            while let Some(r) = rest.strip_prefix("- ").or_else(|| rest.strip_prefix("? ")) {
                depth_here += 1;
                rest = r.trim_start_matches(' ');
            }
        }
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        for c in content.chars() {
            match quote {
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None => match c {
                    '"' | '\'' => quote = Some(c),
                    '#' if prev == ' ' => break,
                    '[' | '{' => flow += 1,
                    ']' | '}' => flow = flow.saturating_sub(1),
                    _ => {}
                },
            }
            if indents.len() + depth_here + flow > MAX_DEPTH {
                return Err(too_deep());
            }
            prev = c;
        }
        if indents.len() + depth_here + flow > MAX_DEPTH {
            return Err(too_deep());
        }
    }
    Ok(())
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
mod userinfo_tests {
    use super::without_userinfo;

    #[test]
    fn passwords_in_quoted_urls_are_masked() {
        for (message, shown) in [
            (
                "\"redis:///:s3cret@127.0.0.1:1\" is not a Redis URL",
                "\"redis:///***@127.0.0.1:1\" is not a Redis URL",
            ),
            ("\"redis:/:s3cret@h\"", "\"redis:/***@h\""),
            ("\"redis//:s3cret@h\"", "\"redis//***@h\""),
            ("\"redis:s3cret@h\"", "\"redis:***@h\""),
            (
                "invalid type: string \"redis://:s3cret@h:1\", expected struct",
                "invalid type: string \"redis://***@h:1\", expected struct",
            ),
            ("no at sign here", "no at sign here"),
        ] {
            assert_eq!(without_userinfo(message), shown);
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
    fn huge_or_deeply_nested_files_are_refused_before_parsing() {
        let brackets = format!("listen: {}", "[".repeat(100_000));
        let err = parse(&brackets).unwrap_err().to_string();
        assert!(err.contains("nests deeper than 64"), "{err}");
        let mut blocks = String::from("listen:\n");
        for i in 1..80 {
            blocks.push_str(&" ".repeat(i));
            blocks.push_str("a:\n");
        }
        let err = parse(&blocks).unwrap_err().to_string();
        assert!(err.contains("nests deeper than 64"), "{err}");
        let dashes = format!("listen: \n{}x\n", "- ".repeat(70));
        assert!(parse(&dashes).is_err());
        let big = format!("# {}\n", "x".repeat(5 << 20));
        let err = parse(&big).unwrap_err().to_string();
        assert!(err.contains("at most 4194304"), "{err}");
        // Brackets inside quotes and comments are text, not nesting.
        let quoted = format!("listen: [\"{}\"] # {}\n", "[".repeat(100), "{".repeat(100));
        assert!(check_shape(&quoted).is_ok());
    }

    #[test]
    fn yaml_syntax_errors_carry_a_position() {
        let err = parse("listen: [unclosed").unwrap_err();
        assert!(err.to_string().contains("line"), "{err}");
    }
}
