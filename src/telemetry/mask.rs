//! Masking (spec §7): which header values and query parameters an audit event hides by name, and
//! the resolved secret values scrubbed from every serialized line.
//!
//! A [`Masker`] is built once per configuration snapshot, so everything costly (the name sets,
//! the secret automaton) is paid at load time; using it only reads.

use std::borrow::Cow;
use std::collections::HashSet;

use aho_corasick::AhoCorasick;
use http::{HeaderMap, HeaderName};
use percent_encoding::percent_decode_str;
use zeroize::Zeroizing;

use crate::config::Config;

/// The mask token.
pub const HIDDEN: &str = "<HIDDEN>";

/// Header names always masked (spec §7).
pub const MASKED_HEADERS: [&str; 8] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "x-auth-token",
    "private-token",
    "x-amz-security-token",
];

/// Query parameters always masked (spec §7).
pub const MASKED_QUERY_PARAMS: [&str; 13] = [
    "token",
    "access_token",
    "api_key",
    "apikey",
    "key",
    "secret",
    "password",
    "sig",
    "signature",
    "x-amz-signature",
    "x-amz-credential",
    "client_secret",
    "code",
];

/// Masks header values, query parameters and secret values (one per snapshot).
pub struct Masker {
    headers: foldhash::HashSet<HeaderName>,
    query_params: HashSet<String>,
    secrets: Secrets,
    log_headers: bool,
}

/// How secret values are found in a line.
enum Secrets {
    /// One automaton over every secret, leftmost-longest, so that a secret containing another is
    /// replaced whole and the line is scanned once.
    Automaton(AhoCorasick),
    /// The secrets one at a time, longest first. Only when the automaton could not be built (it
    /// has size limits no sane configuration reaches): a secret must never be written unmasked.
    OneByOne(Vec<Zeroizing<String>>),
}

impl Secrets {
    fn len(&self) -> usize {
        match self {
            Self::Automaton(automaton) => automaton.patterns_len(),
            Self::OneByOne(secrets) => secrets.len(),
        }
    }
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Masker")
            .field("headers", &self.headers)
            .field("query_params", &self.query_params)
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl Masker {
    /// Built-in lists, the configured additions, every credential's header name, and every
    /// resolved secret (with the full header values built from them, e.g. a Basic pair's base64).
    pub fn new(config: &Config) -> Self {
        // Names that are not valid header names can never match a header: they are skipped.
        let mut headers: foldhash::HashSet<HeaderName> = MASKED_HEADERS
            .iter()
            .copied()
            .chain(config.audit.mask_headers.iter().map(String::as_str))
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        let mut secrets = Vec::new();
        for cred in config.credentials.values() {
            headers.insert(cred.header.clone());
            secrets.push(Zeroizing::new(cred.secret.expose().to_owned()));
            if let Ok(full) = cred.value.to_str() {
                secrets.push(Zeroizing::new(full.to_owned()));
                if let Some((_, encoded)) = full.split_once(' ') {
                    secrets.push(Zeroizing::new(encoded.to_owned()));
                }
            }
        }
        for minted in config.minted.values() {
            let secret = minted.secret().expose();
            secrets.push(Zeroizing::new(secret.to_owned()));
            // A multi-line secret (a GitHub App's PEM key): each of its lines on its own too.
            if secret.contains('\n') {
                for line in secret
                    .lines()
                    .map(str::trim)
                    .filter(|l| l.len() >= 16 && !l.starts_with("-----"))
                {
                    secrets.push(Zeroizing::new(line.to_owned()));
                }
            }
        }
        for signer in config.signers.values() {
            secrets.extend(
                signer
                    .secrets()
                    .map(|s| Zeroizing::new(s.expose().to_owned())),
            );
        }
        for client in &config.clients {
            if let Some(token) = &client.token {
                secrets.push(Zeroizing::new(token.expose().to_owned()));
            }
        }
        let mut query_params: HashSet<String> = MASKED_QUERY_PARAMS
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        query_params.extend(config.audit.mask_query_params.iter().cloned());
        Self {
            headers,
            query_params,
            secrets: Self::secrets(secrets),
            log_headers: config.audit.log_headers,
        }
    }

    fn secrets(mut secrets: Vec<Zeroizing<String>>) -> Secrets {
        // The audit line is JSON and queries are percent-encoded: each secret in those forms too.
        let encoded: Vec<Zeroizing<String>> = secrets
            .iter()
            .flat_map(|s| crate::credentials::encoded_forms(s))
            .map(Zeroizing::new)
            .collect();
        secrets.extend(encoded);
        // An empty pattern would match between every two characters.
        secrets.retain(|s| !s.is_empty());
        // Longest first: the order the one-by-one fallback needs (the automaton does not care).
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        match crate::credentials::secret_matcher(secrets.iter().map(|s| s.as_bytes())) {
            Ok(automaton) => Secrets::Automaton(automaton),
            Err(e) => {
                tracing::error!(error = %e, "secret masking falls back to one secret at a time");
                Secrets::OneByOne(secrets)
            }
        }
    }

    /// Whether request and response headers are written (`audit.log_headers`).
    pub fn log_headers(&self) -> bool {
        self.log_headers
    }

    /// Whether values of header `name` are hidden.
    fn hides(&self, name: &HeaderName) -> bool {
        // foldhash: a standard header hashes as its enum tag, so a lookup costs less than
        // comparing the name with each of the dozen masked ones.
        self.headers.contains(name)
    }

    /// `map` as the JSON object an audit event shows ([`Masker::write_headers`]), or `None` when
    /// `audit.log_headers` is off. Written when the headers are seen, so the event holds a few
    /// bytes rather than a clone of the header map.
    pub fn headers_json(&self, map: &HeaderMap) -> Option<Vec<u8>> {
        self.log_headers.then(|| {
            let mut json = Vec::with_capacity(48 * map.len() + 2);
            self.write_headers(&mut json, map);
            json
        })
    }

    /// Appends `map` to `out` as a JSON object of header names to values, masked values replaced
    /// by [`HIDDEN`] and repeated headers joined with `, `.
    pub fn write_headers(&self, out: &mut Vec<u8>, map: &HeaderMap) {
        use crate::telemetry::json::{header_name, lossy_string, string};
        out.push(b'{');
        if map.len() == map.keys_len() {
            // No repeated names (nearly always): one value per name, nothing to join.
            for (i, (name, value)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                header_name(out, name);
                out.push(b':');
                if self.hides(name) {
                    string(out, HIDDEN);
                } else {
                    lossy_string(out, value.as_bytes());
                }
            }
        } else {
            for (i, name) in map.keys().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                header_name(out, name);
                out.push(b':');
                let mut values = map.get_all(name).iter();
                if self.hides(name) {
                    string(out, HIDDEN);
                } else if let (Some(one), None) = (values.next(), values.next()) {
                    lossy_string(out, one.as_bytes());
                } else {
                    let joined: Vec<std::borrow::Cow<'_, str>> = map
                        .get_all(name)
                        .iter()
                        .map(|v| String::from_utf8_lossy(v.as_bytes()))
                        .collect();
                    string(out, &joined.join(", "));
                }
            }
        }
        out.push(b'}');
    }

