//! `portcullis env`: the environment a build container needs to use the proxy — proxy variables
//! (upper- and lower-case, since tools disagree on which they read), `NO_PROXY`, and the CA file
//! for every ecosystem's own variable: the Portcullis CA for the one variable that *adds* to its
//! tool's roots, the bundle (our CA + the system roots) for those that *replace* them.
//!
//! The proxy URL is checked here ([`ProxyUrl`]): an `http://` URL (the listener speaks plain
//! HTTP), its user and token percent-encoded where RFC 3986 userinfo needs it.

use std::fmt::{self, Write as _};
use std::net::SocketAddr;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// `export NAME='value'` lines, for `eval "$(portcullis env)"` or `source`.
    #[default]
    Sh,
    /// `NAME=value` lines, for `docker run --env-file` and `.env` files.
    Dotenv,
}

/// Variables that name a CA file, one per ecosystem. All but [`ADDS_TO_ROOTS`] replace their
/// tool's roots, so they name the bundle (our CA + the system roots) unless `--ca-file` is given.
pub const CA_VARIABLES: [&str; 8] = [
    "SSL_CERT_FILE",       // OpenSSL, Go, Ruby, many others
    "REQUESTS_CA_BUNDLE",  // Python requests
    "CURL_CA_BUNDLE",      // curl
    "NODE_EXTRA_CA_CERTS", // Node.js (added to its built-in roots)
    "GIT_SSL_CAINFO",      // git
    "CARGO_HTTP_CAINFO",   // cargo
    "PIP_CERT",            // pip
    "AWS_CA_BUNDLE",       // AWS CLI and SDKs
];

/// The one CA variable that adds to its tool's built-in roots rather than replacing them: it names
/// the Portcullis CA alone (the bundle would add every system root a second time).
pub const ADDS_TO_ROOTS: &str = "NODE_EXTRA_CA_CERTS";

/// Hosts that never go through the proxy by default: loopback, and the cluster's own services.
pub const DEFAULT_NO_PROXY: [&str; 6] = [
    "localhost",
    "127.0.0.1",
    "::1",
    ".svc",
    ".svc.cluster.local",
    ".cluster.local",
];

/// The CA files the variables name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaFiles<'a> {
    /// The Portcullis CA certificate (for [`ADDS_TO_ROOTS`]).
    pub ca: &'a str,
    /// The file for the variables that replace their tool's roots: the bundle, or `--ca-file`.
    pub bundle: &'a str,
}

/// Renders the variables.
pub fn render(
    proxy_url: &ProxyUrl,
    ca: CaFiles<'_>,
    no_proxy: &[String],
    format: Format,
) -> String {
    let no_proxy = no_proxy.join(",");
    let proxy_url = proxy_url.as_str();
    let mut vars: Vec<(&str, &str)> = vec![
        ("HTTP_PROXY", proxy_url),
        ("HTTPS_PROXY", proxy_url),
        ("http_proxy", proxy_url),
        ("https_proxy", proxy_url),
        ("NO_PROXY", &no_proxy),
        ("no_proxy", &no_proxy),
    ];
    vars.extend(CA_VARIABLES.iter().map(|name| {
        let file = if *name == ADDS_TO_ROOTS {
            ca.ca
        } else {
            ca.bundle
        };
        (*name, file)
    }));
    let mut out = String::new();
    for (name, value) in vars {
        let _ = match format {
            Format::Sh => writeln!(out, "export {name}={}", sh_quote(value)),
            Format::Dotenv => writeln!(out, "{name}={value}"),
        };
    }
    out
}

/// A `--proxy-url` that failed the checks. Never quotes the URL: it may hold a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyUrlError {
    /// No `scheme://`.
    #[error("--proxy-url is not a URL: expected http://[NAME:TOKEN@]HOST:PORT")]
    NotAUrl,
    /// A scheme other than `http`.
    #[error(
        "--proxy-url has the scheme {0}: the proxy listener speaks plain HTTP (HTTPS traffic goes \
         through it with CONNECT), so give http://[NAME:TOKEN@]HOST:PORT"
    )]
    Scheme(String),
    /// The host and port after the credentials are not an authority.
    #[error("--proxy-url: the host or port is invalid: expected http://[NAME:TOKEN@]HOST:PORT")]
    Authority,
    /// Something after the host and port.
    #[error(
        "--proxy-url has a path, query or fragment: a proxy URL is http://[NAME:TOKEN@]HOST:PORT"
    )]
    Path,
}

