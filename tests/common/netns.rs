//! Tests that need a network namespace of their own (to bind privileged ports, add addresses or
//! load nftables rules): the test re-runs itself inside `unshare -n`, as root, and is skipped with
//! the reason printed where that is not possible.

use std::time::Duration;

/// What the namespaced run prints when its checks passed.
pub const DONE: &str = "namespaced checks passed";

/// Why commands the namespaced run needs cannot run here, if they cannot. Each probe is a
/// command line that must succeed.
pub fn unavailable(probes: &[&[&str]]) -> Option<String> {
    for probe in probes {
        let (program, args) = probe.split_first().expect("a command");
        match std::process::Command::new(program).args(args).output() {
            Err(e) => return Some(format!("cannot run {program} ({e})")),
            Ok(out) if !out.status.success() => {
                return Some(format!(
                    "{} failed: {}",
                    probe.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
            Ok(_) => {}
        }
    }
    None
}

/// Runs test `name` of this test binary again inside `unshare -n`, with `env` set (the test
/// checks it to know it is the inner run, and prints [`DONE`] at the end). Skips, printing why,
/// when one of `probes` fails (`unshare -n true` is always probed first). `name` is the test's
/// path as `module_path!()` gives it; the harness names tests without the crate's own segment.
pub async fn rerun_in_network_namespace(name: &str, env: &str, probes: &[&[&str]]) {
    let name = name.split_once("::").map_or(name, |(_crate, path)| path);
    let mut all: Vec<&[&str]> = vec![&["unshare", "-n", "--", "true"]];
    all.extend_from_slice(probes);
    if let Some(why) = unavailable(&all) {
        eprintln!("skipped: {why} (needs root and the tools tests/setup.sh installs)");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let child = tokio::process::Command::new("unshare")
        .args(["-n", "--"])
        .arg(&exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(env, "1")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), child)
        .await
        .expect("the namespaced run ends in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains(DONE) && stdout.contains("1 passed"),
        "namespaced run failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
}
