//! `portcullis env`: the environment a build container needs to use the proxy — proxy variables
//! (upper- and lower-case, since tools disagree on which they read), `NO_PROXY`, and the CA file
//! for every ecosystem's own variable.

use std::fmt::Write as _;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// `export NAME='value'` lines, for `eval "$(portcullis env)"` or `source`.
    #[default]
    Sh,
    /// `NAME=value` lines, for `docker run --env-file` and `.env` files.
    Dotenv,
}

/// Variables that name the CA file, one per ecosystem.
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

/// Hosts that never go through the proxy by default: loopback, and the cluster's own services.
pub const DEFAULT_NO_PROXY: [&str; 6] = [
    "localhost",
    "127.0.0.1",
    "::1",
    ".svc",
    ".svc.cluster.local",
    ".cluster.local",
];

/// Renders the variables.
pub fn render(proxy_url: &str, ca_file: &str, no_proxy: &[String], format: Format) -> String {
    let no_proxy = no_proxy.join(",");
    let mut vars: Vec<(&str, &str)> = vec![
        ("HTTP_PROXY", proxy_url),
        ("HTTPS_PROXY", proxy_url),
        ("http_proxy", proxy_url),
        ("https_proxy", proxy_url),
        ("NO_PROXY", &no_proxy),
        ("no_proxy", &no_proxy),
    ];
    vars.extend(CA_VARIABLES.iter().map(|name| (*name, ca_file)));
    let mut out = String::new();
    for (name, value) in vars {
        let _ = match format {
            Format::Sh => writeln!(out, "export {name}={}", sh_quote(value)),
            Format::Dotenv => writeln!(out, "{name}={value}"),
        };
    }
    out
}

/// Single-quotes a value for POSIX sh.
fn sh_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sh_and_dotenv() {
        let np: Vec<String> = vec!["localhost".into(), ".svc".into()];
        let sh = render("http://127.0.0.1:3128", "/ca/it's.pem", &np, Format::Sh);
        assert!(sh.contains("export HTTPS_PROXY='http://127.0.0.1:3128'\n"));
        assert!(sh.contains("export no_proxy='localhost,.svc'\n"));
        assert!(sh.contains(r"export PIP_CERT='/ca/it'\''s.pem'"));
        assert_eq!(sh.lines().count(), 6 + CA_VARIABLES.len());
        let env = render("http://p:3128", "/ca.pem", &np, Format::Dotenv);
        assert!(env.contains("GIT_SSL_CAINFO=/ca.pem\n"));
        assert!(env.contains("http_proxy=http://p:3128\n"));
    }
}