/// What RFC 3986 userinfo keeps as is: the unreserved characters. Everything else is
/// percent-encoded, sub-delimiters included — allowed there by the RFC, but misread by some tools
/// (`+` as a space, `$` interpolated by `.env` loaders) — and decoded the same by every one.
const USERINFO: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A checked proxy URL: `http://[user[:token]@]host:port`, userinfo percent-encoded. Its text can
/// hold a token, so it appears only in `env`'s output; `Debug` shows whether it has credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    url: String,
    credentials: bool,
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyUrl")
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl ProxyUrl {
    /// The URL of a proxy listener bound to `addr` (loopback for an unspecified address).
    pub fn from_listener(mut addr: SocketAddr) -> Self {
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        Self {
            url: format!("http://{addr}"),
            credentials: false,
        }
    }

    /// Checks `raw` and percent-encodes its user and token. The user and token may be given raw:
    /// the userinfo ends at the *last* `@` (a token may hold `@`, a host never does) and the user
    /// at the first `:` (a client name never holds one). An existing `%XX` is kept, so an
    /// already encoded URL comes back unchanged. A URL without a port gets `:80`, what it means
    /// (curl would otherwise use 1080).
    pub fn parse(raw: &str) -> Result<Self, ProxyUrlError> {
        let (scheme, rest) = raw.split_once("://").ok_or(ProxyUrlError::NotAUrl)?;
        let scheme_ok = scheme
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !scheme_ok {
            return Err(ProxyUrlError::NotAUrl);
        }
        if !scheme.eq_ignore_ascii_case("http") {
            return Err(ProxyUrlError::Scheme(scheme.to_ascii_lowercase()));
        }
        let (userinfo, host_and_rest) = match rest.rsplit_once('@') {
            Some((userinfo, host)) => (userinfo, host),
            None => ("", rest),
        };
        // Only a bare `/` may follow the host and port: proxies are named by host and port.
        let host_port = host_and_rest.strip_suffix('/').unwrap_or(host_and_rest);
        if host_port.contains(['/', '?', '#']) {
            return Err(ProxyUrlError::Path);
        }
        let authority: http::uri::Authority =
            host_port.parse().map_err(|_| ProxyUrlError::Authority)?;
        let host = authority.host();
        let port = match host_port
            .get(host.len()..)
            .and_then(|p| p.strip_prefix(':'))
        {
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or(ProxyUrlError::Authority)?,
            None if host_port.len() == host.len() => 80,
            None => return Err(ProxyUrlError::Authority),
        };
        if host.is_empty() {
            return Err(ProxyUrlError::Authority);
        }
        let mut url = String::from("http://");
        if !userinfo.is_empty() {
            let (user, token) = match userinfo.split_once(':') {
                Some((user, token)) => (user, Some(token)),
                None => (userinfo, None),
            };
            url.push_str(&encode_userinfo(user));
            if let Some(token) = token {
                url.push(':');
                url.push_str(&encode_userinfo(token));
            }
            url.push('@');
        }
        let _ = write!(url, "{host}:{port}");
        Ok(Self {
            url,
            credentials: !userinfo.is_empty(),
        })
    }

    /// The URL, as the variables carry it.
    pub fn as_str(&self) -> &str {
        &self.url
    }

    /// Whether it carries a user (and token) for `Proxy-Authorization`.
    pub fn has_credentials(&self) -> bool {
        self.credentials
    }
}

/// Percent-encodes `part` for RFC 3986 userinfo, keeping every existing `%XX`.
fn encode_userinfo(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    let mut rest = part;
    while let Some(i) = rest.find('%') {
        out.extend(utf8_percent_encode(&rest[..i], USERINFO));
        let after = &rest[i + 1..];
        match after.get(..2) {
            Some(hex) if hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                out.push('%');
                out.push_str(hex);
                rest = &after[2..];
            }
            _ => {
                out.push_str("%25");
                rest = after;
            }
        }
    }
    out.extend(utf8_percent_encode(rest, USERINFO));
    out
}

