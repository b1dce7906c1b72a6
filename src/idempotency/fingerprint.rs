//! The request fingerprint: SHA-256 over what makes two requests "the same".

use http::{HeaderMap, HeaderName, Method, Uri};
use sha2::{Digest, Sha256};

use super::hex;

/// Hex SHA-256 over method, path, query (optional), the configured headers
/// and the body. Every part is length-prefixed so that no two different
/// requests can produce the same byte stream.
pub fn fingerprint(
    method: &Method,
    uri: &Uri,
    include_query: bool,
    headers: &HeaderMap,
    names: &[HeaderName],
    body: &[u8],
) -> String {
    let mut hasher = Sha256::new();
    let mut part = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    part(method.as_str().as_bytes());
    part(uri.path().as_bytes());
    part(if include_query {
        uri.query().unwrap_or("").as_bytes()
    } else {
        b""
    });
    for name in names {
        part(name.as_str().as_bytes());
        for value in headers.get_all(name) {
            part(value.as_bytes());
        }
    }
    part(body);
    let digest: [u8; 32] = hasher.finalize().into();
    hex(&digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(method: Method, uri: &str, query: bool, ct: &str, body: &[u8]) -> String {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", ct.parse().unwrap());
        headers.insert("x-other", "ignored".parse().unwrap());
        fingerprint(
            &method,
            &uri.parse().unwrap(),
            query,
            &headers,
            &[http::header::CONTENT_TYPE],
            body,
        )
    }

    #[test]
    fn every_part_counts() {
        let base = fp(Method::POST, "/a?x=1", true, "json", b"{}");
        assert_eq!(base, fp(Method::POST, "/a?x=1", true, "json", b"{}"));
        assert_ne!(base, fp(Method::PATCH, "/a?x=1", true, "json", b"{}"));
        assert_ne!(base, fp(Method::POST, "/b?x=1", true, "json", b"{}"));
        assert_ne!(base, fp(Method::POST, "/a?x=2", true, "json", b"{}"));
        assert_ne!(base, fp(Method::POST, "/a?x=1", true, "text", b"{}"));
        assert_ne!(base, fp(Method::POST, "/a?x=1", true, "json", b"{ }"));
        // Without fingerprint.query the query does not count.
        assert_eq!(
            fp(Method::POST, "/a?x=1", false, "json", b""),
            fp(Method::POST, "/a?x=2", false, "json", b"")
        );
    }
}
