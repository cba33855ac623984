//! Pipelines identified by their CI's OIDC token (spec §4) over real sockets, against a local
//! issuer over TLS (tests/common/oidc.rs) whose keys the proxy fetches by discovery through its
//! own dialer: tokens of two repositories and two branches (RSA and EC signed) map to the right
//! clients and reach only their hosts with their credentials; the Bearer and Basic-password
//! forms; every kind of invalid token answers 407 naming why and is counted; verified tokens are
//! cached; a key rotated at the issuer is picked up on its unknown `kid` (at most one refetch a
//! minute); a `jwks_file` with the issuer down; claim matching (globs, numbers, booleans,
//! arrays); audit `client`/`subject`; the CONNECT identity inside an intercepted tunnel. The
//! first two tests check the test infrastructure itself, without the proxy's OIDC support.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::oidc::*;
use common::oidc_proxy::*;
use common::*;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

/// Smoke: the issuer serves discovery and a swappable JWKS over TLS, counting fetches, and the
/// tokens the helpers make are exactly what their names say, judged by PyJWT.
#[tokio::test]
async fn issuer_serves_discovery_and_jwks() {
    let (rsa, ec, ed) = (rsa_key("rsa-1"), ec_key("ec-1"), ed_key("ed-1"));
    let issuer = issuer("issuer.test", &[&rsa, &ec, &ed]).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .resolve("issuer.test", issuer.addr)
        .add_root_certificate(reqwest::Certificate::from_pem(issuer.ca_pem.as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .build()
        .unwrap();
    let get = |url: String| {
        let client = client.clone();
        async move {
            let r = client.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap()
        }
    };
    let discovery = get(format!("{}/.well-known/openid-configuration", issuer.url)).await;
    assert_eq!(discovery["issuer"], issuer.url.as_str());
    let jwks_uri = discovery["jwks_uri"].as_str().unwrap().to_owned();
    assert!(
        jwks_uri.starts_with(&format!("{}/", issuer.url)),
        "{jwks_uri}"
    );
    let served = get(jwks_uri.clone()).await;
    assert_eq!(served, jwks(&[&rsa, &ec, &ed]));
    assert_eq!((issuer.discovery_fetches(), issuer.jwks_fetches()), (1, 1));

    let c = issuer.claims("acme/app", "refs/heads/main");
    let sub = "ok repo:acme/app:ref:refs/heads/main";
    for key in [&rsa, &ec, &ed] {
        assert_eq!(pyjwt_verdict(&served, &issuer.url, &key.sign(&c)), sub);
    }
    let with = |change: &dyn Fn(&mut Value)| {
        let mut c = c.clone();
        change(&mut c);
        c
    };
    let expired = with(&|c| c["exp"] = json!(now() - 300));
    let early = with(&|c| c["nbf"] = json!(now() + 300));
    let other_aud = with(&|c| c["aud"] = json!(["someone-else"]));
    let array_aud = with(&|c| c["aud"] = json!(["someone-else", AUDIENCE]));
    let other_iss = with(&|c| c["iss"] = json!("https://elsewhere.test"));
    let valid = rsa.sign(&c);
    let cases = [
        (ec.sign(&array_aud), "ok "),
        (rsa.sign(&expired), "ExpiredSignatureError"),
        (ec.sign(&early), "ImmatureSignatureError"),
        (rsa.sign(&other_aud), "InvalidAudienceError"),
        (rsa.sign(&other_iss), "InvalidIssuerError"),
        (ec_key("ghost").sign(&c), "no key for kid 'ghost'"),
        (unsigned(&rsa.kid, &c), "InvalidAlgorithmError"),
        (
            hs256_keyed_with_public_pem(&rsa, &c),
            "InvalidAlgorithmError",
        ),
        (
            altered(&valid, |c| c["repository"] = json!("acme/lib")),
            "InvalidSignatureError",
        ),
        ("not-a-jwt".to_owned(), "DecodeError"),
    ];
    for (token, want) in &cases {
        let verdict = pyjwt_verdict(&served, &issuer.url, token);
        assert!(verdict.contains(want), "{want}: {verdict}");
    }
    assert!(unsigned(&rsa.kid, &c).ends_with('.'));
    assert_eq!(payload(&valid), c);

    // Rotation: the next fetch serves the new set.
    let rsa2 = rsa_key("rsa-2");
    issuer.set_keys(&[&rsa, &rsa2]);
    let rotated = get(jwks_uri).await;
    assert_eq!(issuer.jwks_fetches(), 2);
    let kids: Vec<&str> = rotated["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, ["rsa-1", "rsa-2"]);
    let fresh = rsa2.sign(&c);
    assert_eq!(pyjwt_verdict(&rotated, &issuer.url, &fresh), sub);
    assert!(pyjwt_verdict(&served, &issuer.url, &fresh).contains("no key"));
    issuer.set_discovery_issuer("https://impostor.test");
    let discovery = get(format!("{}/.well-known/openid-configuration", issuer.url)).await;
    assert_eq!(discovery["issuer"], "https://impostor.test");
}

/// Smoke: the client-side helpers do what the feature tests rely on, checked against a recording
/// server standing in for the proxy and against today's proxy (static clients only).
#[tokio::test]
async fn client_helpers_send_what_they_claim() {
    // bearer_client sends Proxy-Authorization: Bearer on plain requests and on CONNECT.
    let fake_proxy = http_upstream().await;
    let client = bearer_client(&format!("http://{}", fake_proxy.addr), "a.b.c", None);
    let r = client.get("http://anywhere.test/x").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let _ = client.get("https://anywhere.test/y").send().await;
    let seen = fake_proxy.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].uri, "http://anywhere.test/x");
    assert_eq!(seen[1].method, "CONNECT");
    for s in &seen {
        assert_eq!(s.header("proxy-authorization"), Some("Bearer a.b.c"));
    }
    // get_via_connect: the CONNECT's refusal, or the answer inside the intercepted tunnel.
    let up = tls_upstream(&["open.test"]).await;
    let dir = tempfile::tempdir().unwrap();
    up.write_ca(dir.path(), "upstream-ca.pem");
    let port = up.port();
    let proxy = start_proxy_in(dir, &format!("[tls]\nextra_upstream_ca = [\"upstream-ca.pem\"]\n[network]\nallow_cidrs = [\"127.0.0.0/8\"]\nresolve = {{ \"open.test\" = [\"127.0.0.1\"] }}\n[credentials.c]\nbearer = {{ value = \"{MAIN}\" }}\n[[clients]]\nname = \"ci\"\ntoken = {{ value = \"{STATIC_TOKEN}\" }}\n[[hosts]]\nhost = \"open.test\"\nports = [{port}]\ncredential = \"c\"\n")).await;
    let ca = std::fs::read_to_string(proxy.dir.path().join("state/ca.pem")).unwrap();
    let auth = basic("ci", STATIC_TOKEN);
    let r = get_via_connect(proxy.addr, Some(&auth), "open.test", port, "/in", &ca).await;
    assert_eq!(r.status, 200, "{r:?}");
    let uri = up.last().uri;
    assert!(
        uri == "/in" || uri == format!("https://open.test:{port}/in"),
        "{uri}"
    );
    assert_eq!(
        up.last().header("authorization"),
        Some(format!("Bearer {MAIN}").as_str())
    );
    let r = get_via_connect(proxy.addr, None, "open.test", port, "/in", &ca).await;
    assert_eq!(r.status, 407, "{r:?}");
    assert!(
        r.proxy_status().contains("error=http_request_denied"),
        "{r:?}"
    );
    // oidc_count reads a counter whatever the label order, 0 when absent.
    let text = "portcullis_oidc_verifications_total{result=\"ok\",issuer=\"https://i.test:1\"} 3\nportcullis_oidc_verifications_total{issuer=\"unconfigured\",result=\"malformed\"} 2\n";
    assert_eq!(oidc_count(text, "https://i.test:1", "ok"), 3.0);
    assert_eq!(oidc_count(text, "unconfigured", "malformed"), 2.0);
    assert_eq!(oidc_count(text, "https://i.test:1", "expired"), 0.0);
    proxy.stop().await;
}

#[tokio::test]
async fn tokens_of_two_repositories_and_two_branches_reach_only_their_hosts_with_their_credentials()
{
    let s = setup().await;
    // (repository, ref, the client it must be, its host, that host's credential)
    let cases = [
        (
            "acme/app",
            "refs/heads/main",
            "app-main",
            "main-only.test",
            MAIN,
        ),
        // Not main: app-main's ref does not match, so the next client in file order.
        (
            "acme/app",
            "refs/heads/feature",
            "org-builds",
            "org.test",
            ORG,
        ),
        // lib-builds comes before org-builds, which would match too.
        ("acme/lib", "refs/heads/main", "lib-builds", "lib.test", LIB),
        (
            "acme/lib",
            "refs/heads/feature",
            "lib-builds",
            "lib.test",
            LIB,
        ),
    ];
    let mut expected = Vec::new();
    for key in [&s.rsa, &s.ec] {
        for (repository, git_ref, client, allowed, secret) in cases {
            let jwt = s.token(key, repository, git_ref);
            for host in ["main-only.test", "lib.test", "org.test"] {
                let path = format!("/{}/{repository}/{git_ref}/{host}", key.kid);
                let before = s.up.count();
                let r = s.get(&jwt, host, &path).await;
                if host == allowed {
                    assert_eq!(r.status(), 200, "{path}: {}", proxy_status(&r));
                    let seen = s.up.last();
                    assert_eq!(seen.uri, path);
                    let want = format!("Bearer {secret}");
                    assert_eq!(seen.header("authorization"), Some(want.as_str()), "{path}");
                    assert!(seen.header("proxy-authorization").is_none(), "{path}");
                } else {
                    assert_eq!(r.status(), 403, "{path}: {}", proxy_status(&r));
                    assert_eq!(s.up.count(), before, "{path} reached the upstream");
                }
                expected.push((path, client));
            }
        }
    }
    let events = s.proxy.audit_events(expected.len()).await;
    for (path, client) in &expected {
        let e = events
            .iter()
            .find(|e| e["path"] == path.as_str())
            .unwrap_or_else(|| panic!("no event for {path}: {events:#?}"));
        assert_eq!(e["client"], *client, "{e}");
    }
    // Two tokens of each case were verified (one per key), each once.
    assert_eq!(s.count("ok").await, 8.0);
    assert_eq!(s.issuer.jwks_fetches(), 1, "keys are cached");
    s.proxy.stop().await;
}

#[tokio::test]
async fn bearer_and_basic_password_forms_both_identify() {
    let s = setup().await;
    let jwt = s.token(&s.ec, "acme/app", "refs/heads/main");
    let url = s.url("main-only.test", "/forms");
    let want = format!("Bearer {MAIN}");
    let r = s.get(&jwt, "main-only.test", "/forms").await;
    assert_eq!(r.status(), 200, "Bearer: {}", proxy_status(&r));
    // Basic with any user name and the JWT as password, from reqwest and from curl.
    for user in ["oidc", "whatever-user"] {
        let proxy = format!("http://{user}:{jwt}@{}", s.proxy.addr);
        let r = proxied_client(&proxy).get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200, "Basic as {user}: {}", proxy_status(&r));
        assert_eq!(s.up.last().header("authorization"), Some(want.as_str()));
    }
    let rsa_jwt = s.token(&s.rsa, "acme/app", "refs/heads/main");
    let proxy = format!("http://oidc:{rsa_jwt}@{}", s.proxy.addr);
    let out = curl(&["-x", &proxy, &s.url("main-only.test", "/curl")]).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(s.up.last().uri, "/curl");
    assert_eq!(s.up.last().header("authorization"), Some(want.as_str()));
    // An invalid JWT as a Basic password is judged as a JWT (its iss is configured).
    let mut expired = s.issuer.claims("acme/app", "refs/heads/main");
    expired["exp"] = json!(now() - 300);
    let expired = s.rsa.sign(&expired);
    let proxy = format!("http://oidc:{expired}@{}", s.proxy.addr);
    let r = proxied_client(&proxy).get(&url).send().await.unwrap();
    assert_eq!(r.status(), 407);
    assert!(proxy_status(&r).contains("expired"), "{}", proxy_status(&r));
    // A static token, even one shaped like a JWT, is still a static token.
    let proxy = format!("http://static-ci:{STATIC_TOKEN}@{}", s.proxy.addr);
    let r = proxied_client(&proxy)
        .get(s.url("open.test", "/static"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", proxy_status(&r));
    // A JWT naming an issuer that is not configured is a (wrong) static token, and that issuer
    // is never contacted.
    let rogue = ec_key("rogue-1").sign(&claims(&s.rogue.url, "acme/app", "refs/heads/main"));
    let proxy = format!("http://static-ci:{rogue}@{}", s.proxy.addr);
    let r = proxied_client(&proxy).get(&url).send().await.unwrap();
    assert_eq!(r.status(), 407);
    assert_eq!(s.rogue.discovery_fetches() + s.rogue.jwks_fetches(), 0);
    let events = s.proxy.audit_events(7).await;
    let forms: Vec<&Value> = events.iter().filter(|e| e["status"] == 200).collect();
    assert_eq!(forms.len(), 5, "{events:#?}");
    for e in forms {
        let client = if e["path"] == "/static" {
            "static-ci"
        } else {
            "app-main"
        };
        assert_eq!(e["client"], client, "{e}");
    }
    s.proxy.stop().await;
}

#[tokio::test]
async fn each_invalid_token_gets_407_naming_why_and_is_counted() {
    let s = setup().await;
    let c = s.issuer.claims("acme/app", "refs/heads/main");
    let with = |change: &dyn Fn(&mut Value)| {
        let mut c = c.clone();
        change(&mut c);
        c
    };
    let valid = s.rsa.sign(&c);
    let r = s.get(&valid, "main-only.test", "/warm-up").await;
    assert_eq!(r.status(), 200, "{}", proxy_status(&r));
    let fetches = s.issuer.jwks_fetches();
    let unconfigured = "unconfigured";
    let iss = s.issuer.url.as_str();
    // (token, details contain, issuer label)
    let cases: Vec<(String, &str, &str)> = vec![
        (
            s.rsa.sign(&with(&|c| c["exp"] = json!(now() - 300))),
            "expired",
            iss,
        ),
        (
            s.ec.sign(&with(&|c| c["nbf"] = json!(now() + 300))),
            "not yet valid",
            iss,
        ),
        (
            s.rsa.sign(&with(&|c| c["aud"] = json!("someone-else"))),
            "audience",
            iss,
        ),
        (
            s.ec.sign(&with(&|c| c["iss"] = json!(s.rogue.url))),
            "issuer",
            unconfigured,
        ),
        (ec_key("ghost").sign(&c), "no key", iss),
        (unsigned(&s.rsa.kid, &c), "algorithm", iss),
        (hs256_keyed_with_public_pem(&s.rsa, &c), "algorithm", iss),
        (
            altered(&valid, |c| c["repository"] = json!("acme/lib")),
            "signature",
            iss,
        ),
        ("not-a-jwt-at-all".to_owned(), "malformed", unconfigured),
        (
            s.ec.sign(&with(&|c| {
                c["repository"] = json!("evil/app");
                c["repository_owner"] = json!("evil");
            })),
            "no client matches the token's claims",
            iss,
        ),
    ];
    for (i, (token, why, _)) in cases.iter().enumerate() {
        // The token also in the query: refused, it is still masked there in the audit event.
        let r = s
            .get(token, "main-only.test", &format!("/bad/{i}?ref={token}"))
            .await;
        assert_eq!(r.status(), 407, "{why}");
        let status = proxy_status(&r);
        assert!(
            status.starts_with("portcullis; error=http_request_denied; details=\""),
            "{why}: {status}"
        );
        assert!(status.contains(why), "{why}: {status}");
        let body = r.text().await.unwrap();
        for shown in [&status, &body] {
            assert!(
                !shown.contains(token.as_str()),
                "{why}: token echoed: {shown}"
            );
            if signature(token).len() > 10 {
                assert!(!shown.contains(signature(token)), "{why}: {shown}");
            }
        }
        if *why == "no key" {
            assert_eq!(
                s.issuer.jwks_fetches(),
                fetches + 1,
                "an unknown kid refetches the JWKS right away"
            );
        }
    }
    assert_eq!(s.up.count(), 1, "no invalid token reached the upstream");
    let metrics = s.proxy.metrics().await;
    for (issuer, result, n) in [
        (iss, "ok", 1.0),
        (iss, "expired", 2.0),
        (iss, "audience", 1.0),
        (iss, "signature", 4.0),
        (iss, "no_client", 1.0),
        (unconfigured, "issuer", 1.0),
        (unconfigured, "malformed", 1.0),
    ] {
        assert_eq!(
            oidc_count(&metrics, issuer, result),
            n,
            "{issuer} {result}:\n{metrics}"
        );
    }
    // Keys are only fetched for configured issuers, never for the `iss` a token names.
    assert_eq!(s.rogue.discovery_fetches() + s.rogue.jwks_fetches(), 0);
    // Also refused: algorithms the key does not allow (RS384 with the RS256 key; an RSA signature
    // whose header names the EC key) and a token without `exp`.
    let no_exp = with(&|c| {
        c.as_object_mut().unwrap().remove("exp");
    });
    for (token, what) in [
        (s.rsa.sign_as(Algorithm::RS384, &s.rsa.kid, &c), "RS384"),
        (s.rsa.sign_as(Algorithm::RS256, &s.ec.kid, &c), "RSA as EC"),
        (s.rsa.sign(&no_exp), "no exp"),
    ] {
        let r = s.get(&token, "main-only.test", "/x").await;
        assert_eq!(r.status(), 407, "{what}: {}", proxy_status(&r));
    }
    // The proxy keeps serving valid tokens: RSA and EC, an `aud` array holding the audience, and
    // `exp` and `nbf` off by 30 s (within the 60 s leeway).
    for (token, what) in [
        (s.rsa.sign(&c), "RSA"),
        (s.ec.sign(&c), "EC"),
        (
            s.rsa
                .sign(&with(&|c| c["aud"] = json!(["other", AUDIENCE]))),
            "aud array",
        ),
        (
            s.ec.sign(&with(&|c| c["exp"] = json!(now() - 30))),
            "exp leeway",
        ),
        (
            s.rsa.sign(&with(&|c| c["nbf"] = json!(now() + 30))),
            "nbf leeway",
        ),
    ] {
        let r = s.get(&token, "main-only.test", "/after").await;
        assert_eq!(r.status(), 200, "{what}: {}", proxy_status(&r));
    }
    let events = s.proxy.audit_events(19).await;
    for e in &events {
        let text = e.to_string();
        for (token, _, _) in &cases {
            assert!(
                !text.contains(token.as_str()),
                "token in an audit event: {text}"
            );
        }
    }
    s.proxy.stop().await;
}

#[tokio::test]
async fn a_verified_token_is_cached_until_it_expires() {
    let s = setup().await;
    let jwt = s.token(&s.rsa, "acme/app", "refs/heads/main");
    for i in 0..10 {
        let r = s.get(&jwt, "main-only.test", &format!("/cached/{i}")).await;
        assert_eq!(r.status(), 200, "{}", proxy_status(&r));
    }
    assert_eq!(s.up.count(), 10);
    assert_eq!(
        s.count("ok").await,
        1.0,
        "one verification for ten requests"
    );
    // Another token is verified on its own.
    let other = s.token(&s.rsa, "acme/app", "refs/heads/main");
    assert_ne!(other, jwt);
    let r = s.get(&other, "main-only.test", "/cached/other").await;
    assert_eq!(r.status(), 200);
    assert_eq!(s.count("ok").await, 2.0);
    assert_eq!(s.issuer.jwks_fetches(), 1);
    s.proxy.stop().await;
}

#[tokio::test]
async fn a_key_rotated_at_the_issuer_is_picked_up_on_its_unknown_kid() {
    let s = setup().await;
    let r = s
        .get(
            &s.token(&s.rsa, "acme/app", "refs/heads/main"),
            "main-only.test",
            "/old",
        )
        .await;
    assert_eq!(r.status(), 200, "{}", proxy_status(&r));
    assert_eq!(s.issuer.jwks_fetches(), 1);
    // The issuer rotates in a new key; a token signed with it is accepted without a restart.
    let rsa2 = rsa_key("rsa-2");
    s.issuer.set_keys(&[&s.rsa, &s.ec, &rsa2]);
    let r = s
        .get(
            &s.token(&rsa2, "acme/app", "refs/heads/main"),
            "main-only.test",
            "/new",
        )
        .await;
    assert_eq!(r.status(), 200, "{}", proxy_status(&r));
    assert_eq!(
        s.issuer.jwks_fetches(),
        2,
        "one refetch for the unknown kid"
    );
    assert_eq!(s.up.last().uri, "/new");
    // A second unknown kid within the minute does not refetch: refused, though the issuer has it.
    let rsa3 = rsa_key("rsa-3");
    s.issuer.set_keys(&[&s.rsa, &s.ec, &rsa2, &rsa3]);
    let r = s
        .get(
            &s.token(&rsa3, "acme/app", "refs/heads/main"),
            "main-only.test",
            "/newer",
        )
        .await;
    assert_eq!(r.status(), 407);
    assert!(proxy_status(&r).contains("no key"), "{}", proxy_status(&r));
    assert_eq!(
        s.issuer.jwks_fetches(),
        2,
        "at most one unknown-kid refetch a minute"
    );
    // Known keys, old and new, keep working.
    for key in [&s.rsa, &s.ec, &rsa2] {
        let r = s
            .get(
                &s.token(key, "acme/lib", "refs/heads/main"),
                "lib.test",
                "/keys",
            )
            .await;
        assert_eq!(r.status(), 200, "{}: {}", key.kid, proxy_status(&r));
    }
    assert_eq!(s.issuer.jwks_fetches(), 2);
    s.proxy.stop().await;
}

#[tokio::test]
async fn a_jwks_file_is_used_and_the_issuer_never_contacted() {
    // The issuer's address swallows connections: none may arrive.
    let sink = tcp_sink().await;
    let iss = format!("https://issuer.test:{}", sink.port());
    let ec = ec_key("file-ec");
    let rsa = rsa_key("file-rsa");
    let dir = tempfile::tempdir().unwrap();
    write_jwks(&dir.path().join("jwks.json"), &[&ec, &rsa]);
    let up = http_upstream().await;
    let client = format!("[[clients]]\nname = \"org-builds\"\noidc = {{ issuer = \"{iss}\", audience = \"{AUDIENCE}\", claims = {{ repository_owner = \"acme\" }}, jwks_file = \"jwks.json\" }}\n");
    let (ca, _, _) = test_pki(&["issuer.test"]);
    let proxy = open_proxy(dir, &ca, &up, &client).await;
    let c = claims(&iss, "acme/app", "refs/heads/main");
    let url = format!("http://open.test:{}/file", up.port());
    for key in [&ec, &rsa] {
        let r = bearer_client(&proxy.url(), &key.sign(&c), None)
            .get(&url)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}: {}", key.kid, proxy_status(&r));
    }
    let r = bearer_client(&proxy.url(), &ec_key("ghost").sign(&c), None)
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 407);
    assert!(proxy_status(&r).contains("no key"), "{}", proxy_status(&r));
    let events = proxy.audit_events(3).await;
    assert_eq!(events[0]["client"], "org-builds", "{events:#?}");
    assert_eq!(sink.accepted(), 0, "the issuer was contacted");
    proxy.stop().await;
}

