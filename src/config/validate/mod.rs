//! Validation: turns a [`RawConfig`] into a frozen [`Config`], or lists every problem in it.
//!
//! One function per section, one file each (`listen`, `network`, `credentials`, `clients`,
//! `hosts`, `audit`), each recording what is wrong in the shared [`Problems`] list rather than
//! stopping at the first mistake, so `check` shows an operator everything at once. This file runs
//! them in order (sections that refer to others, like host rules naming credentials and clients,
//! after those) and assembles the [`Config`]. Secrets are resolved here: a config whose secrets
//! cannot be read is invalid. With [`Secrets::Skip`] (`env`, `ca show`, `ca init`) the same code
//! runs but reads no secret source; `config::load_unresolved` hides the result behind
//! [`crate::config::UnresolvedConfig`], so a config without its secrets is never run.

mod audit;
mod clients;
mod credentials;
mod hosts;
mod listen;
mod network;

use std::path::Path;
use std::sync::Arc;

use crate::config::error::Problems;
use crate::config::frozen::{Config, Origin, SigningSettings, TlsSettings};
use crate::config::raw::{RawConfig, RawTls};
use crate::config::validate::audit::audit;
use crate::config::validate::clients::clients;
use crate::config::validate::credentials::credentials;
use crate::config::validate::hosts::hosts;
use crate::config::validate::listen::listen_and_limits;
use crate::config::validate::network::network;
use crate::config::{ConfigErrors, Secrets};

/// Validates every section of `raw`; relative paths are resolved against `base`; secret sources
/// are read or not as `secrets` says.
pub(super) fn validate(
    raw: RawConfig,
    origin: Origin,
    base: &Path,
    secrets: Secrets,
    overrides: Vec<(String, String)>,
) -> Result<Config, ConfigErrors> {
    let mut p = Problems::new(&origin, overrides);
    let mut warnings = Vec::new();
    let mut secret_files = Vec::new();

    let (listen, limits) = listen_and_limits(&raw.listen, &raw.limits, &mut p);
    let network = network(&raw.network, &mut p);
    let credentials::Validated {
        credentials,
        minted,
        signers,
    } = credentials(
        &raw.credentials,
        base,
        secrets,
        &mut p,
        &mut warnings,
        &mut secret_files,
    );
    let (clients, client_names) = clients(
        &raw.clients,
        base,
        secrets,
        &mut p,
        &mut warnings,
        &mut secret_files,
    );
    let rules = hosts(
        &raw.hosts,
        &raw.credentials,
        &client_names,
        &mut p,
        &mut warnings,
    );
    let audit = audit(&raw.audit, base, &mut p);
    let signing = raw.signing.as_ref().map(|s| SigningSettings {
        key: base.join(&s.key),
        key_id: s.key_id.clone(),
        max_body_bytes: s.max_body_bytes,
        rotation_overlap: std::time::Duration::from_secs(s.rotation_overlap_seconds),
    });
    if let Some(s) = &raw.signing {
        // keyid is a structured-field string: printable ASCII; kept simple for receivers.
        let printable = s
            .key_id
            .bytes()
            .all(|b| (0x21..0x7f).contains(&b) && b != b'"' && b != b'\\');
        if s.key_id.is_empty() || !printable {
            p.add(
                "signing.key_id",
                "must be non-empty printable ASCII without quotes or backslashes",
            );
        }
        if s.max_body_bytes == 0 {
            p.add("signing.max_body_bytes", "must be at least 1");
        }
    }
    for (i, h) in raw.hosts.iter().enumerate() {
        if h.sign && raw.signing.is_none() {
            p.add(
                format!("hosts[{i}].sign"),
                "needs a [signing] section (the key to sign with)",
            );
        }
    }
    p.into_result()?;

    Ok(Config {
        origin,
        base_dir: base.to_path_buf(),
        listen,
        limits,
        tls: tls(&raw.tls, base),
        network: Arc::new(network),
        mode: raw.policy.mode,
        audit,
        credentials,
        minted,
        signers,
        rules,
        clients,
        secret_files,
        signing,
        warnings,
    })
}

