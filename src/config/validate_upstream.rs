//! Validation of `upstreams` entries and of every TLS file the
//! configuration names (read and parsed, so `check` catches bad PEM files).

use std::path::PathBuf;
use std::time::Duration;

use super::check::{Check, MAX_WAIT, authority_ok, quote};
use super::file::{ScalarOr, Text, UpstreamFile, UpstreamTlsFile};
use super::{Breaker, UpstreamConfig, UpstreamTls};

/// How long an unused upstream connection is kept: below the 5 s keep-alive
/// timeout of Node.js, Apache httpd and uvicorn, so that a request is not
/// sent on a connection such an upstream is closing.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

pub(super) fn build_upstream(
    c: &mut Check,
    name: &str,
    name_at: Option<&serde_saphyr::Location>,
    u: &UpstreamFile,
) -> Option<UpstreamConfig> {
    let path = format!("upstreams.{name}");
    // Regression (config audit): any name was taken, a newline too, and
    // went raw into metrics labels, log lines and `check`'s summary.
    if !super::validate::name_ok(name) {
        c.fail(
            &format!("upstreams.{name:?}"),
            name_at.or(Some(&u.url.referenced)),
            format!("upstream name {name:?} is not allowed"),
            "use letters, digits, '-', '_' and '.' (the name appears in metrics and log lines)",
        );
    }
    let url_path = format!("{path}.url");
    let text = c.text(&url_path, &u.url);
    let uri: Option<http::Uri> = text.as_ref().and_then(|t| t.parse().ok());
    // `user:password@` would go out verbatim in every request's Host header
    // (and credentials for the upstream belong in a header the client sends).
    let userinfo = uri
        .as_ref()
        .and_then(|uri| uri.authority())
        .is_some_and(|a| a.as_str().contains('@'));
    let parts = uri.filter(|_| !userinfo).and_then(|uri| {
        let scheme = uri.scheme().cloned()?;
        let authority = uri.authority().cloned()?;
        let ok = (scheme == http::uri::Scheme::HTTP || scheme == http::uri::Scheme::HTTPS)
            && authority_ok(&authority)
            && uri.query().is_none();
        ok.then(|| {
            (
                scheme,
                authority,
                uri.path().trim_end_matches('/').to_owned(),
            )
        })
    });
    if userinfo {
        // Never echo the value: the part before @ is a password.
        c.fail(
            &url_path,
            Some(&u.url.referenced),
            "an upstream URL must not carry user:password@",
            "remove the user:password@ part; clients send their own Authorization, which is forwarded",
        );
    } else if text.is_some() && parts.is_none() {
        // Nor that of a URL that does not parse but holds an @ (regression,
        // the secrets audit: `http://svc:Pa#ss@erp:9000` was quoted whole
        // by check, POST /reload's answer and the reload's error line).
        let shown = match text.as_ref().is_some_and(|t| t.contains('@')) {
            true => "the url (not shown: it holds an @, and what comes before may be a password)"
                .to_owned(),
            false => quote(&u.url),
        };
        c.fail(
            &url_path,
            Some(&u.url.referenced),
            format!("{shown} is not an upstream URL"),
            "write http(s)://host:port with an optional base path, such as http://127.0.0.1:9000/erp",
        );
    }
    let connect_timeout = match &u.connect_timeout {
        Some(d) => c.duration(&format!("{path}.connect_timeout"), d, MAX_WAIT),
        None => Some(Duration::from_secs(1)),
    };
    let idle_timeout = match &u.idle_timeout {
        Some(d) => c.duration(&format!("{path}.idle_timeout"), d, MAX_WAIT),
        None => Some(DEFAULT_IDLE_TIMEOUT),
    };
    let max_in_flight = c.count(
        &format!("{path}.max_in_flight"),
        u.max_in_flight.as_ref(),
        256,
        "",
    );
    let default_breaker = Breaker {
        consecutive_failures: 5,
        open_for: Duration::from_secs(30),
    };
    let circuit_breaker = match &u.circuit_breaker {
        None => Some(Some(default_breaker)),
        Some(spanned) => match &spanned.value {
            ScalarOr::Scalar(word) if word == "off" || word == "false" => Some(None),
            ScalarOr::Scalar(word) => {
                // YAML reads `on` and `yes` as true: not the file's word.
                let message = if word == "true" {
                    "on (true) is not a setting: the breaker is on by default".to_owned()
                } else {
                    format!("{word:?} is not allowed")
                };
                c.fail(
                    &format!("{path}.circuit_breaker"),
                    Some(&spanned.referenced),
                    message,
                    "leave it out for the default, write off, or a mapping { consecutive_failures: 5, open_for: 30s }",
                );
                None
            }
            ScalarOr::Map(b) => {
                let open_for = match &b.open_for {
                    Some(d) => c.duration(&format!("{path}.circuit_breaker.open_for"), d, MAX_WAIT),
                    None => Some(default_breaker.open_for),
                };
                let consecutive_failures = c.count(
                    &format!("{path}.circuit_breaker.consecutive_failures"),
                    b.consecutive_failures.as_ref(),
                    default_breaker.consecutive_failures,
                    ", or write circuit_breaker: off to disable the breaker",
                );
                consecutive_failures
                    .zip(open_for)
                    .map(|(consecutive_failures, open_for)| {
                        Some(Breaker {
                            consecutive_failures,
                            open_for,
                        })
                    })
            }
        },
    };
    let tls = u.tls.as_ref().map(|t| tls_paths(c, &path, t));
    let (scheme, authority, base_path) = parts?;
    Some(UpstreamConfig {
        name: name.to_owned(),
        scheme,
        authority,
        base_path,
        connect_timeout: connect_timeout?,
        idle_timeout: idle_timeout?,
        max_in_flight: max_in_flight?,
        circuit_breaker: circuit_breaker?,
        tls,
    })
}

