//! Request paths, for rules with `paths`: globs compiled once per configuration, and the
//! normalisation a path goes through before it is matched.

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

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
/// dropped and `..` resolved. The query is not part of the path.
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
}
