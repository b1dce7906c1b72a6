//! Reading the idempotency key from a request and deriving its storage key.

use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

use super::hex;

/// Why a request's key header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    Missing,
    Invalid(&'static str),
}

/// The client's key, unquoted when it came as a Structured-Field string.
pub fn read_key(
    headers: &HeaderMap,
    name: &HeaderName,
    max_len: usize,
) -> Result<String, KeyError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Err(KeyError::Missing);
    };
    if values.next().is_some() {
        return Err(KeyError::Invalid("the key header appears more than once"));
    }
    let raw = value.as_bytes();
    let key = if raw.first() == Some(&b'"') {
        unquote(raw).ok_or(KeyError::Invalid("the quoted key is not a valid string"))?
    } else {
        raw.to_vec()
    };
    if key.is_empty() {
        return Err(KeyError::Invalid("the key is empty"));
    }
    if key.len() > max_len {
        return Err(KeyError::Invalid(
            "the key is longer than this route allows",
        ));
    }
    if !key.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(KeyError::Invalid(
            "the key must be visible ASCII (no spaces)",
        ));
    }
    Ok(String::from_utf8(key).expect("visible ASCII is UTF-8"))
}

/// A key as an operator writes it (the admin API's path, `keys --key`), in
/// the form the proxy stores it: a Structured-Field string unquoted, as
/// [`read_key`] does (regression, an audit: `"quoted"`, as the client sent
/// it, was not found; the record is under `quoted`). Anything else as is.
pub fn stored_form(text: &str) -> String {
    match unquote(text.as_bytes()) {
        Some(key) if text.starts_with('"') => {
            String::from_utf8(key).unwrap_or_else(|_| text.to_owned())
        }
        _ => text.to_owned(),
    }
}

/// RFC 8941 sf-string: `"` ... `"` with `\"` and `\\` escapes only.
fn unquote(raw: &[u8]) -> Option<Vec<u8>> {
    let inner = raw.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    let mut out = Vec::with_capacity(inner.len());
    let mut bytes = inner.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some(&e @ (b'"' | b'\\')) => out.push(e),
                _ => return None,
            },
            b'"' => return None,
            _ => out.push(b),
        }
    }
    Some(out)
}

/// A scope as an operator gives it (`?scope=`, `--scope`): the 64 hex
/// digits of [`scope_hash`], in either case. Anything else is refused: on
/// Redis it would be pasted into the storage key, where `S:sc` and key
/// `an` name the record of key `sc:an` in scope `S`.
pub fn parse_scope(text: &str) -> Result<String, String> {
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(text.to_ascii_lowercase())
    } else {
        Err("a scope is the 64 hex digits of a SHA-256, as GET /keys/{route}/{key} lists it".into())
    }
}

/// Hex SHA-256 of the scope header values: keys of different callers never collide.
pub fn scope_hash(headers: &HeaderMap, scope: &[HeaderName]) -> String {
    let mut hasher = Sha256::new();
    for name in scope {
        hasher.update(name.as_str().as_bytes());
        for value in headers.get_all(name) {
            hasher.update(b"\x00");
            hasher.update(value.as_bytes());
        }
        hasher.update(b"\x01");
    }
    let digest: [u8; 32] = hasher.finalize().into();
    hex(&digest)
}

/// Where one record lives in the store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StorageKey {
    pub route: String,
    pub scope: String,
    pub key: String,
}

impl StorageKey {
    /// Route `r`, scope `s`, key `name`: for unit tests.
    #[cfg(test)]
    pub fn named(name: &str) -> StorageKey {
        StorageKey {
            route: "r".into(),
            scope: "s".into(),
            key: name.into(),
        }
    }

    /// The store's key string. Everything after the prefix sits inside one
    /// `{...}` hash tag so that a record (and anything derived from its
    /// name) stays in one Redis Cluster slot. A `}` inside the client's key
    /// only shortens the tag, deterministically.
    pub fn encode(&self, prefix: &str) -> String {
        self.encoded_parts(prefix).concat()
    }

    /// The pieces of [`StorageKey::encode`], for writing them straight
    /// into a buffer.
    pub fn encoded_parts<'a>(&'a self, prefix: &'a str) -> [&'a str; 8] {
        [
            prefix,
            "{",
            &self.route,
            ":",
            &self.scope,
            ":",
            &self.key,
            "}",
        ]
    }

    /// The inverse of [`StorageKey::encode`].
    pub fn decode(prefix: &str, name: &str) -> Option<StorageKey> {
        let inner = name
            .strip_prefix(prefix)?
            .strip_prefix('{')?
            .strip_suffix('}')?;
        let (route, rest) = inner.split_once(':')?;
        let (scope, key) = rest.split_once(':')?;
        Some(StorageKey {
            route: route.into(),
            scope: scope.into(),
            key: key.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append("idempotency-key", HeaderValue::from_str(v).unwrap());
        }
        map
    }

    fn read(values: &[&str]) -> Result<String, KeyError> {
        read_key(
            &headers(values),
            &HeaderName::from_static("idempotency-key"),
            16,
        )
    }

    #[test]
    fn key_table() {
        assert_eq!(read(&[]), Err(KeyError::Missing));
        assert_eq!(read(&["abc"]), Ok("abc".into()));
        assert_eq!(read(&["\"abc\""]), Ok("abc".into()));
        assert_eq!(read(&[r#""a\"b\\c""#]), Ok(r#"a"b\c"#.into()));
        assert!(matches!(read(&["\"abc"]), Err(KeyError::Invalid(_))));
        assert!(matches!(read(&[r#""a\nb""#]), Err(KeyError::Invalid(_))));
        assert!(matches!(read(&["a b"]), Err(KeyError::Invalid(_))));
        assert!(matches!(read(&["\"\""]), Err(KeyError::Invalid(_))));
        assert!(matches!(read(&[""]), Err(KeyError::Invalid(_))));
        assert!(matches!(read(&["a", "b"]), Err(KeyError::Invalid(_))));
        assert_eq!(read(&["0123456789abcdef"]), Ok("0123456789abcdef".into()));
        assert!(matches!(
            read(&["0123456789abcdefg"]),
            Err(KeyError::Invalid(_))
        ));
    }

    #[test]
    fn scopes_differ_by_credentials() {
        let scope = [http::header::AUTHORIZATION];
        let mut a = HeaderMap::new();
        a.insert("authorization", HeaderValue::from_static("Bearer a"));
        let mut b = HeaderMap::new();
        b.insert("authorization", HeaderValue::from_static("Bearer b"));
        assert_ne!(scope_hash(&a, &scope), scope_hash(&b, &scope));
        assert_eq!(scope_hash(&a, &scope), scope_hash(&a.clone(), &scope));
        assert_eq!(scope_hash(&a, &scope).len(), 64);
    }

    #[test]
    fn storage_key_is_one_hash_tag() {
        let key = StorageKey {
            route: "orders".into(),
            scope: "ab".into(),
            key: "k1".into(),
        };
        assert_eq!(key.encode("idemgate:"), "idemgate:{orders:ab:k1}");
        let odd = StorageKey {
            route: "r".into(),
            scope: "ab".into(),
            key: "a:b}{c".into(),
        };
        assert_eq!(StorageKey::decode("p:", &odd.encode("p:")), Some(odd));
    }
}
