//! Reading what the dashboard and the alert rules refer to out of their text:
//! `idemgate_*` names with their `{...}` matchers, the labels PromQL groups
//! by, and the labels Go and Grafana templates interpolate.

/// `a="x",b=~"y|z"` split at the commas outside quotes.
pub(crate) fn split_matchers(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in s.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(std::mem::take(&mut current).trim().to_owned());
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    if !current.trim().is_empty() {
        out.push(current.trim().to_owned());
    }
    out
}

/// A PromQL-ish reference: a metric name and the matchers written after it.
pub(crate) struct Reference {
    pub(crate) name: String,
    pub(crate) matchers: Vec<String>,
}

/// Every `idemgate_*` name in `s`, with its `{...}` matchers.
pub(crate) fn references(s: &str) -> Vec<Reference> {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut from = 0;
    while let Some(i) = s[from..].find("idemgate_").map(|i| i + from) {
        from = i + 1;
        if i > 0 && ident(bytes[i - 1]) {
            continue;
        }
        let end = (i..bytes.len())
            .find(|&j| !ident(bytes[j]))
            .unwrap_or(bytes.len());
        let mut matchers = Vec::new();
        if s[end..].starts_with('{') {
            let close = s[end..].find('}').expect("a closing brace") + end;
            matchers = split_matchers(&s[end + 1..close]);
        }
        out.push(Reference {
            name: s[i..end].to_owned(),
            matchers,
        });
    }
    out
}

/// Label names after `by (` / `without (`, and in `label_values(metric, label)`.
pub(crate) fn grouping_labels(promql: &str) -> Vec<String> {
    let mut out = Vec::new();
    for keyword in ["by", "without"] {
        let mut from = 0;
        while let Some(i) = promql[from..].find(keyword).map(|i| i + from) {
            from = i + keyword.len();
            let before = promql[..i].chars().last();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let rest = promql[from..].trim_start();
            if let Some(rest) = rest.strip_prefix('(') {
                let close = rest.find(')').unwrap();
                out.extend(
                    rest[..close]
                        .split(',')
                        .map(|l| l.trim().to_owned())
                        .filter(|l| !l.is_empty()),
                );
            }
        }
    }
    if let Some(rest) = promql.trim().strip_prefix("label_values(") {
        let inner = rest.trim_end_matches(')');
        if let Some((_, label)) = inner.rsplit_once(',') {
            out.push(label.trim().to_owned());
        }
    }
    out
}

/// Label names in Go/Grafana templates: `{{ $labels.route }}`, `{{route}}`.
pub(crate) fn template_labels(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("{{") {
        let Some(close) = rest[i..].find("}}") else {
            break;
        };
        let inner = rest[i + 2..i + close].trim();
        let name = inner.strip_prefix("$labels.").unwrap_or(inner);
        if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.push(name.to_owned());
        }
        rest = &rest[i + close + 2..];
    }
    out
}
