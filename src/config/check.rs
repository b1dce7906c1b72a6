//! Collecting configuration errors with their field path, line and fix, and
//! the value parsers (`${VAR}`, durations, sizes) that produce them.

use std::fmt;
use std::time::Duration;

use serde_saphyr::{Location, Spanned};

/// The longest timeout, lease, `open_for`, `op_timeout` or `shutdown_grace`:
/// each is a wait on one request, attempt or shutdown, and a day is past
/// any that an operator needs while far from where `Instant` arithmetic
/// overflows.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// The longest `ttl`: a replay window of a year is past any retry policy,
/// and its milliseconds are far inside what Redis `PEXPIRE` accepts.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// One problem in the configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// Field path such as `routes[1].timeouts.response` ("" for the file itself).
    pub path: String,
    /// Line and column, 1-based, where the parser gives them.
    pub position: Option<(u64, u64)>,
    pub message: String,
    /// How to fix it.
    pub hint: String,
}

impl ConfigError {
    pub fn new(
        path: impl Into<String>,
        at: Option<&Location>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            path: path.into(),
            position: at.map(|l| (l.line(), l.column())).filter(|(l, _)| *l > 0),
            message: message.into(),
            hint: hint.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.path.is_empty() {
            write!(f, "{}", self.path)?;
        } else {
            write!(f, "config")?;
        }
        if let Some((line, column)) = self.position {
            write!(f, " (line {line}, column {column})")?;
        }
        write!(f, ": {}", self.message)?;
        if !self.hint.is_empty() {
            write!(f, "; {}", self.hint)?;
        }
        Ok(())
    }
}

/// Every problem found in one file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn one(error: ConfigError) -> ConfigErrors {
        ConfigErrors(vec![error])
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "invalid configuration ({n} error{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for error in &self.0 {
            writeln!(f, "  - {error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The validation context: looks up `${VAR}` and collects errors.
pub struct Check<'a> {
    pub errors: Vec<ConfigError>,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> Check<'a> {
    pub fn new(env: &'a dyn Fn(&str) -> Option<String>) -> Check<'a> {
        Check {
            errors: Vec::new(),
            env,
        }
    }

    pub fn fail(
        &mut self,
        path: &str,
        at: Option<&Location>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.errors.push(ConfigError::new(path, at, message, hint));
    }

    /// A string value with `${VAR}` replaced from the environment.
    pub fn text(&mut self, path: &str, value: &Spanned<String>) -> Option<String> {
        match expand(&value.value, self.env) {
            Ok(text) => Some(text),
            Err(Missing::Var(var)) => {
                self.fail(
                    path,
                    Some(&value.referenced),
                    format!("environment variable {var} is not set"),
                    format!("export {var}=... before starting idemgate, or write the value"),
                );
                None
            }
            Err(Missing::Brace) => {
                self.fail(
                    path,
                    Some(&value.referenced),
                    "an unterminated or empty ${...}",
                    "write ${NAME}: a variable's name in braces",
                );
                None
            }
            Err(Missing::Name(name)) => {
                // Named by what came before the first other character, if anything.
                let shown = if name.is_empty() {
                    "NAME"
                } else {
                    name.as_str()
                };
                self.fail(
                    path,
                    Some(&value.referenced),
                    format!(
                        "${{{name}...}} is not a variable's name (letters, digits and _, no digit first)"
                    ),
                    format!("write ${{{shown}}}: defaults and other shell forms (${{{shown}:-...}}) are not supported"),
                );
                None
            }
        }
    }

    /// A positive duration no longer than `max`: past a bound no operator
    /// needs, `Instant + duration` overflows (a panic per request) and Redis
    /// refuses the expiry.
    pub fn duration(
        &mut self,
        path: &str,
        value: &Spanned<String>,
        max: Duration,
    ) -> Option<Duration> {
        let text = self.text(path, value)?;
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d.is_zero() => {
                self.fail(
                    path,
                    Some(&value.referenced),
                    "a duration of zero is not allowed",
                    "write a positive duration such as 250ms, 3s or 24h",
                );
                None
            }
            // Times go to the store and the timers in whole milliseconds: a
            // `ttl: 500us` was 0 ms on Redis, and every completion failed.
            Ok(d) if d < Duration::from_millis(1) => {
                self.fail(
                    path,
                    Some(&value.referenced),
                    format!("{} is shorter than 1ms", quote(value)),
                    "write a duration of at least 1ms, such as 250ms, 3s or 24h",
                );
                None
            }
            Ok(d) if d > max => {
                let max = show_duration(max);
                self.fail(
                    path,
                    Some(&value.referenced),
                    format!("{} is longer than the maximum of {max}", quote(value)),
                    format!("write a duration of at most {max}"),
                );
                None
            }
            Ok(d) => Some(d),
            Err(_) => {
                self.fail(
                    path,
                    Some(&value.referenced),
                    format!("{} is not a duration", quote(value)),
                    "write a number with a unit, such as 250ms, 3s or 24h",
                );
                None
            }
        }
    }

    pub fn size(&mut self, path: &str, value: &Spanned<String>) -> Option<u64> {
        let text = self.text(path, value)?;
        match text.trim().parse::<bytesize::ByteSize>() {
            // The parser saturates: 99999999999999999999KiB read as 16 EiB.
            Ok(size) if size.as_u64() == u64::MAX => {
                self.fail(
                    path,
                    Some(&value.referenced),
                    format!("{} is too large", quote(value)),
                    "write a size such as 512KiB or 1MiB",
                );
                None
            }
            Ok(size) => Some(size.as_u64()),
            Err(_) => {
                self.fail(
                    path,
                    Some(&value.referenced),
                    format!("{} is not a size", quote(value)),
                    "write a number with a unit, such as 512KiB or 1MiB",
                );
                None
            }
        }
    }

    /// One of a fixed set of words.
    pub fn choice<T: Copy>(
        &mut self,
        path: &str,
        value: &Spanned<String>,
        options: &[(&str, T)],
    ) -> Option<T> {
        let text = self.text(path, value)?;
        if let Some((_, v)) = options.iter().find(|(name, _)| *name == text) {
            return Some(*v);
        }
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        self.fail(
            path,
            Some(&value.referenced),
            format!("{} is not allowed", quote(value)),
            format!("write one of: {}", names.join(", ")),
        );
        None
    }
}

