//! Layered files (spec §2): `include` merges other files first — in order, globs sorted, paths
//! relative to the including file — concatenating `hosts` and `clients`, merging tables, and
//! refusing a key set in two files, a cycle or a missing file, each error naming the files; a
//! relative path in an included file keeps meaning what it meant there; and a change to an
//! included file (or a new file matching a glob) reloads the running proxy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn write(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn check(dir: &Path) -> (i32, String, String) {
    run_portcullis(
        &["check", "-c", dir.join("portcullis.toml").to_str().unwrap()],
        &[],
    )
}

#[test]
fn includes_merge_in_order_with_relative_paths_and_errors_name_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "base.toml",
        "[network]\nallow_private = false\n[[hosts]]\nhost = \"base.test\"\n",
    );
    // A team file in a subfolder: its secret file is relative to it.
    write(d, "teams/secrets/token", "team-token-canary\n");
    write(
        d,
        "teams/b.toml",
        "[credentials.team]\nbearer = { file = \"secrets/token\" }\n[[hosts]]\nhost = \"b.test\"\ncredential = \"team\"\n",
    );
    write(d, "teams/a.toml", "[[hosts]]\nhost = \"a.test\"\n");
    write(d, "teams/notes.txt", "not a config");
    write(
        d,
        "portcullis.toml",
        "include = [\"base.toml\", \"teams/*.toml\", \"empty/*.toml\"]\n[[hosts]]\nhost = \"own.test\"\n",
    );
    std::fs::create_dir_all(d.join("empty")).unwrap();
    let (code, stdout, stderr) = check(d);
    assert_eq!(code, 0, "{stderr}");
    let order: Vec<usize> = ["base.test", "a.test", "b.test", "own.test"]
        .iter()
        .map(|h| {
            stdout
                .find(&format!("  {h} ports"))
                .unwrap_or_else(|| panic!("{h}: {stdout}"))
        })
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "included first, in order: {stdout}"
    );
    assert!(stdout.contains("credential=team"), "{stdout}");
    assert!(!stdout.contains("team-token-canary"));

    // A key set in two files: an error naming both.
    write(
        d,
        "portcullis.toml",
        "include = [\"base.toml\"]\n[network]\nallow_private = true\n",
    );
    let (code, _, stderr) = check(d);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("network.allow_private")
            && stderr.contains("base.toml")
            && stderr.contains("portcullis.toml"),
        "{stderr}"
    );
    // Tables merge: different keys of one table in two files are fine.
    write(
        d,
        "portcullis.toml",
        "include = [\"base.toml\"]\n[network]\nallow_cidrs = [\"10.0.0.0/8\"]\n",
    );
    assert_eq!(check(d).0, 0);

    // A named file that is missing.
    write(d, "portcullis.toml", "include = [\"missing.toml\"]\n");
    let (code, _, stderr) = check(d);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("missing.toml") && stderr.contains("does not exist"),
        "{stderr}"
    );

    // A cycle.
    write(d, "x.toml", "include = [\"y.toml\"]\n");
    write(d, "y.toml", "include = [\"x.toml\"]\n");
    write(d, "portcullis.toml", "include = [\"x.toml\"]\n");
    let (code, _, stderr) = check(d);
    assert_eq!(code, 1);
    assert!(stderr.contains("include cycle"), "{stderr}");

    // An invalid rule in an included file: the error names that file.
    write(
        d,
        "bad.toml",
        "[[hosts]]\nhost = \"ok.test\"\n[[hosts]]\nhost = \"bad host\"\n",
    );
    write(d, "portcullis.toml", "include = [\"bad.toml\"]\n");
    let (code, _, stderr) = check(d);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("hosts[1]"),
        "{stderr}"
    );
    // A syntax error in an included file names it too.
    write(d, "broken.toml", "[[hosts]\nhost = 1\n");
    write(d, "portcullis.toml", "include = [\"broken.toml\"]\n");
    let (code, _, stderr) = check(d);
    assert_eq!(code, 1);
    assert!(stderr.contains("broken.toml"), "{stderr}");

    // A wrong type, and a value validation refuses, in an included file's section: each error
    // names that file, not the one including it.
    write(d, "limits.toml", "[limits]\nmax_connections = \"many\"\n");
    write(
        d,
        "portcullis.toml",
        "include = [\"limits.toml\"]\n[listen]\nproxy = \"127.0.0.1:3999\"\n",
    );
    let (code, _, stderr) = check(d);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("limits.toml: limits.max_connections: expected"),
        "{stderr}"
    );
    write(d, "limits.toml", "[limits]\nmax_connections = 0\n");
    let (code, _, stderr) = check(d);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("limits.toml: limits.max_connections: must be at least 1"),
        "{stderr}"
    );
    // The including file's own key stays its own.
    write(d, "limits.toml", "[limits]\nmax_connections = 10\n");
    write(
        d,
        "portcullis.toml",
        "include = [\"limits.toml\"]\n[listen]\nproxy = \"nowhere\"\n",
    );
    let (code, _, stderr) = check(d);
    assert_eq!(code, 1);
    assert!(stderr.contains("portcullis.toml: listen.proxy"), "{stderr}");
}

#[tokio::test]
async fn a_change_to_an_included_file_reloads_the_proxy() {
    let up = http_upstream().await;
    let port = up.port();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "base.toml",
        &format!(
            "[network]\nallow_cidrs = [\"127.0.0.0/8\"]\nresolve = {{ \"one.test\" = [\"127.0.0.1\"], \"two.test\" = [\"127.0.0.1\"], \"three.test\" = [\"127.0.0.1\"] }}\n[[hosts]]\nhost = \"one.test\"\nports = [{port}]\n"
        ),
    );
    write(
        d,
        "portcullis.toml",
        "include = [\"base.toml\", \"teams/*.toml\"]\n[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n",
    );
    std::fs::create_dir_all(d.join("teams")).unwrap();
    let running = spawn_binary(
        &["run", "-c", d.join("portcullis.toml").to_str().unwrap()],
        &[],
        std::process::Stdio::null(),
    );
    let client = proxied_client(&running.proxy);
    let status = |host: &'static str| {
        let client = client.clone();
        async move {
            client
                .get(format!("http://{host}:{port}/"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status("one.test").await, 200);
    assert_eq!(status("two.test").await, 403);
    // The included file changes: two.test allowed without a restart.
    std::fs::write(
        d.join("base.toml"),
        std::fs::read_to_string(d.join("base.toml")).unwrap()
            + &format!("[[hosts]]\nhost = \"two.test\"\nports = [{port}]\n"),
    )
    .unwrap();
    eventually(
        "the included file's change is loaded",
        Duration::from_secs(10),
        || async { status("two.test").await == 200 },
    )
    .await;
    // A new file matching the glob: loaded too.
    assert_eq!(status("three.test").await, 403);
    write(
        d,
        "teams/three.toml",
        &format!("[[hosts]]\nhost = \"three.test\"\nports = [{port}]\n"),
    );
    eventually(
        "the new team file is loaded",
        Duration::from_secs(10),
        || async { status("three.test").await == 200 },
    )
    .await;
    running.stop();
}
