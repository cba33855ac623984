//! Request paths, for rules with `paths`: globs compiled once per configuration, and the form a
//! path is judged in ([`judged_path`]).
//!
//! What is judged is what is sent (spec §3): a path whose meaning depends on the upstream's
//! parser — `..;` (Tomcat and Spring drop `;` parameters before resolving dot segments), `\`
//! or `%5c` (IIS and others take it for `/`), an encoded `/`, a NUL — is refused, and any other
//! path is judged normalised (`/a/./b`, `/a/x/../b`, `/a//b`, `%2e` dots) and sent in exactly that
//! form.

use std::borrow::Cow;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// A path that would be judged in one form and read by the upstream in another.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the request path is ambiguous ({0}): refused, since the upstream could read it otherwise than policy does")]
pub struct AmbiguousPath(pub &'static str);

/// The form of `raw` that policy judges and the proxy sends: borrowed when `raw` is already
/// normal, or refused when its meaning depends on the upstream's parser.
pub fn judged_path(raw: &str) -> Result<Cow<'_, str>, AmbiguousPath> {
    let lower = |needle: &str| {
        raw.as_bytes()
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
    };
    if raw.contains('\\') || lower("%5c") {
        return Err(AmbiguousPath("a backslash"));
    }
    if lower("%2f") {
        return Err(AmbiguousPath("an encoded '/'"));
    }
    if lower("%00") {
        return Err(AmbiguousPath("an encoded NUL"));
    }
    let dot_with_parameters = raw.split('/').any(|segment| {
        segment.split_once(';').is_some_and(|(name, _)| {
            let name = name.replace("%2e", ".").replace("%2E", ".");
            name == "." || name == ".."
        })
    });
    if dot_with_parameters {
        return Err(AmbiguousPath("a dot segment with ';' parameters"));
    }
    let normal = normalize_path(raw);
    Ok(if normal == raw {
        Cow::Borrowed(raw)
    } else {
        Cow::Owned(normal)
    })
}

/// Compiles a rule's `paths` globs: `*` stays within a segment, `**` crosses segments.
pub fn compile_paths(globs: &[String]) -> Result<GlobSet, globset::Error> {
    let mut set = GlobSetBuilder::new();
    for glob in globs {
        set.add(GlobBuilder::new(glob).literal_separator(true).build()?);
    }
    set.build()
}

/// Normalises a request path for `paths` matching, so `/a/./b`, `/a/x/../b` and `/a//b` cannot
/// slip past a glob: percent-encoded dots and slashes are decoded, empty and `.` segments
/// dropped and `..` resolved. The query is not part of the path. ([`judged_path`] refuses
/// encoded slashes before this runs, so a judged path never has one decoded.)
pub fn normalize_path(path: &str) -> String {
    let decoded = path
        .replace("%2e", ".")
        .replace("%2E", ".")
        .replace("%2f", "/")
        .replace("%2F", "/");
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len() + 1);
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (decoded.ends_with('/') && !segments.is_empty()) {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_before_matching() {
        assert_eq!(normalize_path("/a/./b"), "/a/b");
        assert_eq!(normalize_path("/a/x/../b"), "/a/b");
        assert_eq!(normalize_path("//a//b/"), "/a/b/");
        assert_eq!(normalize_path("/a/%2e%2E/b"), "/b");
        assert_eq!(normalize_path("/a%2Fb"), "/a/b");
        assert_eq!(normalize_path("/../../etc"), "/etc");
        assert_eq!(normalize_path(""), "/");
        assert_eq!(normalize_path("/"), "/");
    }

    #[test]
    fn ambiguous_paths_are_refused_and_others_judged_normalised() {
        for bad in [
            "/ok/..;/secret",
            "/ok/.;x=1/secret",
            "/ok/%2e%2e;/secret",
            "/ok\\..\\secret",
            "/ok/%5c../secret",
            "/ok/%5C",
            "/ok%2f..%2fsecret",
            "/ok/%2F",
            "/a%00b",
        ] {
            assert!(judged_path(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            judged_path("/ok/a/b"),
            Ok(Cow::Borrowed("/ok/a/b"))
        ));
        assert!(matches!(judged_path("/"), Ok(Cow::Borrowed("/"))));
        assert_eq!(judged_path("/ok/../secret").unwrap(), "/secret");
        assert_eq!(judged_path("/ok/%2e%2e/secret").unwrap(), "/secret");
        assert_eq!(judged_path("//ok/./a").unwrap(), "/ok/a");
        assert_eq!(
            judged_path("/a;v=1/b").unwrap(),
            "/a;v=1/b",
            "parameters elsewhere stay"
        );
    }
}