/// Single-quotes a value for POSIX sh.
fn sh_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(raw: &str) -> String {
        ProxyUrl::parse(raw).unwrap().as_str().to_owned()
    }

    #[test]
    fn sh_and_dotenv() {
        let np: Vec<String> = vec!["localhost".into(), ".svc".into()];
        let proxy = ProxyUrl::parse("http://127.0.0.1:3128").unwrap();
        let files = CaFiles {
            ca: "/ca/it's.pem",
            bundle: "/ca/ca-bundle.pem",
        };
        let sh = render(&proxy, files, &np, Format::Sh);
        assert!(sh.contains("export HTTPS_PROXY='http://127.0.0.1:3128'\n"));
        assert!(sh.contains("export no_proxy='localhost,.svc'\n"));
        assert!(sh.contains(r"export NODE_EXTRA_CA_CERTS='/ca/it'\''s.pem'"));
        assert!(sh.contains("export PIP_CERT='/ca/ca-bundle.pem'\n"));
        assert_eq!(sh.lines().count(), 6 + CA_VARIABLES.len());
        let files = CaFiles {
            ca: "/ca.pem",
            bundle: "/ca.pem",
        };
        let proxy = ProxyUrl::parse("http://p:3128").unwrap();
        let env = render(&proxy, files, &np, Format::Dotenv);
        assert!(env.contains("GIT_SSL_CAINFO=/ca.pem\n"));
        assert!(env.contains("http_proxy=http://p:3128\n"));
    }

    #[test]
    fn every_replacing_variable_names_the_bundle() {
        let proxy = ProxyUrl::from_listener("0.0.0.0:3128".parse().unwrap());
        assert_eq!(proxy.as_str(), "http://127.0.0.1:3128");
        let files = CaFiles {
            ca: "CA",
            bundle: "BUNDLE",
        };
        let out = render(&proxy, files, &[], Format::Dotenv);
        for name in CA_VARIABLES {
            let want = if name == ADDS_TO_ROOTS {
                "CA"
            } else {
                "BUNDLE"
            };
            assert!(out.contains(&format!("\n{name}={want}\n")), "{name}: {out}");
        }
        assert!(CA_VARIABLES.contains(&ADDS_TO_ROOTS));
    }

    #[test]
    fn only_http_urls_are_accepted() {
        for (raw, want) in [
            ("not a url", ProxyUrlError::NotAUrl),
            ("proxy:3128", ProxyUrlError::NotAUrl),
            ("://proxy:3128", ProxyUrlError::NotAUrl),
            ("https://proxy:3128", ProxyUrlError::Scheme("https".into())),
            (
                "socks5://proxy:1080",
                ProxyUrlError::Scheme("socks5".into()),
            ),
            ("http://", ProxyUrlError::Authority),
            ("http://:3128", ProxyUrlError::Authority),
            ("http://proxy:abc", ProxyUrlError::Authority),
            ("http://proxy:", ProxyUrlError::Authority),
            ("http://proxy:70000", ProxyUrlError::Authority),
            ("http://ci:tok", ProxyUrlError::Authority),
            ("http://proxy:3128/path", ProxyUrlError::Path),
            ("http://proxy:3128?x=1", ProxyUrlError::Path),
        ] {
            assert_eq!(ProxyUrl::parse(raw).unwrap_err(), want, "{raw}");
        }
        // Errors never quote the URL, which may hold a token.
        let err = ProxyUrl::parse("https://ci:s3cret-canary@proxy:3128").unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
        let err = ProxyUrl::parse("http://ci:s3cret-canary").unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
        let p = ProxyUrl::parse("http://ci:s3cret-canary@proxy:3128").unwrap();
        assert!(!format!("{p:?}").contains("s3cret"));
    }

    #[test]
    fn hosts_and_ports_are_normalised() {
        assert_eq!(url("http://proxy:3128"), "http://proxy:3128");
        assert_eq!(url("HTTP://proxy:3128/"), "http://proxy:3128");
        assert_eq!(url("http://proxy"), "http://proxy:80");
        assert_eq!(url("http://[::1]:3128"), "http://[::1]:3128");
        assert!(!ProxyUrl::parse("http://proxy:3128")
            .unwrap()
            .has_credentials());
        assert!(!ProxyUrl::parse("http://@proxy:3128")
            .unwrap()
            .has_credentials());
    }

    #[test]
    fn raw_credentials_are_percent_encoded_once() {
        let p = ProxyUrl::parse("http://ci:p@ss w/rd%21@proxy:3128").unwrap();
        assert!(p.has_credentials());
        assert_eq!(p.as_str(), "http://ci:p%40ss%20w%2Frd%21@proxy:3128");
        // ':' after the first one belongs to the token; '%' not followed by two hex digits is
        // encoded; non-ASCII goes as UTF-8.
        assert_eq!(
            url("http://ci:a:b%zz%4é+$@10.0.0.1:3128"),
            "http://ci:a%3Ab%25zz%254%C3%A9%2B%24@10.0.0.1:3128"
        );
        assert_eq!(
            url("http://my.client-1_~:t@h:1"),
            "http://my.client-1_~:t@h:1"
        );
        assert_eq!(url("http://user@h:1"), "http://user@h:1");
        // Idempotent: an encoded URL comes back as it was.
        for raw in [
            "http://ci:p@ss w/rd%21@proxy:3128",
            "http://ci:a:b%zz%4é+$@10.0.0.1:3128",
        ] {
            let once = url(raw);
            assert_eq!(url(&once), once);
        }
    }
}
