//! Client identity (spec §4): which pipeline is asking. Without `[[clients]]` every connection is
//! `anonymous`. With clients, a request identifies itself by `Proxy-Authorization: Basic
//! base64(name:token)` (what curl, git, pip, npm and cargo send for
//! `HTTP_PROXY=http://name:token@host:port`), compared in constant time, or by coming from a
//! client's `networks`; anything else is 407.

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine;
use http::HeaderValue;
use ipnet::IpNet;
use ring::digest::{digest, SHA256};
use subtle::ConstantTimeEq;

use crate::config::Config;
use crate::policy::Mode;

/// The name of every connection when no clients are configured.
pub const ANONYMOUS: &str = "anonymous";
/// The metric label of requests that failed to identify.
pub const UNAUTHENTICATED: &str = "unauthenticated";

struct Known {
    name: Arc<str>,
    token_digest: Option<[u8; 32]>,
    networks: Vec<IpNet>,
    mode: Option<Mode>,
}

/// The configured clients, ready to identify requests.
pub struct Clients {
    known: Vec<Known>,
    anonymous: Arc<str>,
    unauthenticated: Arc<str>,
    default_mode: Mode,
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clients")
            .field("count", &self.known.len())
            .finish_non_exhaustive()
    }
}

/// Who a request is, and the policy mode that applies to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Client name (`anonymous` without clients); shared, so identifying allocates nothing.
    pub name: Arc<str>,
    /// `policy.mode`, or the client's own `mode`.
    pub mode: Mode,
}

/// Why a request could not be identified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    /// No credentials, and the source address is in no client's networks.
    #[error("proxy credentials required")]
    Missing,
    /// Credentials were sent but do not match a client (named, if the name is a client's).
    #[error("wrong proxy credentials")]
    Wrong {
        /// The claimed client, when it is a configured one (for the metric label).
        claimed: Option<String>,
    },
}