#[tokio::test]
async fn claims_match_by_whole_string_glob_json_text_and_array_element() {
    let (rsa, up) = (rsa_key("rsa-1"), http_upstream().await);
    let issuer = issuer("issuer.test", &[&rsa]).await;
    let iss = issuer.url.as_str();
    let clients = [
        oidc_client("glob", iss, "workflow_ref = \"acme/*@refs/heads/main\""),
        oidc_client(
            "number",
            iss,
            "repository = \"acme/num\", run_attempt = \"2\"",
        ),
        oidc_client(
            "boolean",
            iss,
            "repository = \"acme/bool\", protected = \"true\"",
        ),
        oidc_client("array", iss, "groups = \"deploy\""),
        oidc_client("array-glob", iss, "teams = \"release-*\""),
    ]
    .concat();
    let proxy = open_proxy(tempfile::tempdir().unwrap(), &issuer.ca_pem, &up, &clients).await;
    let base = issuer.claims("other/repo", "refs/heads/main");
    let cases: Vec<(Value, Option<&str>)> = vec![
        (
            json!({"workflow_ref": "acme/app/.github/workflows/ci.yml@refs/heads/main"}),
            Some("glob"),
        ),
        (
            json!({"workflow_ref": "acme/app/.github/workflows/ci.yml@refs/heads/main-old"}),
            None,
        ),
        (
            json!({"workflow_ref": "xacme/app/ci.yml@refs/heads/main"}),
            None,
        ),
        (
            json!({"repository": "acme/num", "run_attempt": 2}),
            Some("number"),
        ),
        (
            json!({"repository": "acme/num", "run_attempt": "2"}),
            Some("number"),
        ),
        (json!({"repository": "acme/num", "run_attempt": 3}), None),
        (
            json!({"repository": "acme/num-extra", "run_attempt": 2}),
            None,
        ),
        (json!({"repository": "acme/num"}), None),
        (
            json!({"repository": "acme/bool", "protected": true}),
            Some("boolean"),
        ),
        (json!({"repository": "acme/bool", "protected": false}), None),
        (json!({"groups": ["dev", "deploy"]}), Some("array")),
        (json!({"groups": ["deployers"]}), None),
        (json!({"teams": ["ops", "release-eng"]}), Some("array-glob")),
        (json!({"teams": ["ops"]}), None),
    ];
    for (i, (extra, client)) in cases.iter().enumerate() {
        let mut c = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        let url = format!("http://open.test:{}/case/{i}", up.port());
        let r = bearer_client(&proxy.url(), &rsa.sign(&c), None)
            .get(&url)
            .send()
            .await
            .unwrap();
        match client {
            Some(_) => assert_eq!(r.status(), 200, "{extra}: {}", proxy_status(&r)),
            None => {
                assert_eq!(r.status(), 407, "{extra}");
                let status = proxy_status(&r);
                assert!(
                    status.contains("no client matches the token's claims"),
                    "{extra}: {status}"
                );
            }
        }
    }
    let events = proxy.audit_events(cases.len()).await;
    for (i, (extra, client)) in cases.iter().enumerate() {
        if let Some(client) = client {
            let e = events
                .iter()
                .find(|e| e["path"] == format!("/case/{i}"))
                .unwrap();
            assert_eq!(e["client"], *client, "{extra}: {e}");
        }
    }
    proxy.stop().await;
}