/// `[tls]`: nothing to reject here (whether the files load is checked by the TLS module when it
/// builds its configs); paths resolved.
fn tls(t: &RawTls, base: &Path) -> TlsSettings {
    TlsSettings {
        ca_cert: base.join(&t.ca_cert),
        ca_key: base.join(&t.ca_key),
        upstream_roots: t.upstream_roots,
        extra_upstream_ca: t.extra_upstream_ca.iter().map(|f| base.join(f)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use crate::config::tests::{parse_str, parse_str_unresolved};
    use crate::config::AuditOutput;

    #[test]
    fn semantic_errors_are_all_reported() {
        let text = r#"
[credentials.gh]
bearer = { env = "PORTCULLIS_TEST_UNSET_VAR_1" }
[[hosts]]
host = "ok.example"
[[hosts]]
host = "a*.example.com"
[[hosts]]
host = "x.example"
credential = "missing"
methods = ["GET", "BAD METHOD"]
paths = ["nope"]
ports = []
"#;
        let err = parse_str(text).unwrap_err();
        let keys: Vec<_> = err.0.iter().filter_map(|e| e.key.clone()).collect();
        for want in [
            "credentials.gh.bearer",
            "hosts[1].host",
            "hosts[2].credential",
            "hosts[2].methods[1]",
            "hosts[2].paths[0]",
            "hosts[2].ports",
        ] {
            assert!(keys.iter().any(|k| k == want), "missing {want} in {err}");
        }
        assert!(err.to_string().contains("PORTCULLIS_TEST_UNSET_VAR_1"));
    }

    #[test]
    fn unresolved_validation_reads_no_secret_and_checks_everything_else() {
        let secrets = r#"
[credentials.gh]
bearer = { env = "PORTCULLIS_TEST_UNSET_VAR_2" }
[credentials.nexus]
basic = { username = "svc", password = { file = "no-such-secret" } }
[[clients]]
name = "ci"
token = { env = "PORTCULLIS_TEST_UNSET_VAR_3" }
[[hosts]]
host = "api.github.com"
credential = "gh"
clients = ["ci"]
"#;
        let err = parse_str(secrets).unwrap_err();
        for key in [
            "credentials.gh.bearer",
            "credentials.nexus.basic.password",
            "clients[0].token",
        ] {
            assert!(err.0.iter().any(|e| e.key.as_deref() == Some(key)), "{err}");
        }
        let c = parse_str_unresolved(secrets).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.credentials.is_empty(), "no credential without its secret");
        assert!(c.clients.iter().all(|c| c.token.is_none()));
        assert_eq!(c.clients.len(), 1);
        // Everything that is not a secret is still checked, by the same code.
        let err = parse_str_unresolved(&format!(
            "{secrets}[credentials.bad]\nheader = {{ name = \"X Bad\", value = {{ env = \"V\" }} }}\n\
             [[clients]]\nname = \"ci\"\nnetworks = [\"10.0.0.0/8\"]\n[[hosts]]\nhost = \"a.*.b\"\n"
        ))
        .unwrap_err();
        let keys: Vec<_> = err.0.iter().filter_map(|e| e.key.clone()).collect();
        assert_eq!(
            keys,
            [
                "credentials.bad.header.name",
                "clients[1].name",
                "hosts[1].host"
            ],
            "{err}"
        );
    }

    #[test]
    fn relative_paths_follow_the_config_folder() {
        let c =
            parse_str("[tls]\nca_cert = \"ca.pem\"\n[audit]\noutput = \"audit.log\"\n").unwrap();
        assert_eq!(c.tls.ca_cert, PathBuf::from("/etc/portcullis/ca.pem"));
        assert_eq!(
            c.audit.output,
            AuditOutput::File("/etc/portcullis/audit.log".into())
        );
    }
}