    /// A query string with the values of masked parameters replaced (names compared
    /// case-insensitively, after percent-decoding).
    pub fn query(&self, query: &str) -> String {
        query
            .split('&')
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                if !value.is_empty() && self.query_params.contains(&decode_name(name)) {
                    format!("{name}={HIDDEN}")
                } else {
                    pair.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("&")
    }

    /// Replaces every resolved secret value anywhere in `line`, in one pass; allocates only when
    /// something matched.
    pub fn scrub(&self, line: &mut String) {
        match &self.secrets {
            // Nothing to look for: no need to read the line.
            Secrets::Automaton(automaton) if automaton.patterns_len() == 0 => {}
            Secrets::Automaton(automaton) => {
                let mut matches = automaton.find_iter(line.as_str()).peekable();
                if matches.peek().is_none() {
                    return;
                }
                let mut scrubbed = String::with_capacity(line.len());
                let mut copied = 0;
                // Slicing cannot fail: every pattern is whole UTF-8, so a match in a `str` starts
                // and ends on character boundaries.
                for found in matches {
                    scrubbed.push_str(&line[copied..found.start()]);
                    scrubbed.push_str(HIDDEN);
                    copied = found.end();
                }
                scrubbed.push_str(&line[copied..]);
                *line = scrubbed;
            }
            Secrets::OneByOne(secrets) => {
                for secret in secrets {
                    if line.contains(secret.as_str()) {
                        *line = line.replace(secret.as_str(), HIDDEN);
                    }
                }
            }
        }
    }
}

/// A query parameter name as compared with the masked list: `+` is a space (form encoding),
/// percent escapes decoded (invalid UTF-8 replaced), lowercased.
fn decode_name(name: &str) -> String {
    // `+` first: a `%2B` must still decode to a literal `+`.
    let spaced = if name.contains('+') {
        Cow::Owned(name.replace('+', " "))
    } else {
        Cow::Borrowed(name)
    };
    percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .to_ascii_lowercase()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::config::{parse, Origin};

    /// A masker with configured additions and two credentials (shared with the event tests).
    pub(crate) fn masker(extra: &str) -> Masker {
        let text = format!(
            "[audit]\nmask_headers = [\"X-Internal\"]\nmask_query_params = [\"Session\"]\n[credentials.api]\nheader = {{ name = \"X-Custom-Auth\", value = {{ value = \"s3cr3t-value\" }} }}\n[credentials.nexus]\nbasic = {{ username = \"svc\", password = {{ value = \"pw-9\" }} }}\n{extra}"
        );
        let config = parse(&text, Origin::Embedded, std::path::Path::new("."), false).unwrap();
        Masker::new(&config)
    }

    fn shown(masker: &Masker, map: &HeaderMap) -> serde_json::Value {
        let mut out = Vec::new();
        masker.write_headers(&mut out, map);
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn headers_are_masked_by_name_case_insensitively_including_repeats() {
        let m = masker("");
        let mut h = HeaderMap::new();
        h.append("authorization", "Bearer abc".parse().unwrap());
        h.append("Cookie", "a=1".parse().unwrap());
        h.append("cookie", "b=2".parse().unwrap());
        h.append("x-internal", "1".parse().unwrap());
        h.append("x-custom-auth", "s3cr3t-value".parse().unwrap());
        h.append("accept", "text/html".parse().unwrap());
        h.append("accept", "application/json".parse().unwrap());
        let shown = shown(&m, &h);
        assert_eq!(shown["authorization"], HIDDEN);
        assert_eq!(shown["cookie"], HIDDEN);
        assert_eq!(shown["x-internal"], HIDDEN);
        assert_eq!(
            shown["x-custom-auth"], HIDDEN,
            "a credential's header name is masked"
        );
        assert_eq!(shown["accept"], "text/html, application/json");
    }

    #[test]
    fn query_parameters_are_masked_by_name() {
        let m = masker("");
        assert_eq!(
            m.query("per_page=100&token=abc&Access_Token=x&session=s&%6Bey=v&keep=1&code"),
            "per_page=100&token=<HIDDEN>&Access_Token=<HIDDEN>&session=<HIDDEN>&%6Bey=<HIDDEN>&keep=1&code"
        );
    }

    #[test]
    fn query_parameter_names_decode_plus_escapes_and_invalid_utf8() {
        assert_eq!(decode_name("a+b"), "a b");
        assert_eq!(decode_name("a%2Bb"), "a+b", "an escaped plus stays a plus");
        assert_eq!(decode_name("API%5fKEY"), "api_key");
        assert_eq!(
            decode_name("%ff%zz%4"),
            "\u{fffd}%zz%4",
            "lossy, bad escapes kept"
        );
        let config = parse(
            "[audit]\nmask_query_params = [\"My Param\"]\n",
            Origin::Embedded,
            std::path::Path::new("."),
            false,
        )
        .unwrap();
        let m = Masker::new(&config);
        assert_eq!(
            m.query("my+param=1&my%20param=2&my%2Bparam=3&a%5Fkey=4&api%5Fkey=5"),
            "my+param=<HIDDEN>&my%20param=<HIDDEN>&my%2Bparam=3&a%5Fkey=4&api%5Fkey=<HIDDEN>"
        );
    }

    #[test]
    fn a_private_key_among_the_secrets_keeps_the_automaton_small() {
        // A 2048-bit RSA key in PEM (27 lines of 64 characters): the key and each line.
        let line = |i: usize| -> String {
            (0..64)
                .map(|j| char::from(b'A' + u8::try_from((i * 31 + j * 7) % 26).unwrap()))
                .collect()
        };
        let pem: String = (0..27).map(|i| line(i) + "\n").collect();
        let mut secrets = vec![Zeroizing::new(pem)];
        secrets.extend((0..27).map(|i| Zeroizing::new(line(i))));
        let Secrets::Automaton(automaton) = Masker::secrets(secrets) else {
            panic!("an automaton");
        };
        assert!(
            automaton.memory_usage() < 512 << 10,
            "{} bytes",
            automaton.memory_usage()
        );
    }

    #[test]
    fn secrets_are_scrubbed_anywhere() {
        let m = masker("");
        let mut line =
            "{\"path\":\"/x/s3cr3t-value/y\",\"error\":\"pw-9 and c3ZjOnB3LTk=\"}".to_owned();
        m.scrub(&mut line);
        assert_eq!(
            line,
            "{\"path\":\"/x/<HIDDEN>/y\",\"error\":\"<HIDDEN> and <HIDDEN>\"}"
        );
    }

    #[test]
    fn a_secret_containing_another_is_scrubbed_whole_and_clean_lines_kept() {
        let m = masker("[[clients]]\nname = \"ci\"\ntoken = { value = \"s3cr3t-value-longer\" }\n");
        let mut line = "/s3cr3t-value-longer/s3cr3t-value/s3cr3t-valu".to_owned();
        m.scrub(&mut line);
        assert_eq!(line, "/<HIDDEN>/<HIDDEN>/s3cr3t-valu");
        let mut clean = "nothing secret here: <HIDDEN>".to_owned();
        let before = clean.as_ptr();
        m.scrub(&mut clean);
        assert_eq!(clean, "nothing secret here: <HIDDEN>");
        assert_eq!(
            clean.as_ptr(),
            before,
            "a line without secrets is not reallocated"
        );
    }
}
