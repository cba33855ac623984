//! Validation of `[[clients]]`: names unique and not reserved, each identifiable (a token or
//! networks), tokens resolved (unless the command never reads secrets).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::config::error::Problems;
use crate::config::frozen::{ClaimPattern, Client, OidcClient};
use crate::config::raw::{RawClient, RawOidc};
use crate::config::validate::network::cidrs;
use crate::config::Secrets;
use crate::credentials::SecretSource;

/// Names that are not client names: they are what the spec calls unidentified traffic.
const RESERVED_CLIENT_NAMES: [&str; 2] = ["anonymous", "unauthenticated"];

/// `[[clients]]`. Also returns the names host rules may refer to: the valid ones only, so a rule
/// naming a reserved or malformed client is reported too. With [`Secrets::Skip`], tokens are not
/// read and every client's `token` is `None`.
pub(super) fn clients(
    raw: &[RawClient],
    base: &Path,
    secrets: Secrets,
    p: &mut Problems,
    warnings: &mut Vec<String>,
    secret_files: &mut Vec<PathBuf>,
) -> (Vec<Client>, HashSet<String>) {
    let mut clients = Vec::new();
    let mut names = HashSet::new();
    for (i, c) in raw.iter().enumerate() {
        let key = format!("clients[{i}]");
        // ':' would split the proxy URL's `user:token` ambiguously.
        if c.name.is_empty() || c.name.contains(':') {
            p.add(
                format!("{key}.name"),
                "must be non-empty and contain no ':'",
            );
        } else if RESERVED_CLIENT_NAMES.contains(&c.name.as_str()) {
            p.add(format!("{key}.name"), format!("{:?} is reserved", c.name));
        } else if !names.insert(c.name.clone()) {
            p.add(
                format!("{key}.name"),
                format!("client {:?} is defined twice", c.name),
            );
        }
        let networks = cidrs(
            &format!("{key}.networks"),
            c.networks.as_deref().unwrap_or(&[]),
            p,
        );
        let oidc = c
            .oidc
            .as_ref()
            .and_then(|o| oidc(&format!("{key}.oidc"), o, base, secrets, p, secret_files));
        match (&c.oidc, c.token.is_some() || !networks.is_empty()) {
            (None, false) => p.add(
                key.clone(),
                "needs a token, networks or oidc to identify it",
            ),
            (Some(_), true) => p.add(
                key.clone(),
                "an oidc client is identified by its token alone: no token or networks",
            ),
            _ => {}
        }
        if let Some(SecretSource::Value(_)) = &c.token {
            warnings.push(format!(
                "{key}.token: a literal `value` secret is meant for tests"
            ));
        }
        if let Some(file) = c.token.as_ref().and_then(SecretSource::file) {
            secret_files.push(base.join(file));
        }
        let token = match (secrets, &c.token) {
            (Secrets::Resolve, Some(source)) => match source.resolve(base) {
                Ok(secret) => Some(secret),
                Err(e) => {
                    p.add(format!("{key}.token"), e.to_string());
                    None
                }
            },
            (Secrets::Skip, _) | (_, None) => None,
        };
        clients.push(Client {
            name: c.name.clone(),
            token,
            networks,
            mode: c.mode,
            oidc,
        });
    }
    (clients, names)
}

/// A client's `oidc` table: the issuer an absolute http(s) URL, an audience, claim patterns that
/// compile, and the `jwks_file` (when given) read and parsed now — and watched, so a reload
/// picks up rotated keys. Commands that read no secrets ([`Secrets::Skip`]) skip the file too: a
/// pipeline container running `env` has no business with the issuer's keys.
fn oidc(
    key: &str,
    raw: &RawOidc,
    base: &Path,
    secrets: Secrets,
    p: &mut Problems,
    secret_files: &mut Vec<PathBuf>,
) -> Option<OidcClient> {
    let before = p.len();
    if crate::credentials::endpoint_url(&raw.issuer).is_none() {
        p.add(
            format!("{key}.issuer"),
            format!(
                "{:?} is not an absolute https:// (or http://) URL",
                raw.issuer
            ),
        );
    }
    if raw.audience.is_empty() {
        p.add(format!("{key}.audience"), "must not be empty");
    }
    let mut claims = Vec::new();
    for (name, value) in &raw.claims {
        match ClaimPattern::new(&value.text()) {
            Ok(pattern) if !name.is_empty() => claims.push((name.clone(), pattern)),
            Ok(_) => p.add(format!("{key}.claims"), "a claim name must not be empty"),
            Err(e) => p.add(format!("{key}.claims.{name}"), e.to_string()),
        }
    }
    let jwks = match &raw.jwks_file {
        None => None,
        Some(_) if secrets == Secrets::Skip => None,
        Some(file) => {
            let path = base.join(file);
            secret_files.push(path.clone());
            let parsed = std::fs::read(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
                .and_then(|bytes| {
                    serde_json::from_slice::<jsonwebtoken::jwk::JwkSet>(&bytes)
                        .map_err(|e| format!("{} is not a JWKS: {e}", path.display()))
                });
            match parsed {
                Ok(set) => Some(std::sync::Arc::new(set)),
                Err(why) => {
                    p.add(format!("{key}.jwks_file"), why);
                    None
                }
            }
        }
    };
    (p.len() == before).then(|| OidcClient {
        issuer: std::sync::Arc::from(raw.issuer.as_str()),
        audience: raw.audience.clone(),
        claims,
        jwks,
    })
}