impl AuthFailure {
    /// Bounded metric label: the claimed configured client, else `unknown`.
    pub fn label(&self) -> &str {
        match self {
            Self::Wrong {
                claimed: Some(name),
            } => name,
            _ => "unknown",
        }
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

impl Clients {
    /// Compiles the clients of `config`.
    pub fn new(config: &Config) -> Self {
        Self {
            known: config
                .clients
                .iter()
                .map(|c| Known {
                    name: Arc::from(c.name.as_str()),
                    token_digest: c.token.as_ref().map(|t| sha256(t.expose().as_bytes())),
                    networks: c.networks.clone(),
                    mode: c.mode,
                })
                .collect(),
            anonymous: Arc::from(ANONYMOUS),
            unauthenticated: Arc::from(UNAUTHENTICATED),
            default_mode: config.mode,
        }
    }

    /// The name a request has until it is identified (shared: naming it allocates nothing).
    pub fn unauthenticated(&self) -> &Arc<str> {
        &self.unauthenticated
    }

    /// Identifies a request from its `Proxy-Authorization` header and source address.
    pub fn identify(
        &self,
        proxy_authorization: Option<&HeaderValue>,
        source: IpAddr,
    ) -> Result<Identity, AuthFailure> {
        if self.known.is_empty() {
            return Ok(Identity {
                name: self.anonymous.clone(),
                mode: self.default_mode,
            });
        }
        let identity = |k: &Known| Identity {
            name: k.name.clone(),
            mode: k.mode.unwrap_or(self.default_mode),
        };
        if let Some(header) = proxy_authorization {
            let (name, token) = parse_basic(header).ok_or(AuthFailure::Wrong { claimed: None })?;
            let given = sha256(token.as_bytes());
            // Compare against every client with a token, so timing says nothing about which
            // names exist or how much of a token matched.
            let mut matched = None;
            for k in &self.known {
                if let Some(want) = &k.token_digest {
                    let same = want.ct_eq(&given) & k.name.as_bytes().ct_eq(name.as_bytes());
                    if bool::from(same) {
                        matched = Some(k);
                    }
                }
            }
            return match matched {
                Some(k) => Ok(identity(k)),
                None => Err(AuthFailure::Wrong {
                    claimed: self
                        .known
                        .iter()
                        .find(|k| *k.name == *name)
                        .map(|k| k.name.to_string()),
                }),
            };
        }
        let source = match source {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(source, IpAddr::V4),
            v4 => v4,
        };
        self.known
            .iter()
            .find(|k| k.networks.iter().any(|n| n.contains(&source)))
            .map(identity)
            .ok_or(AuthFailure::Missing)
    }
}

/// `Basic base64(name:token)` → (name, token).
fn parse_basic(header: &HeaderValue) -> Option<(String, zeroize::Zeroizing<String>)> {
    let text = header.to_str().ok()?;
    let (scheme, encoded) = text.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = zeroize::Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?,
    );
    let pair = std::str::from_utf8(&decoded).ok()?;
    let (name, token) = pair.split_once(':')?;
    Some((name.to_owned(), zeroize::Zeroizing::new(token.to_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, Origin};

    fn clients(extra: &str) -> Clients {
        let text = format!(
            "[[clients]]\nname = \"frontend\"\ntoken = {{ value = \"fe-token\" }}\n[[clients]]\nname = \"release\"\ntoken = {{ value = \"rel-token\" }}\nmode = \"report\"\n[[clients]]\nname = \"runners\"\nnetworks = [\"10.1.0.0/16\"]\n{extra}"
        );
        Clients::new(&parse(&text, Origin::Embedded, std::path::Path::new("."), false).unwrap())
    }

    fn basic(pair: &str) -> HeaderValue {
        HeaderValue::from_str(&format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        ))
        .unwrap()
    }

    const OUTSIDE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    #[test]
    fn tokens_identify_their_client_and_mode() {
        let c = clients("");
        let fe = c
            .identify(Some(&basic("frontend:fe-token")), OUTSIDE)
            .unwrap();
        assert_eq!(
            fe,
            Identity {
                name: "frontend".into(),
                mode: Mode::Enforce
            }
        );
        let rel = c
            .identify(Some(&basic("release:rel-token")), OUTSIDE)
            .unwrap();
        assert_eq!(rel.mode, Mode::Report);
    }

    #[test]
    fn wrong_or_swapped_tokens_fail() {
        let c = clients("");
        for pair in [
            "frontend:rel-token",
            "frontend:fe-tokenX",
            "nobody:fe-token",
            "frontend",
            ":",
        ] {
            assert!(c.identify(Some(&basic(pair)), OUTSIDE).is_err(), "{pair}");
        }
        assert_eq!(
            c.identify(Some(&basic("frontend:nope")), OUTSIDE)
                .unwrap_err()
                .label(),
            "frontend"
        );
        assert_eq!(
            c.identify(Some(&basic("intruder:nope")), OUTSIDE)
                .unwrap_err()
                .label(),
            "unknown"
        );
        let bearer = HeaderValue::from_static("Bearer fe-token");
        assert!(c.identify(Some(&bearer), OUTSIDE).is_err());
    }

    #[test]
    fn networks_identify_without_a_token() {
        let c = clients("");
        let inside: IpAddr = "10.1.4.5".parse().unwrap();
        assert_eq!(&*c.identify(None, inside).unwrap().name, "runners");
        let mapped: IpAddr = "::ffff:10.1.4.5".parse().unwrap();
        assert_eq!(&*c.identify(None, mapped).unwrap().name, "runners");
        assert_eq!(c.identify(None, OUTSIDE), Err(AuthFailure::Missing));
    }

    #[test]
    fn no_clients_means_anonymous() {
        let c =
            Clients::new(&parse("", Origin::Embedded, std::path::Path::new("."), false).unwrap());
        assert_eq!(&*c.identify(None, OUTSIDE).unwrap().name, ANONYMOUS);
    }
}
