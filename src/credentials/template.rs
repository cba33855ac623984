//! Claim templates (spec §4, §10): `{claims.NAME}` in a minted credential's narrowing
//! (`github_app.repositories`, `oauth2.scopes`, `oauth2.audience`) is replaced by the requesting
//! OIDC client's claim, so each pipeline's token reaches only what its own claims name. The
//! token cache keeps one token per rendered value ([`super::Minter::render`]).

use serde_json::{Map, Value};

/// A verified token's claims.
pub type Claims = Map<String, Value>;

const OPEN: &str = "{claims.";

/// A request's client lacks a claim a credential's template needs (403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("credential {credential} needs claim {claim}")]
pub struct MissingClaim {
    /// The credential.
    pub credential: String,
    /// The claim.
    pub claim: String,
}

/// Whether `text` holds a placeholder.
pub fn is_template(text: &str) -> bool {
    text.contains(OPEN)
}

/// Checks every placeholder in `text` is `{claims.NAME}` with a non-empty NAME of letters,
/// digits, `_`, `-`, `.` or `:`.
pub fn check(text: &str) -> Result<(), String> {
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("{text:?}: a {{claims. placeholder is not closed"))?;
        let name = &after[..end];
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
        if !valid {
            return Err(format!(
                "{text:?}: {{claims.{name}}} is not a claim placeholder"
            ));
        }
        rest = &after[end + 1..];
    }
    Ok(())
}

/// `text` with every `{claims.NAME}` replaced by the claim's text (a string as it is, a number or
/// boolean as its JSON text). `Err(NAME)` when there are no claims or the claim is missing or
/// not a scalar.
pub fn render(text: &str, claims: Option<&Claims>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        out.push_str(&rest[..start]);
        let after = &rest[start + OPEN.len()..];
        let Some(end) = after.find('}') else {
            // Validation refuses this; render it literally rather than fail a request.
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let name = &after[..end];
        let value = claims.and_then(|c| c.get(name));
        match value {
            Some(Value::String(s)) => out.push_str(s),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => out.push_str(&v.to_string()),
            _ => return Err(name.to_owned()),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_render_from_claims() {
        let claims: Claims = serde_json::from_str(
            r#"{"repository":"acme/app","repository_id":42,"fork":false,"groups":["a"]}"#,
        )
        .unwrap();
        let c = Some(&claims);
        assert_eq!(render("{claims.repository}", c).unwrap(), "acme/app");
        assert_eq!(
            render("repo:{claims.repository}:id={claims.repository_id}", c).unwrap(),
            "repo:acme/app:id=42"
        );
        assert_eq!(render("fork={claims.fork}", c).unwrap(), "fork=false");
        assert_eq!(render("plain", None).unwrap(), "plain");
        assert_eq!(render("{claims.ref}", c).unwrap_err(), "ref");
        assert_eq!(render("{claims.groups}", c).unwrap_err(), "groups");
        assert_eq!(
            render("{claims.repository}", None).unwrap_err(),
            "repository"
        );
    }

    #[test]
    fn syntax_is_checked() {
        assert!(check("{claims.repository}").is_ok());
        assert!(check("a-{claims.x}-{claims.y_z}").is_ok());
        assert!(check("no placeholder {at all}").is_ok());
        assert!(check("{claims.repository").is_err());
        assert!(check("{claims.}").is_err());
        assert!(check("{claims.a b}").is_err());
    }
}
