//! Validation of `[[clients]]`: names unique and not reserved, each identifiable (a token or
//! networks), tokens resolved (unless the command never reads secrets).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::config::error::Problems;
use crate::config::frozen::Client;
use crate::config::raw::RawClient;
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
        if c.token.is_none() && networks.is_empty() {
            p.add(key.clone(), "needs a token or networks to identify it");
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
        });
    }
    (clients, names)
}