#[tokio::test]
async fn eddsa_signed_tokens_verify_against_an_okp_jwk() {
    let (ed, up) = (ed_key("ed-1"), http_upstream().await);
    let issuer = issuer("issuer.test", &[&ed]).await;
    let clients = oidc_client("org-builds", &issuer.url, "repository = \"acme/*\"");
    let proxy = open_proxy(tempfile::tempdir().unwrap(), &issuer.ca_pem, &up, &clients).await;
    let jwt = ed.sign(&issuer.claims("acme/app", "refs/heads/main"));
    let url = format!("http://open.test:{}/ed", up.port());
    let r = bearer_client(&proxy.url(), &jwt, None)
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", proxy_status(&r));
    proxy.stop().await;
}

#[tokio::test]
async fn a_discovery_document_naming_another_issuer_is_not_trusted() {
    let (rsa, up) = (rsa_key("rsa-1"), http_upstream().await);
    let issuer = issuer("issuer.test", &[&rsa]).await;
    issuer.set_discovery_issuer("https://impostor.test");
    let clients = oidc_client("org-builds", &issuer.url, "repository = \"acme/*\"");
    let proxy = open_proxy(tempfile::tempdir().unwrap(), &issuer.ca_pem, &up, &clients).await;
    let jwt = rsa.sign(&issuer.claims("acme/app", "refs/heads/main"));
    let url = format!("http://open.test:{}/impostor", up.port());
    let r = bearer_client(&proxy.url(), &jwt, None)
        .get(&url)
        .send()
        .await
        .unwrap();
    assert!(!r.status().is_success(), "{}", r.status());
    assert_eq!(up.count(), 0);
    proxy.stop().await;
}