pub(super) fn tls_paths(c: &mut Check, at: &str, t: &UpstreamTlsFile) -> UpstreamTls {
    let mut file = |field: &str, v: &Option<Text>| {
        v.as_ref()
            .and_then(|v| c.text(&format!("{at}.tls.{field}"), v))
            .map(PathBuf::from)
    };
    let ca_file = file("ca_file", &t.ca_file);
    let client_cert_file = file("client_cert_file", &t.client_cert_file);
    let client_key_file = file("client_key_file", &t.client_key_file);
    let tls = UpstreamTls {
        files: files_digest([&ca_file, &client_cert_file, &client_key_file]),
        ca_file,
        client_cert_file,
        client_key_file,
    };
    let paired = tls.client_cert_file.is_some() == tls.client_key_file.is_some();
    if !paired {
        // At the one that is set (regression, found by an audit: no line).
        let set = t.client_cert_file.as_ref().or(t.client_key_file.as_ref());
        c.fail(
            &format!("{at}.tls"),
            set.map(|v| &v.referenced),
            "client_cert_file and client_key_file go together",
            "set both for mutual TLS, or neither",
        );
    }
    // Each file read on its own first, so that every bad one is reported
    // (regression: the first error of a block hid the others); then, all
    // readable, built as `serve` builds it (a key not matching its
    // certificate). Here, so that the errors come with the others, at their
    // field's line (regression: TLS files were looked at only once all
    // else was valid).
    let unreadable: Vec<_> = [
        (&tls.ca_file, false),
        (&tls.client_cert_file, false),
        (&tls.client_key_file, true),
    ]
    .into_iter()
    .filter_map(|(file, key)| {
        let file = file.as_deref()?;
        let read = if key {
            crate::tls::load_key(file).map(drop)
        } else {
            crate::tls::load_certs(file).map(drop)
        };
        read.err()
    })
    .collect();
    let built = (unreadable.is_empty() && paired)
        .then(|| crate::tls::client_config(Some(&tls)).err())
        .flatten();
    let fields = [
        ("ca_file", t.ca_file.as_ref(), tls.ca_file.as_deref()),
        (
            "client_cert_file",
            t.client_cert_file.as_ref(),
            tls.client_cert_file.as_deref(),
        ),
        (
            "client_key_file",
            t.client_key_file.as_ref(),
            tls.client_key_file.as_deref(),
        ),
    ];
    for error in unreadable.into_iter().chain(built) {
        tls_failure(c, &format!("{at}.tls"), &error, &fields);
    }
    tls
}

/// SHA-256 over the TLS files, each its length and contents (an unreadable
/// file counts as empty: it is reported as an error anyway).
fn files_digest(paths: [&Option<PathBuf>; 3]) -> [u8; 32] {
    use sha2::Digest;
    let mut digest = sha2::Sha256::new();
    for path in paths {
        let bytes = path.as_ref().and_then(|p| super::read_bounded(p).ok());
        let bytes = bytes.unwrap_or_default();
        digest.update((bytes.len() as u64).to_le_bytes());
        digest.update(&bytes);
    }
    digest.finalize().into()
}

/// Where a TLS error belongs: the field naming the file it is about (its
/// line and column), else `{at}.tls` at its first file's place.
pub(super) fn tls_failure(
    c: &mut Check,
    at: &str,
    error: &crate::tls::TlsError,
    fields: &[(&str, Option<&Text>, Option<&std::path::Path>)],
) {
    let about = match error {
        crate::tls::TlsError::File { path, reason } => {
            let named = |(_, _, file): &&(&str, Option<&Text>, Option<&std::path::Path>)| {
                file.is_some_and(|f| f.display().to_string() == *path)
            };
            // One file named by two fields (a combined PEM): a key's
            // trouble is the key field's (regression, found by an audit:
            // the certificate's field was blamed for a missing key).
            let keyish = reason.contains("key");
            (fields.iter().filter(named))
                .find(|(name, _, _)| name.contains("key") == keyish)
                .or_else(|| fields.iter().find(named))
                .map(|about| (about, reason))
        }
        crate::tls::TlsError::Config(_) => None,
    };
    let (field, place, message) = match about {
        // The file as the configuration spells it, never what a `${VAR}`
        // expanded to (regression, found by an audit: the expanded path was
        // shown, against the rule every other message keeps).
        Some(((name, text, _), reason)) => (
            format!("{at}.{name}"),
            text.map(|t| t.referenced),
            match text {
                Some(text) => format!("{}: {reason}", quote(text)),
                None => error.to_string(),
            },
        ),
        None => (
            at.to_owned(),
            fields
                .iter()
                .find_map(|(_, text, _)| text.map(|t| t.referenced)),
            error.to_string(),
        ),
    };
    c.fail(
        &field,
        place.as_ref(),
        message,
        "point it at a readable PEM file of the right kind (a certificate, or an unencrypted private key)",
    );
}