impl Check<'_> {
    /// A count of at least 1 (a limit or a threshold), or `default` when the
    /// file leaves it out. Zero is an error, not silently raised to 1;
    /// `more` adds to the fix (another way to get what zero might mean).
    pub fn count<T>(
        &mut self,
        path: &str,
        value: Option<&Spanned<T>>,
        default: T,
        more: &str,
    ) -> Option<T>
    where
        T: Copy + Default + PartialEq + std::fmt::Display,
    {
        let Some(value) = value else {
            return Some(default);
        };
        if value.value != T::default() {
            return Some(value.value);
        }
        let name = path.rsplit('.').next().unwrap_or(path);
        self.fail(
            path,
            Some(&value.referenced),
            format!("{name} must be at least 1"),
            format!("raise it, or remove it for the default of {default}{more}"),
        );
        None
    }
}

/// A value as the file spells it, for an error message. Never the value
/// after `${VAR}` expansion: a variable may hold a secret (a password in a
/// URL, a token), and these messages reach logs and the reload answer.
pub fn quote(value: &Spanned<String>) -> String {
    if value.value.contains("${") {
        format!("{:?} (with its ${{...}} expanded)", value.value)
    } else {
        format!("{:?}", value.value)
    }
}

enum Missing {
    Var(String),
    Brace,
    /// Not a variable's name: what came before its first other character.
    Name(String),
}

/// Replaces every `${VAR}` in `text`. `$$` is not special; only `${` starts a reference.
fn expand(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, Missing> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or(Missing::Brace)?;
        let name = &after[..end];
        if name.is_empty() {
            return Err(Missing::Brace);
        }
        // Regression (an audit): `${URL:-http://..}` was looked up whole,
        // and said to be unset with `export URL:-http://..=...` as the fix.
        // A name as a shell takes one: letters, digits and _, no digit first.
        let valid = |i: usize, ch: char| {
            ch == '_' || ch.is_ascii_alphabetic() || (i > 0 && ch.is_ascii_digit())
        };
        if let Some((i, _)) = name.char_indices().find(|&(i, ch)| !valid(i, ch)) {
            return Err(Missing::Name(name[..i].to_owned()));
        }
        out.push_str(&env(name).ok_or_else(|| Missing::Var(name.to_owned()))?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// An authority (`host[:port]`) with a host and, where it names a port, one
/// from 1 to 65535: `http` reads a port lazily, and one it cannot read
/// (`:90000`, `:x`) would silently be the scheme's default.
pub fn authority_ok(authority: &http::uri::Authority) -> bool {
    let text = authority.as_str();
    let port = match text.rfind(':') {
        // An IPv6 literal without a port ends with ']'.
        Some(i) if !text[i..].contains(']') => Some(&text[i + 1..]),
        _ => None,
    };
    !authority.host().is_empty() && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0))
}

/// A duration as an operator writes one: whole days as `365d` (humantime
/// would say "11months 30days 3h 50m 24s", its months being 30.44 days),
/// anything else as humantime formats it (`1h 30m`, `250ms`).
pub fn show_duration(d: std::time::Duration) -> String {
    const DAY: u64 = 86_400;
    if d.subsec_nanos() == 0 && d.as_secs() >= DAY && d.as_secs().is_multiple_of(DAY) {
        return format!("{}d", d.as_secs() / DAY);
    }
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "TOKEN").then(|| "s3cret".to_owned())
    }

    #[test]
    fn expand_replaces_every_reference() {
        assert!(matches!(expand("a${TOKEN}b${TOKEN}", &env), Ok(s) if s == "as3cretbs3cret"));
        assert!(matches!(expand("no vars", &env), Ok(s) if s == "no vars"));
        assert!(matches!(expand("${NOPE}", &env), Err(Missing::Var(v)) if v == "NOPE"));
        assert!(matches!(expand("${TOKEN", &env), Err(Missing::Brace)));
        assert!(matches!(expand("a${}b", &env), Err(Missing::Brace)));
    }
}
