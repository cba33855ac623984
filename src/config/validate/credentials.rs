//! Validation of `[credentials.*]`: every secret source resolved into a [`Credential`] (or, for
//! commands that never read secrets, everything but the secret checked), literal secrets warned
//! about, secret files noted for rotation watching.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::error::Problems;
use crate::config::Secrets;
use crate::credentials::{
    AwsSigV4, Credential, CredentialSpec, Credentials, GithubApp, Minted, Minter, OAuth2,
    SecretSource, Signers,
};

/// What `[credentials.*]` validates into: static, minted and signing credentials by kind.
pub(super) struct Validated {
    pub credentials: Credentials,
    pub minted: Minted,
    pub signers: Signers,
}

/// `[credentials.*]`: with [`Secrets::Resolve`], every secret is resolved now, so a missing one
/// fails at load, not at the first request that needs it. With [`Secrets::Skip`] the same checks
/// run on everything but the secret, and no credential is returned.
pub(super) fn credentials(
    specs: &BTreeMap<String, CredentialSpec>,
    base: &Path,
    secrets: Secrets,
    p: &mut Problems,
    warnings: &mut Vec<String>,
    secret_files: &mut Vec<PathBuf>,
) -> Validated {
    let mut credentials = Credentials::new();
    let mut minted = Minted::new();
    let mut signers = Signers::new();
    for (name, spec) in specs {
        let (source, sub) = spec.source();
        let sources = match spec {
            CredentialSpec::AwsSigv4(a) => a.sources(),
            _ => vec![(source, sub)],
        };
        for (source, sub) in sources {
            if let SecretSource::Value(_) = source {
                warnings.push(format!(
                    "credentials.{name}.{sub}: a literal `value` secret is meant for tests; use env or file"
                ));
            }
            if let Some(file) = source.file() {
                secret_files.push(base.join(file));
            }
        }
        if let CredentialSpec::AwsSigv4(a) = spec {
            // Every key resolved now: a missing one is a load (and `check`) error naming it.
            let result = match secrets {
                Secrets::Resolve => AwsSigV4::build(name, a, base).map(Some),
                Secrets::Skip => AwsSigV4::check(a).map(|()| None),
            };
            match result {
                Ok(Some(c)) => {
                    signers.insert(name.clone(), std::sync::Arc::new(c));
                }
                Ok(None) => {}
                Err(e) => p.add(
                    format!("credentials.{name}.{}", sigv4_key(&e)),
                    e.to_string(),
                ),
            }
            continue;
        }
        if let CredentialSpec::Oauth2(o) = spec {
            // Minted kinds: checked and their secret resolved now; never minted here (§10).
            match secrets {
                Secrets::Resolve => match OAuth2::build(name, o, base) {
                    Ok(c) => {
                        minted.insert(name.clone(), std::sync::Arc::new(Minter::OAuth2(c)));
                    }
                    Err(e) => p.add(
                        format!("credentials.{name}.{}", oauth2_key(&e, sub)),
                        e.to_string(),
                    ),
                },
                Secrets::Skip => {
                    if let Err(e) = OAuth2::check(o) {
                        p.add(
                            format!("credentials.{name}.{}", oauth2_key(&e, sub)),
                            e.to_string(),
                        );
                    }
                }
            }
            continue;
        }
        if let CredentialSpec::GithubApp(g) = spec {
            // The key is read and parsed now: a malformed key is a load (and `check`) error.
            let result = match secrets {
                Secrets::Resolve => GithubApp::build(name, g, base).map(Some),
                Secrets::Skip => GithubApp::check(g).map(|_| None),
            };
            match result {
                Ok(Some(c)) => {
                    minted.insert(name.clone(), std::sync::Arc::new(Minter::GithubApp(c)));
                }
                Ok(None) => {}
                Err(e) => p.add(
                    format!("credentials.{name}.{}", github_app_key(&e, sub)),
                    e.to_string(),
                ),
            }
            continue;
        }
        let built = match secrets {
            Secrets::Resolve => Credential::build(name, spec, base).map(Some),
            Secrets::Skip => Credential::check(name, spec).map(|()| None),
        };
        match built {
            Ok(Some(c)) => {
                credentials.insert(name.clone(), c);
            }
            Ok(None) => {}
            Err(e) => {
                // The key the error is about: the header name, the prefix or the username where
                // those are wrong, else the secret source.
                use crate::credentials::CredentialError as E;
                let key = match &e {
                    E::HeaderName(_) => "header.name",
                    E::NotHeaderSafe(key) => key,
                    _ => sub,
                };
                p.add(format!("credentials.{name}.{key}"), e.to_string())
            }
        }
    }
    Validated {
        credentials,
        minted,
        signers,
    }
}

/// The key an `aws_sigv4` error is about: the scope key, or the secret source that failed.
fn sigv4_key(e: &crate::credentials::CredentialError) -> &'static str {
    use crate::credentials::CredentialError as E;
    match e {
        E::Scope(key) => key,
        E::KeySecret(key, _) => key,
        _ => "aws_sigv4",
    }
}

/// The key an `oauth2` error is about.
fn oauth2_key(e: &crate::credentials::CredentialError, secret_key: &'static str) -> &'static str {
    use crate::credentials::CredentialError as E;
    match e {
        E::TokenUrl(_) => "oauth2.token_url",
        E::Template(_) => "oauth2.scopes",
        E::NotHeaderSafe(_) => "oauth2.client_id",
        _ => secret_key,
    }
}

/// The key a `github_app` error is about.
fn github_app_key(
    e: &crate::credentials::CredentialError,
    secret_key: &'static str,
) -> &'static str {
    use crate::credentials::CredentialError as E;
    match e {
        E::ApiUrl(_) => "github_app.api_url",
        E::Template(_) => "github_app.repositories",
        E::NotDigits(_) => "github_app.installation_id",
        E::NotHeaderSafe(_) => "github_app.app_id",
        _ => secret_key,
    }
}
