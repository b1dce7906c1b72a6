//! The request fingerprint: SHA-256 over what makes two requests "the same".

use std::borrow::Cow;

use http::{HeaderMap, HeaderName, Method, Uri};
use sha2::{Digest, Sha256};

use super::hex;

/// Marks a length field as a header's value count (see [`fingerprint`]).
const COUNT_MARK: u64 = 1 << 63;

/// Hex SHA-256 over method, path, query (optional), the configured headers
/// and the body. Every part is length-prefixed, and a configured header
/// that a request sends other than exactly once is preceded by its count, so
/// that no two different requests can produce the same byte stream.
///
/// The count is a part of its own whose length field has the top bit set
/// (no real part is that long): a header sent once hashes exactly as it did
/// before the count existed, so records made by earlier versions still match.
pub fn fingerprint(
    method: &Method,
    uri: &Uri,
    include_query: bool,
    headers: &HeaderMap,
    names: &[HeaderName],
    body: &[u8],
) -> String {
    let mut hasher = Sha256::new();
    // In upper case: methods are gated without regard to case (`post` as
    // `POST`), so a retry that differs only there is the same request
    // (regression, an audit: 422). Standard methods are upper case already.
    let method = method.as_str();
    match method.bytes().any(|b| b.is_ascii_lowercase()) {
        true => part_of(&mut hasher, method.to_ascii_uppercase().as_bytes()),
        false => part_of(&mut hasher, method.as_bytes()),
    }
    part_of(&mut hasher, uri.path().as_bytes());
    // The path is made normal before routing (`crate::path`); the query,
    // forwarded as sent, is read the same way here: `?to=a%2fb` and
    // `?to=a%2Fb` are one request (regression: the retry of a client whose
    // library escapes the other way got 422).
    let query = match uri.query() {
        Some(query) if include_query && query.contains('%') => {
            Cow::Owned(crate::path::decode_unreserved(query))
        }
        Some(query) if include_query => Cow::Borrowed(query),
        _ => Cow::Borrowed(""),
    };
    part_of(&mut hasher, query.as_bytes());
    for name in names {
        part_of(&mut hasher, name.as_str().as_bytes());
        let values = headers.get_all(name);
        let count = values.iter().count() as u64;
        if count != 1 {
            hasher.update((COUNT_MARK | count).to_be_bytes());
        }
        for value in values {
            part_of(&mut hasher, value.as_bytes());
        }
    }
    part_of(&mut hasher, body);
    let digest: [u8; 32] = hasher.finalize().into();
    hex(&digest)
}

/// One length-prefixed part.
fn part_of(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_be_bytes());
    hasher.update(bytes);
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
    fn a_method_s_case_does_not_change_the_fingerprint() {
        let lower = Method::from_bytes(b"post").unwrap();
        let mixed = Method::from_bytes(b"PaTcH").unwrap();
        let ct = "application/json";
        assert_eq!(
            fp(lower, "/a", false, ct, b"{}"),
            fp(Method::POST, "/a", false, ct, b"{}")
        );
        assert_eq!(
            fp(mixed, "/a", false, ct, b"{}"),
            fp(Method::PATCH, "/a", false, ct, b"{}")
        );
        assert_ne!(
            fp(Method::PUT, "/a", false, ct, b"{}"),
            fp(Method::POST, "/a", false, ct, b"{}")
        );
    }

    fn fp_headers(lines: &[(&'static str, &'static str)]) -> String {
        let mut headers = HeaderMap::new();
        for (name, value) in lines {
            headers.append(*name, value.parse().unwrap());
        }
        let names = [HeaderName::from_static("a"), HeaderName::from_static("b")];
        fingerprint(
            &Method::POST,
            &"/".parse().unwrap(),
            false,
            &headers,
            &names,
            b"",
        )
    }

    #[test]
    fn a_value_moved_from_one_configured_header_to_the_next_differs() {
        // With headers [a, b], "a: b" and no b hashed as no a and "b: b"
        // did: the value of a looked like the name of b.
        assert_ne!(fp_headers(&[("a", "b")]), fp_headers(&[("b", "b")]));
        assert_ne!(
            fp_headers(&[("a", "x"), ("a", "y")]),
            fp_headers(&[("a", "x"), ("b", "y")])
        );
        assert_ne!(fp_headers(&[]), fp_headers(&[("a", "")]));
    }

    #[test]
    fn a_header_sent_once_hashes_as_before_counts_existed() {
        // Records stored by earlier versions must still match their retries.
        let mut hasher = Sha256::new();
        for part in [&b"POST"[..], b"/", b"", b"a", b"1", b"b", b"2", b""] {
            part_of(&mut hasher, part);
        }
        let digest: [u8; 32] = hasher.finalize().into();
        assert_eq!(fp_headers(&[("a", "1"), ("b", "2")]), hex(&digest));
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
        // Escapes that name one character are one request (RFC 3986 6.2.2).
        assert_eq!(base, fp(Method::POST, "/a?%78=%31", true, "json", b"{}"));
        assert_eq!(
            fp(Method::POST, "/a?to=a%2fb%c3%a9", true, "json", b"{}"),
            fp(Method::POST, "/a?to=a%2Fb%C3%A9", true, "json", b"{}")
        );
        assert_ne!(
            fp(Method::POST, "/a?to=a%2Fb", true, "json", b"{}"),
            fp(Method::POST, "/a?to=a/b", true, "json", b"{}")
        );
        // Without fingerprint.query the query does not count.
        assert_eq!(
            fp(Method::POST, "/a?x=1", false, "json", b""),
            fp(Method::POST, "/a?x=2", false, "json", b"")
        );
    }
}
