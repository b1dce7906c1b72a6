//! The effective configuration in words: what `idemgate check` prints.

use std::fmt::Write;

use http::HeaderName;

use super::{Config, PathMatch};

/// `writeln!` into a String, which cannot fail.
macro_rules! line {
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

impl Config {
    /// Every route with its defaults merged, one block per route.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        line!(
            out,
            "listen {}, store {:?}, {} upstream(s), {} route(s)",
            self.listen.address,
            self.store.backend_name(),
            self.upstreams.len(),
            self.routes.len()
        );
        // The settings a newcomer would otherwise find only in the docs
        // (noted by a README walkthrough). Never a store URL: it may hold
        // a password.
        let show = super::check::show_duration;
        let store = &self.store;
        line!(
            out,
            "store: key_prefix {:?}, op_timeout {}, on_unavailable {}{}",
            store.key_prefix,
            show(store.op_timeout),
            match store.on_unavailable {
                super::OnUnavailable::Reject => "reject",
                super::OnUnavailable::Forward => "forward",
            },
            match store.backend {
                super::Backend::Memory => format!(", max_records {}", store.max_records),
                _ => String::new(),
            }
        );
        line!(
            out,
            "shutdown_grace {}, send_timeout {}",
            show(self.shutdown_grace),
            show(self.send_timeout)
        );
        for u in &self.upstreams {
            let breaker = match &u.circuit_breaker {
                Some(b) => format!(
                    "{} failures, open for {}",
                    b.consecutive_failures,
                    show(b.open_for)
                ),
                None => "off".to_owned(),
            };
            line!(
                out,
                "upstream {}: {}://{}{}, connect_timeout {}, idle_timeout {}, max_in_flight {}, circuit_breaker {breaker}",
                u.name,
                u.scheme,
                u.authority,
                u.base_path,
                show(u.connect_timeout),
                show(u.idle_timeout),
                u.max_in_flight
            );
        }
        for route in &self.routes {
            let path = match &route.matcher.path {
                PathMatch::Prefix(p) => {
                    format!("path_prefix {}", if p.is_empty() { "/" } else { p })
                }
                PathMatch::Exact(p) => format!("path {p}"),
            };
            line!(
                out,
                "route {}: {path} -> upstream {}",
                route.name,
                route.upstream
            );
            if let Some(methods) = &route.matcher.methods {
                line!(
                    out,
                    "  methods: {}",
                    methods
                        .iter()
                        .map(|m| m.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            if let Some(host) = &route.matcher.host {
                line!(out, "  host: {host}");
            }
            line!(
                out,
                "  timeouts: response {}, total {}",
                super::check::show_duration(route.timeouts.response),
                super::check::show_duration(route.timeouts.total)
            );
            match &route.idempotency {
                None => line!(out, "  idempotency: off"),
                Some(p) => {
                    line!(
                        out,
                        "  idempotency: methods [{}], header {}, require_key {}, key_max_length {}",
                        p.methods
                            .iter()
                            .map(|m| m.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        p.header,
                        p.require_key,
                        p.key_max_length
                    );
                    line!(
                        out,
                        "    ttl {}, lease {}, concurrent {}, on_unknown {}",
                        super::check::show_duration(p.ttl),
                        super::check::show_duration(p.lease),
                        // As the file spells them.
                        match p.concurrent {
                            super::Concurrent::Reject => "reject",
                            super::Concurrent::Wait => "wait",
                        },
                        match p.on_unknown {
                            super::OnUnknown::Lock => "lock",
                            super::OnUnknown::Release => "release",
                        }
                    );
                    line!(
                        out,
                        "    fingerprint headers [{}] query {}, scope headers [{}]",
                        join(&p.fingerprint_headers),
                        p.fingerprint_query,
                        join(&p.scope_headers)
                    );
                    line!(
                        out,
                        "    store_statuses [{}], release_statuses {:?}, max_request_body {}, max_response_body {}",
                        p.store_statuses
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                        p.release_statuses,
                        bytesize::ByteSize(p.max_request_body).display().iec(),
                        bytesize::ByteSize(p.max_response_body).display().iec()
                    );
                }
            }
        }
        out
    }
}

fn join(names: &[HeaderName]) -> String {
    names
        .iter()
        .map(|n| n.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
