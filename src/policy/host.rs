//! Destination hosts and the `host` patterns of rules: a request's host is normalised once at the
//! edge ([`Host`]: lower case, punycode, no trailing dot, IP literals unbracketed), and a rule's
//! pattern ([`HostPattern`]) is an exact name, `*.suffix`, an IP literal or a CIDR.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// A rule's `host` field, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// An exact DNS name, normalised (lower case, ASCII/punycode, no trailing dot).
    Exact(String),
    /// `*.suffix`: any subdomain of `suffix` at any depth, never `suffix` itself. Holds `.suffix`.
    Subdomains(String),
    /// An IP literal.
    Ip(IpAddr),
    /// A CIDR block of IP literals.
    Cidr(IpNet),
}

/// Why a `host` pattern was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid host pattern {pattern:?}: {why}")]
pub struct PatternError {
    pattern: String,
    why: &'static str,
}

impl HostPattern {
    /// Parses a rule's `host`: an exact name, `*.suffix`, an IP literal or a CIDR.
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let err = |why| PatternError {
            pattern: text.to_owned(),
            why,
        };
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(err("empty"));
        }
        if let Ok(ip) = trimmed
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
        {
            return Ok(Self::Ip(ip));
        }
        if trimmed.contains('/') {
            return trimmed
                .parse::<IpNet>()
                .map(|net| Self::Cidr(net.trunc()))
                .map_err(|_| err("not a valid CIDR"));
        }
        if let Some(suffix) = trimmed.strip_prefix("*.") {
            if suffix.contains('*') {
                return Err(err(
                    "'*' may only stand alone as the first label (\"*.example.com\")",
                ));
            }
            let suffix = normalize_host(suffix).ok_or_else(|| err("not a valid DNS name"))?;
            return Ok(Self::Subdomains(format!(".{suffix}")));
        }
        if trimmed.contains('*') {
            return Err(err(
                "'*' may only stand alone as the first label (\"*.example.com\")",
            ));
        }
        normalize_host(trimmed)
            .map(Self::Exact)
            .ok_or_else(|| err("not a valid DNS name, IP literal or CIDR"))
    }

    /// Whether the (already normalised) request host matches.
    pub fn matches(&self, host: &Host) -> bool {
        match (self, host) {
            (Self::Exact(name), Host::Name(h)) => name == h,
            (Self::Subdomains(suffix), Host::Name(h)) => {
                h.len() > suffix.len() && h.ends_with(suffix.as_str())
            }
            (Self::Ip(ip), Host::Ip(h)) => ip == h,
            (Self::Cidr(net), Host::Ip(h)) => net.contains(h),
            _ => false,
        }
    }
}

/// A request's destination host, normalised once at the edge.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name: lower case, ASCII (IDNs in punycode), no trailing dot.
    Name(String),
    /// An IP literal (IPv6 without brackets).
    Ip(IpAddr),
}

impl Host {
    /// Parses the host part of a request target or CONNECT authority.
    pub fn parse(text: &str) -> Option<Self> {
        let unbracketed = text
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .unwrap_or(text);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Some(Self::Ip(ip));
        }
        normalize_host(text).map(Self::Name)
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(n) => f.write_str(n),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Lower-cases, strips one trailing dot, converts IDNs to punycode and checks DNS syntax
/// (letters, digits, hyphens and underscores; labels 1–63 bytes; whole name ≤ 253 bytes).
pub fn normalize_host(text: &str) -> Option<String> {
    let text = text.strip_suffix('.').unwrap_or(text);
    if text.is_empty() {
        return None;
    }
    let ascii = idna::domain_to_ascii(text).ok()?;
    if ascii.is_empty() || ascii.len() > 253 {
        return None;
    }
    let labels_ok = ascii.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    // A name made only of digits and dots would be an (invalid) IPv4 literal, not a DNS name.
    let numeric = ascii.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    (labels_ok && !numeric).then_some(ascii)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Host {
        Host::parse(s).unwrap()
    }

    #[test]
    fn exact_names_ignore_case_and_trailing_dot() {
        let p = HostPattern::parse("API.GitHub.com.").unwrap();
        assert_eq!(p, HostPattern::Exact("api.github.com".into()));
        for h in ["api.github.com", "API.GITHUB.COM", "api.github.com."] {
            assert!(p.matches(&host(h)), "{h}");
        }
        for h in [
            "github.com",
            "xapi.github.com",
            "api.github.com.evil",
            "a.api.github.com",
        ] {
            assert!(!p.matches(&host(h)), "{h}");
        }
    }

    #[test]
    fn wildcard_matches_subdomains_at_any_depth_but_not_apex_or_lookalikes() {
        let p = HostPattern::parse("*.example.com").unwrap();
        for h in [
            "a.example.com",
            "a.b.c.example.com",
            "A.EXAMPLE.COM.",
            "_x.example.com",
        ] {
            assert!(p.matches(&host(h)), "{h}");
        }
        for h in [
            "example.com",
            "badexample.com",
            "example.com.evil.net",
            "a.example.co",
            "aexample.com",
        ] {
            assert!(!p.matches(&host(h)), "{h}");
        }
    }

    #[test]
    fn idn_patterns_and_hosts_meet_in_punycode() {
        let p = HostPattern::parse("bücher.example").unwrap();
        assert_eq!(p, HostPattern::Exact("xn--bcher-kva.example".into()));
        assert!(p.matches(&host("BÜCHER.example")));
        assert!(p.matches(&host("xn--bcher-kva.example")));
        let w = HostPattern::parse("*.bücher.example").unwrap();
        assert!(w.matches(&host("www.xn--bcher-kva.example")));
    }

    #[test]
    fn ip_literals_and_cidrs() {
        let ip = HostPattern::parse("192.0.2.7").unwrap();
        assert!(ip.matches(&host("192.0.2.7")));
        assert!(!ip.matches(&host("192.0.2.8")));
        let v6 = HostPattern::parse("[2001:db8::1]").unwrap();
        assert!(v6.matches(&host("[2001:db8::1]")));
        assert!(v6.matches(&host("2001:DB8:0::1")));
        let net = HostPattern::parse("10.20.0.0/16").unwrap();
        assert!(net.matches(&host("10.20.3.4")));
        assert!(!net.matches(&host("10.21.0.1")));
        // A name is never matched by an IP pattern, nor an IP by a name pattern.
        assert!(!net.matches(&host("ten.example")));
        assert!(!HostPattern::parse("example.com")
            .unwrap()
            .matches(&host("93.184.216.34")));
    }

    #[test]
    fn bad_patterns_are_rejected() {
        for bad in [
            "",
            "*",
            "*.",
            "a*.example.com",
            "*.*.example.com",
            "foo.*.com",
            "exa mple.com",
            "-bad.example",
            "10.0.0.0/33",
            "example..com",
            "1.2.3",
        ] {
            assert!(
                HostPattern::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }
}
