//! The human summary `portcullis check` prints ([`Config::summary`]): listeners, mode, host
//! rules, credential names (never values), clients and what each can reach, and warnings.

use http::Method;

use crate::config::frozen::Config;

impl Config {
    /// A human summary for `portcullis check`.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let push = |out: &mut String, line: String| {
            out.push_str(&line);
            out.push('\n');
        };
        push(&mut out, format!("config: {} (valid)", self.origin));
        push(
            &mut out,
            match self.listen.transparent {
                Some(t) => format!(
                    "listen: proxy {} admin {} transparent {t}",
                    self.listen.proxy, self.listen.admin
                ),
                None => format!(
                    "listen: proxy {} admin {}",
                    self.listen.proxy, self.listen.admin
                ),
            },
        );
        push(
            &mut out,
            format!("policy mode: {:?}", self.mode).to_lowercase(),
        );
        push(&mut out, format!("host rules ({}):", self.rules.len()));
        for r in &self.rules {
            let mut line = format!(
                "  {} ports {:?} {}",
                r.name,
                r.ports,
                // Port 80 alone is plain http: every request is inspected, nothing is tunneled or
                // intercepted.
                if r.ports.iter().all(|p| *p == 80) {
                    "plain-http"
                } else if r.intercepts() {
                    "intercept"
                } else {
                    "tunnel"
                }
            );
            if let Some(c) = &r.credential {
                line.push_str(&format!(" credential={c}"));
            }
            if let Some(m) = &r.methods {
                let names: Vec<&str> = m.iter().map(Method::as_str).collect();
                line.push_str(&format!(" methods={}", names.join(",")));
            }
            if r.paths.is_some() {
                line.push_str(&format!(" paths={}", r.path_globs.join(",")));
            }
            if let Some(c) = &r.clients {
                line.push_str(&format!(" clients={}", c.join(",")));
            }
            if r.sign {
                line.push_str(" signed");
            }
            push(&mut out, line);
        }
        // Static, minted and signing credentials alike, by name.
        let mut names: Vec<&str> = (self.credentials.keys())
            .chain(self.minted.keys())
            .chain(self.signers.keys())
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        push(
            &mut out,
            format!("credentials ({}): {}", names.len(), names.join(", ")),
        );
        if self.clients.is_empty() {
            push(
                &mut out,
                "clients: none (every connection is `anonymous`)".into(),
            );
        } else {
            push(&mut out, format!("clients ({}):", self.clients.len()));
            for c in &self.clients {
                let reach: Vec<String> = self
                    .rules
                    .iter()
                    .filter(|r| r.clients.as_ref().is_none_or(|cs| cs.contains(&c.name)))
                    .map(|r| match &r.credential {
                        Some(cred) => format!("{} (credential {cred})", r.name),
                        None => r.name.to_string(),
                    })
                    .collect();
                push(&mut out, format!("  {}: {}", c.name, reach.join(", ")));
                if let Some(o) = &c.oidc {
                    let claims: Vec<String> = o
                        .claims
                        .iter()
                        .map(|(name, pattern)| format!("{name}={}", pattern.as_str()))
                        .collect();
                    let keys = match o.jwks {
                        Some(_) => "jwks_file",
                        None => "discovery",
                    };
                    push(
                        &mut out,
                        format!(
                            "    oidc issuer={} audience={} keys={keys} claims: {}",
                            o.issuer,
                            o.audience,
                            if claims.is_empty() {
                                "(any)".to_owned()
                            } else {
                                claims.join(" ")
                            }
                        ),
                    );
                }
            }
        }
        if let Some(s) = &self.signing {
            let state = match s.key.exists() {
                true => "",
                false => " (missing: generated at first start)",
            };
            push(
                &mut out,
                format!("signing key: {} keyid={}{state}", s.key.display(), s.key_id),
            );
        }
        for w in &self.warnings {
            push(&mut out, format!("warning: {w}"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::parse_str;

    #[test]
    fn summary_names_credentials_and_reach_but_no_secret() {
        let c = parse_str(
            r#"
[credentials.gh]
bearer = { value = "sekrit-canary" }
[[clients]]
name = "frontend"
networks = ["10.1.0.0/16"]
[[hosts]]
host = "api.github.com"
credential = "gh"
clients = ["frontend"]
[[hosts]]
host = "*.pythonhosted.org"
"#,
        )
        .unwrap();
        let text = c.summary();
        assert!(text.starts_with("config: test.toml (valid)\n"), "{text}");
        assert!(text.contains("host rules (2):"), "{text}");
        assert!(
            text.contains(
                "  api.github.com ports [80, 443] intercept credential=gh clients=frontend\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("  *.pythonhosted.org ports [80, 443] tunnel\n"),
            "{text}"
        );
        assert!(text.contains("credentials (1): gh\n"), "{text}");
        assert!(
            text.contains("  frontend: api.github.com (credential gh), *.pythonhosted.org\n"),
            "{text}"
        );
        assert!(text.contains("warning: credentials.gh.bearer"), "{text}");
        assert!(!text.contains("sekrit-canary"), "{text}");
    }
}
