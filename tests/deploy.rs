#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The deployment files under `deploy/` stay consistent with the product: every YAML file parses,
//! the Kubernetes objects have what a sidecar and a gateway need, the configs they embed (and
//! `config/example.toml`, and the config the Dockerfile builds) pass `portcullis check`, and the
//! alert rules and the Grafana dashboard use only metrics the proxy exports. Nothing here needs a
//! network, a cluster or Docker.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use portcullis::config::{self, Origin, RawConfig};
use yaml_rust2::{Yaml, YamlLoader};

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// Families of the `process` collector that dashboards and alerts may use.
const PROCESS_METRICS: [&str; 6] = [
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
    "process_virtual_memory_bytes",
];

/// The histogram, which is also exported as `_bucket`, `_sum` and `_count`.
const HISTOGRAM: &str = "portcullis_request_duration_seconds";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy(rel: &str) -> PathBuf {
    repo().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a YAML file; empty documents (a leading `---`) are dropped.
fn load_yaml(path: &Path) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path))
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()))
        .into_iter()
        .filter(|doc| !doc.is_null())
        .collect()
}

/// Files under `dir` (recursively) whose name ends with one of `extensions`.
fn files_with(dir: &Path, extensions: &[&str], out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_with(&path, extensions, out);
        } else if extensions
            .iter()
            .any(|ext| path.extension().is_some_and(|e| e == *ext))
        {
            out.push(path);
        }
    }
}

fn str_of<'a>(yaml: &'a Yaml, what: &str) -> &'a str {
    yaml.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {yaml:?}"))
}

fn vec_of<'a>(yaml: &'a Yaml, what: &str) -> &'a [Yaml] {
    yaml.as_vec()
        .unwrap_or_else(|| panic!("{what} is not a list: {yaml:?}"))
}

/// The documents of `kind` in a multi-document manifest.
fn of_kind<'a>(docs: &'a [Yaml], kind: &str) -> Vec<&'a Yaml> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

/// The single document of `kind`.
fn one_of_kind<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    let found = of_kind(docs, kind);
    assert_eq!(found.len(), 1, "expected exactly one {kind}");
    found[0]
}

/// The `config.toml` of the manifest's only ConfigMap.
fn embedded_config(docs: &[Yaml]) -> String {
    let cm = one_of_kind(docs, "ConfigMap");
    str_of(&cm["data"]["config.toml"], "ConfigMap data config.toml").to_owned()
}

/// The value of `key = ...` in a TOML text, by a line scan (enough for the flat keys we need).
fn toml_value<'a>(toml: &'a str, key: &str) -> Option<&'a str> {
    toml.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k.trim() == key).then(|| v.split('#').next().unwrap_or("").trim())
    })
}

/// The built-in defaults, read through the library: the one place they are written down.
fn builtin() -> RawConfig {
    RawConfig::default()
}

/// `limits.shutdown_grace_seconds` of a config text, else the built-in default.
fn shutdown_grace_seconds(toml: &str) -> i64 {
    toml_value(toml, "shutdown_grace_seconds").map_or_else(
        || i64::try_from(builtin().limits.shutdown_grace_seconds).unwrap(),
        |v| v.parse().unwrap(),
    )
}

/// The port of `listen.admin` in a config text, else of the built-in default.
fn admin_port(toml: &str) -> i64 {
    toml_value(toml, "admin").map_or_else(
        || i64::from(builtin().listen.admin.port()),
        |v| {
            let addr = v.trim_matches('"');
            addr.rsplit(':').next().unwrap().parse().unwrap()
        },
    )
}

/// The quoted values of `name = "..."` anywhere in `text` (e.g. the `file` and `env` fields of
/// secret sources), in order of appearance.
fn quoted_values(text: &str, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(name) {
        let before = rest[..at].chars().next_back();
        let after = rest[at + name.len()..].trim_start();
        rest = &rest[at + name.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(value) = after.strip_prefix('=') else {
            continue;
        };
        let Some(value) = value.trim_start().strip_prefix('"') else {
            continue;
        };
        if let Some(end) = value.find('"') {
            out.push(value[..end].to_owned());
        }
    }
    out
}

/// Runs `portcullis check` on `toml` in a hermetic environment: every absolute `{ file = ... }`
/// secret is rewritten to a temp file holding a dummy value, every `{ env = ... }` variable is
/// set to a dummy value, `extra_env` (e.g. a container's `PORTCULLIS_*` overrides) is applied, and
/// the caller's own `PORTCULLIS_*` variables are removed. Returns stdout; panics unless exit 0.
fn check_config(what: &str, toml: &str, extra_env: &[(String, String)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut toml = toml.to_owned();
    let files: BTreeSet<String> = quoted_values(&toml, "file")
        .into_iter()
        .filter(|p| p.starts_with('/'))
        .collect();
    for (i, path) in files.iter().enumerate() {
        let dummy = dir.path().join(format!("secret-{i}"));
        std::fs::write(&dummy, "dummy-secret-value\n").unwrap();
        toml = toml.replace(&format!("\"{path}\""), &format!("\"{}\"", dummy.display()));
    }
    let config = dir.path().join("config.toml");
    std::fs::write(&config, &toml).unwrap();

    let mut cmd = Command::new(BIN);
    cmd.args(["check", "-c", config.to_str().unwrap()]);
    for (name, _) in std::env::vars() {
        if name.starts_with("PORTCULLIS_") {
            cmd.env_remove(name);
        }
    }
    for var in quoted_values(&toml, "env") {
        cmd.env(var, "dummy-env-value");
    }
    for (name, value) in extra_env {
        cmd.env(name, value);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "`portcullis check` rejects {what}:\n{stderr}\n--- config ---\n{toml}"
    );
    assert!(stdout.contains("(valid)"), "{what}: {stdout}");
    stdout
}

/// The `PORTCULLIS_*` environment a container sets on top of its config file.
fn portcullis_env(container: &Yaml) -> Vec<(String, String)> {
    container["env"]
        .as_vec()
        .map(|env| {
            env.iter()
                .filter_map(|e| {
                    let name = e["name"].as_str()?;
                    let value = e["value"].as_str()?;
                    name.starts_with("PORTCULLIS_")
                        .then(|| (name.to_owned(), value.to_owned()))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn env_names(container: &Yaml) -> BTreeSet<String> {
    vec_of(&container["env"], "container env")
        .iter()
        .map(|e| str_of(&e["name"], "env name").to_owned())
        .collect()
}

/// The container port number an `httpGet.port` (a number or a port name) refers to.
fn probe_port(container: &Yaml, probe: &str) -> i64 {
    let port = &container[probe]["httpGet"]["port"];
    if let Some(n) = port.as_i64() {
        return n;
    }
    let name = str_of(port, "probe port");
    vec_of(&container["ports"], "container ports")
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_i64())
        .unwrap_or_else(|| panic!("{probe} names unknown port {name}"))
}

fn probe_path<'a>(container: &'a Yaml, probe: &str) -> &'a str {
    str_of(&container[probe]["httpGet"]["path"], probe)
}

/// The container running the proxy: its image or its name says `portcullis`.
fn is_portcullis(container: &Yaml) -> bool {
    container["image"]
        .as_str()
        .is_some_and(|i| i.contains("portcullis"))
        || container["name"].as_str() == Some("portcullis")
}

/// Identifier-like tokens of a PromQL expression (`[a-zA-Z_:][a-zA-Z0-9_:]*`). Quoted label
/// values are tokenized too, which is harmless: none of them looks like a metric name.
fn tokens(expr: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in expr.char_indices() {
        let continues = c.is_ascii_alphanumeric() || c == '_' || c == ':';
        match start {
            Some(_) if continues => {}
            Some(s) => {
                out.push(&expr[s..i]);
                start = None;
            }
            None => {}
        }
        if start.is_none() && (c.is_ascii_alphabetic() || c == '_' || c == ':') {
            // Not right after a digit: the `e` of `1e3` or the `m` of `[5m]` starts no token.
            let after_digit = expr[..i]
                .chars()
                .next_back()
                .is_some_and(|p| p.is_ascii_digit());
            if !after_digit {
                start = Some(i);
            }
        }
    }
    if let Some(s) = start {
        out.push(&expr[s..]);
    }
    out
}

/// Metric names referenced by an expression (tokens starting with `portcullis_` or `process_`),
/// histogram suffixes folded into the family name.
fn metric_names(expr: &str) -> Vec<String> {
    tokens(expr)
        .into_iter()
        .filter(|t| t.starts_with("portcullis_") || t.starts_with("process_"))
        .map(|t| {
            for suffix in ["_bucket", "_sum", "_count"] {
                if t.strip_suffix(suffix) == Some(HISTOGRAM) {
                    return HISTOGRAM.to_owned();
                }
            }
            t.to_owned()
        })
        .collect()
}

fn assert_exported(expr: &str, where_: &str) -> usize {
    let names = metric_names(expr);
    for name in &names {
        assert!(
            portcullis::telemetry::EXPORTED.contains(&name.as_str())
                || PROCESS_METRICS.contains(&name.as_str()),
            "{where_}: metric {name} is not exported (expr: {expr})"
        );
    }
    names.len()
}

/// Every string field named `key` anywhere in a JSON value.
fn json_strings<'a>(value: &'a serde_json::Value, key: &str, out: &mut Vec<&'a str>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                if k == key {
                    if let Some(s) = v.as_str() {
                        out.push(s);
                    }
                }
                json_strings(v, key, out);
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                json_strings(v, key, out);
            }
        }
        _ => {}
    }
}

const REQUESTS: &str = "portcullis_requests_total";
const TUNNELS: &str = "portcullis_tunnels_total";

/// Why an expression that counts requests must count tunnels too, and how: a deployment may have
/// only tunnels (no request series at all). Both families must be in the expression, joined by
/// `or` inside the aggregation: `sum(a) + sum(b)` is empty, so no data and no alert, when `a`
/// has no series.
fn assert_counts_tunnels_with_requests(expr: &str, where_: &str) {
    let names = metric_names(expr);
    if !names.iter().any(|n| n == REQUESTS) {
        return;
    }
    assert!(
        names.iter().any(|n| n == TUNNELS),
        "{where_}: counts {REQUESTS} but not {TUNNELS}: {expr}"
    );
    assert_joined_by_or(expr, where_);
}

/// Between the two families there is an `or` and no `+` (see
/// [`assert_counts_tunnels_with_requests`]).
fn assert_joined_by_or(expr: &str, where_: &str) {
    let (Some(r), Some(t)) = (expr.find(REQUESTS), expr.find(TUNNELS)) else {
        return;
    };
    let between = &expr[r.min(t)..r.max(t)];
    assert!(
        between.contains(" or ") && !between.contains('+'),
        "{where_}: requests and tunnels must be joined by `or` inside one sum, not added: {expr}"
    );
}

// -------------------------------------------------------------------------------------------------

#[test]
fn every_yaml_file_parses_and_kubernetes_objects_are_named() {
    let mut files = Vec::new();
    files_with(&repo().join("deploy"), &["yaml", "yml"], &mut files);
    files.sort();
    assert!(files.len() >= 5, "deploy/ YAML files: {files:?}");
    let mut objects = 0;
    for file in &files {
        let docs = load_yaml(file);
        assert!(!docs.is_empty(), "{} has no document", file.display());
        for doc in &docs {
            if doc["apiVersion"].is_badvalue() {
                continue;
            }
            objects += 1;
            let kind = doc["kind"].as_str();
            assert!(kind.is_some(), "{}: object without kind", file.display());
            assert!(
                doc["metadata"]["name"].as_str().is_some(),
                "{}: {kind:?} without metadata.name",
                file.display()
            );
        }
    }
    assert!(objects >= 10, "only {objects} Kubernetes objects found");
}

#[test]
fn sidecar_pod_runs_portcullis_as_a_native_sidecar() {
    let docs = load_yaml(&deploy("kubernetes/sidecar.yaml"));
    let pod = one_of_kind(&docs, "Pod");
    let spec = &pod["spec"];
    let config = embedded_config(&docs);

    let init = vec_of(&spec["initContainers"], "initContainers");
    let sidecar = init
        .iter()
        .find(|c| is_portcullis(c))
        .expect("an init container runs portcullis");
    assert_eq!(
        sidecar["restartPolicy"].as_str(),
        Some("Always"),
        "native sidecar"
    );
    let admin = admin_port(&config);
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        assert_eq!(probe_path(sidecar, probe), path, "{probe}");
        assert_eq!(
            probe_port(sidecar, probe),
            admin,
            "{probe} on the admin port"
        );
    }
    let security = &sidecar["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false));

    let containers = vec_of(&spec["containers"], "containers");
    let builds: Vec<&Yaml> = containers.iter().filter(|c| !is_portcullis(c)).collect();
    assert!(!builds.is_empty(), "a build container");
    for build in builds {
        let names = env_names(build);
        let mut wanted = vec!["HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"];
        wanted.extend(portcullis::cli::env::CA_VARIABLES);
        for var in wanted {
            assert!(names.contains(var), "build container lacks {var}");
        }
    }
}

/// The sidecar enforces (spec §11): an init container loads deploy/redirect.sh with NET_ADMIN,
/// for the sidecar's UID and the config's transparent port; nothing else in the pod has
/// NET_ADMIN, so the build cannot undo it. (tests/transparent.rs runs the script itself.)
#[test]
fn sidecar_redirects_the_pod_to_the_transparent_listener() {
    let docs = load_yaml(&deploy("kubernetes/sidecar.yaml"));
    let spec = &one_of_kind(&docs, "Pod")["spec"];
    let config = embedded_config(&docs);
    let transparent = toml_value(&config, "transparent").expect("listen.transparent is set");
    let port = transparent
        .trim_matches('"')
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let init = vec_of(&spec["initContainers"], "initContainers");
    let sidecar_at = init
        .iter()
        .position(|c| c["name"].as_str() == Some("portcullis"))
        .expect("the sidecar");
    let redirect_at = init
        .iter()
        .position(|c| c["name"].as_str() == Some("portcullis-redirect"))
        .expect("the redirect init container");
    assert!(redirect_at > sidecar_at, "redirect after the proxy is up");
    let redirect = &init[redirect_at];
    let value = |name: &str| {
        vec_of(&redirect["env"], "env")
            .iter()
            .find(|e| e["name"].as_str() == Some(name))
            .and_then(|e| e["value"].as_str())
            .map(str::to_owned)
    };
    let sidecar_uid = init[sidecar_at]["securityContext"]["runAsUser"]
        .as_i64()
        .or_else(|| spec["securityContext"]["runAsUser"].as_i64())
        .expect("a fixed proxy UID");
    assert_eq!(value("PORTCULLIS_UID"), Some(sidecar_uid.to_string()));
    assert_eq!(value("PORTCULLIS_TRANSPARENT_PORT"), Some(port));
    let command: Vec<&str> = vec_of(&redirect["command"], "command")
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert!(
        command.iter().any(|c| c.ends_with("redirect.sh")),
        "{command:?}"
    );
    let added = |c: &Yaml| -> Vec<String> {
        c["securityContext"]["capabilities"]["add"]
            .as_vec()
            .map(|v| {
                v.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(added(redirect), ["NET_ADMIN"]);
    for c in init
        .iter()
        .chain(vec_of(&spec["containers"], "containers").iter())
    {
        if c["name"].as_str() != Some("portcullis-redirect") {
            assert!(added(c).is_empty(), "{:?} adds capabilities", c["name"]);
        }
    }
    // The image target the init container uses ships the script.
    let dockerfile = std::fs::read_to_string(deploy("Dockerfile")).unwrap();
    assert!(dockerfile.contains("AS redirect"));
    assert!(dockerfile.contains("COPY deploy/redirect.sh /usr/local/share/portcullis/redirect.sh"));
    assert!(command.contains(&"/usr/local/share/portcullis/redirect.sh"));
}

#[test]
fn sidecar_ca_key_stays_in_the_sidecar() {
    let docs = load_yaml(&deploy("kubernetes/sidecar.yaml"));
    let spec = &one_of_kind(&docs, "Pod")["spec"];
    let config = embedded_config(&docs);
    let key_file = toml_value(&config, "ca_key")
        .expect("tls.ca_key in the sidecar config")
        .trim_matches('"')
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let volumes = vec_of(&spec["volumes"], "volumes");
    for build in vec_of(&spec["containers"], "containers")
        .iter()
        .filter(|c| !is_portcullis(c))
    {
        for mount in build["volumeMounts"].as_vec().into_iter().flatten() {
            let name = mount["name"].as_str();
            let volume = volumes
                .iter()
                .find(|v| v["name"].as_str() == name)
                .expect("mounted volume exists");
            if volume["secret"].is_badvalue() {
                continue;
            }
            let items = vec_of(
                &volume["secret"]["items"],
                "items of a Secret mounted into the build container",
            );
            for item in items {
                assert_ne!(
                    item["key"].as_str(),
                    Some(key_file.as_str()),
                    "the CA key is mounted into the build container"
                );
            }
        }
    }
}

#[test]
fn gateway_has_every_object_and_drains_within_its_grace_period() {
    let docs = load_yaml(&deploy("kubernetes/gateway.yaml"));
    for kind in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "ConfigMap",
    ] {
        assert!(
            !of_kind(&docs, kind).is_empty(),
            "gateway.yaml lacks a {kind}"
        );
    }
    let config = embedded_config(&docs);
    let deployment = one_of_kind(&docs, "Deployment");
    let replicas = deployment["spec"]["replicas"].as_i64().unwrap();
    assert!(replicas >= 2, "replicas {replicas}");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = vec_of(&pod["containers"], "containers")
        .iter()
        .find(|c| is_portcullis(c))
        .expect("a portcullis container");

    let admin = admin_port(&config);
    assert_eq!(probe_path(container, "readinessProbe"), "/readyz");
    assert_eq!(probe_path(container, "livenessProbe"), "/healthz");
    assert_eq!(probe_port(container, "readinessProbe"), admin);
    assert_eq!(probe_port(container, "livenessProbe"), admin);

    // SIGKILL must come after the preStop sleep plus the proxy's own drain deadline.
    let grace = shutdown_grace_seconds(&config);
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_i64()
        .unwrap_or(0);
    let termination = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    assert!(
        termination > grace + pre_stop,
        "terminationGracePeriodSeconds {termination} <= shutdown_grace_seconds {grace} + preStop {pre_stop}"
    );

    // One CA for every replica: it must come from a mounted file, never be generated per pod.
    let ca_cert = toml_value(&config, "ca_cert").expect("tls.ca_cert set");
    assert!(
        ca_cert.trim_matches('"').starts_with('/'),
        "CA from a mounted Secret"
    );
    assert!(vec_of(&pod["volumes"], "volumes")
        .iter()
        .any(|v| v["secret"]["secretName"].as_str() == Some("portcullis-ca")));

    let hpa = one_of_kind(&docs, "HorizontalPodAutoscaler");
    assert_eq!(hpa["apiVersion"].as_str(), Some("autoscaling/v2"));
    assert!(hpa["spec"]["minReplicas"].as_i64().unwrap() >= 2);

    // The build pods' policy lets them out only to the gateway's proxy port and DNS.
    let policies = of_kind(&docs, "NetworkPolicy");
    let build = policies
        .iter()
        .find(|p| !p["spec"]["podSelector"]["matchLabels"]["portcullis.dev/egress"].is_badvalue())
        .expect("a NetworkPolicy for the build pods");
    let mut ports: Vec<i64> = vec_of(&build["spec"]["egress"], "egress")
        .iter()
        .flat_map(|rule| vec_of(&rule["ports"], "egress ports"))
        .map(|p| p["port"].as_i64().unwrap())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports, [53, 3128]);
}

#[test]
fn embedded_kubernetes_configs_pass_check() {
    for file in ["kubernetes/sidecar.yaml", "kubernetes/gateway.yaml"] {
        let docs = load_yaml(&deploy(file));
        let config = embedded_config(&docs);
        // Apply the PORTCULLIS_* overrides the proxy container sets, as Kubernetes would.
        let env = of_kind(&docs, "Pod")
            .into_iter()
            .map(|pod| &pod["spec"])
            .chain(
                of_kind(&docs, "Deployment")
                    .into_iter()
                    .map(|d| &d["spec"]["template"]["spec"]),
            )
            .flat_map(|spec| {
                let init = spec["initContainers"].as_vec().into_iter().flatten();
                let main = spec["containers"].as_vec().into_iter().flatten();
                init.chain(main)
                    .filter(|c| is_portcullis(c))
                    .flat_map(portcullis_env)
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>();
        let summary = check_config(file, &config, &env);
        assert!(summary.contains("host rules"), "{file}: {summary}");
    }
}

#[test]
fn example_config_passes_check() {
    let path = repo().join("config/example.toml");
    let text = read(&path);
    assert!(
        quoted_values(&text, "env").contains(&"GITHUB_TOKEN".to_owned()),
        "example.toml reads GITHUB_TOKEN"
    );
    check_config("config/example.toml", &text, &[]);
}

#[test]
fn alert_rules_are_complete_and_use_exported_metrics() {
    let docs = load_yaml(&deploy("prometheus/alerts.yml"));
    assert_eq!(docs.len(), 1);
    let groups = vec_of(&docs[0]["groups"], "groups");
    assert!(!groups.is_empty());
    let mut alerts = BTreeSet::new();
    let mut metrics = 0;
    for group in groups {
        assert!(group["name"].as_str().is_some(), "group without a name");
        for rule in vec_of(&group["rules"], "rules") {
            let name = str_of(&rule["alert"], "alert").to_owned();
            let expr = str_of(&rule["expr"], "expr");
            assert!(!rule["for"].is_badvalue(), "{name}: no `for`");
            assert!(
                rule["labels"]["severity"].as_str().is_some(),
                "{name}: no severity"
            );
            for annotation in ["summary", "description"] {
                assert!(
                    rule["annotations"][annotation].as_str().is_some(),
                    "{name}: no {annotation}"
                );
            }
            metrics += assert_exported(expr, &format!("alert {name}"));
            assert_counts_tunnels_with_requests(expr, &format!("alert {name}"));
            alerts.insert(name);
        }
    }
    assert!(alerts.len() >= 7, "{alerts:?}");
    assert!(metrics >= 7, "the alerts reference portcullis metrics");
}

#[test]
fn dashboard_is_valid_and_uses_exported_metrics() {
    let path = deploy("grafana/portcullis.json");
    let dashboard: serde_json::Value = serde_json::from_str(&read(&path)).unwrap();
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    let mut ids = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().expect("panel title");
        assert!(
            matches!(panel["type"].as_str(), Some("timeseries" | "stat")),
            "{title}: panel type"
        );
        assert!(
            ids.insert(panel["id"].as_i64().unwrap()),
            "{title}: duplicate id"
        );
        assert!(panel["gridPos"].is_object(), "{title}: gridPos");
        assert_eq!(
            panel["datasource"]["uid"].as_str(),
            Some("${DS_PROMETHEUS}"),
            "{title}: datasource"
        );
    }
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(variables
        .iter()
        .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource"));

    let mut exprs = Vec::new();
    json_strings(&dashboard, "expr", &mut exprs);
    assert!(exprs.len() >= panels.len(), "every panel has a query");
    let mut used = BTreeSet::new();
    for expr in exprs {
        assert_exported(expr, "dashboard");
        used.extend(metric_names(expr));
    }
    // A panel that shows requests shows tunnels too (in the same query or another of the panel),
    // so it is not blank in a tunnel-only deployment; one query holding both joins them by `or`.
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default();
        let mut queries = Vec::new();
        json_strings(panel, "expr", &mut queries);
        let names: Vec<String> = queries.iter().flat_map(|q| metric_names(q)).collect();
        if names.iter().any(|n| n == REQUESTS) {
            assert!(
                names.iter().any(|n| n == TUNNELS),
                "panel {title}: shows {REQUESTS} but not {TUNNELS}"
            );
        }
        for query in queries {
            assert_joined_by_or(query, &format!("panel {title}"));
        }
    }
    // Variable queries (label_values(...)) too.
    let mut definitions = Vec::new();
    json_strings(&dashboard, "definition", &mut definitions);
    for definition in definitions {
        assert_exported(definition, "dashboard variable");
    }
    // The dashboard covers every family the proxy exports.
    for name in portcullis::telemetry::EXPORTED {
        assert!(used.contains(name), "the dashboard does not show {name}");
    }
}

#[test]
fn tunnels_are_counted_with_requests_and_joined_by_or() {
    let ok =
        "sum by (job) (rate(portcullis_requests_total[5m]) or rate(portcullis_tunnels_total[5m]))";
    assert_counts_tunnels_with_requests(ok, "ok");
    assert_counts_tunnels_with_requests("sum(rate(portcullis_tunnels_total[5m]))", "tunnels only");
    for bad in [
        "sum(rate(portcullis_requests_total[5m]))",
        "sum(rate(portcullis_requests_total[5m])) + sum(rate(portcullis_tunnels_total[5m]))",
    ] {
        let caught = std::panic::catch_unwind(|| assert_counts_tunnels_with_requests(bad, "bad"));
        assert!(caught.is_err(), "not caught: {bad}");
    }
}

/// The unit tests of the alert rules (`promtool test rules`, run by `.ci/run`) load the rules
/// shipped here, test the alerts issue 11 was about, and feed them series as a tunnel-only proxy
/// exports them: exported families, no request series, label values the proxy can produce.
#[test]
fn alert_unit_tests_cover_the_tunnel_only_alerts_with_exported_series() {
    let docs = load_yaml(&deploy("prometheus/alerts_test.yml"));
    assert_eq!(docs.len(), 1);
    let files: Vec<&str> = vec_of(&docs[0]["rule_files"], "rule_files")
        .iter()
        .map(|f| str_of(f, "rule file"))
        .collect();
    assert_eq!(files, ["alerts.yml"]);
    let defined: BTreeSet<String> = vec_of(
        &load_yaml(&deploy("prometheus/alerts.yml"))[0]["groups"],
        "groups",
    )
    .iter()
    .flat_map(|g| vec_of(&g["rules"], "rules"))
    .map(|r| str_of(&r["alert"], "alert").to_owned())
    .collect();
    let mut tested = BTreeSet::new();
    let mut firing = BTreeSet::new();
    for case in vec_of(&docs[0]["tests"], "tests") {
        for series in vec_of(&case["input_series"], "input_series") {
            let selector = str_of(&series["series"], "series");
            let (name, labels) = parse_selector(selector);
            assert_exported(name, "alerts_test.yml");
            assert_ne!(
                name, REQUESTS,
                "a tunnel-only run has no request series: {selector}"
            );
            let label = |key: &str| {
                labels
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| *v)
                    .unwrap_or_else(|| panic!("{selector}: no {key}"))
            };
            assert_eq!(label("job"), "portcullis", "{selector}");
            let mut keys: Vec<&str> = labels
                .iter()
                .map(|(k, _)| *k)
                .filter(|k| !matches!(*k, "job" | "instance"))
                .collect();
            keys.sort_unstable();
            match name {
                "portcullis_denials_total" => {
                    assert_eq!(keys, ["reason"], "{selector}");
                    assert!(portcullis::error::DENIAL_REASONS.contains(&label("reason")));
                }
                "portcullis_upstream_errors_total" => {
                    assert_eq!(keys, ["kind"], "{selector}");
                    assert!(portcullis::error::UPSTREAM_KINDS.contains(&label("kind")));
                }
                "portcullis_config_reloads_total" => {
                    assert_eq!(keys, ["result"], "{selector}");
                    assert!([
                        portcullis::telemetry::RELOAD_SUCCESS,
                        portcullis::telemetry::RELOAD_FAILURE
                    ]
                    .contains(&label("result")));
                }
                "portcullis_credential_refreshes_total" => {
                    assert_eq!(keys, ["credential", "result"], "{selector}");
                    assert!(portcullis::telemetry::REFRESH_RESULTS.contains(&label("result")));
                }
                "portcullis_oidc_verifications_total" => {
                    assert_eq!(keys, ["issuer", "result"], "{selector}");
                    assert!(portcullis::telemetry::OIDC_RESULTS.contains(&label("result")));
                }
                "portcullis_audit_write_errors_total" => {
                    assert!(keys.is_empty(), "{selector}: unlabelled");
                }
                TUNNELS => {
                    assert_eq!(keys, ["client", "decision", "rule"], "{selector}");
                    assert!(["allow", "deny", "would_deny"].contains(&label("decision")));
                }
                _ => panic!("{selector}: no check for this family yet"),
            }
        }
        for test in vec_of(&case["alert_rule_test"], "alert_rule_test") {
            let name = str_of(&test["alertname"], "alertname").to_owned();
            assert!(defined.contains(&name), "{name} is not in alerts.yml");
            if !vec_of(&test["exp_alerts"], "exp_alerts").is_empty() {
                firing.insert(name.clone());
            }
            tested.insert(name);
        }
    }
    for alert in [
        "PortcullisConfigReloadFailed",
        "PortcullisUpstreamErrors",
        "PortcullisDenialSpike",
        "PortcullisOidcRejections",
        "PortcullisAuditWriteErrors",
    ] {
        assert!(firing.contains(alert), "no test where {alert} fires");
    }
    assert!(tested.len() >= 3, "{tested:?}");
}

/// `name{k="v",...}` of a promtool input series: the name and the label pairs (values hold no
/// comma or quote here).
fn parse_selector(selector: &str) -> (&str, Vec<(&str, &str)>) {
    let (name, rest) = selector.split_once('{').unwrap_or((selector, "}"));
    let labels = rest
        .trim_end_matches('}')
        .split(',')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("{selector}"));
            (k.trim(), v.trim().trim_matches('"'))
        })
        .collect();
    (name, labels)
}

#[test]
fn metric_name_extraction() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.99, sum by (le) (rate(portcullis_request_duration_seconds_bucket{job=\"portcullis\"}[5m])))"
        ),
        [HISTOGRAM]
    );
    assert_eq!(
        metric_names("portcullis_requests_total_count + process_open_fds"),
        ["portcullis_requests_total_count", "process_open_fds"]
    );
    assert_eq!(tokens("a:b_c1 > 0.5e3"), ["a:b_c1"]);
}

#[test]
fn dockerfile_is_multi_stage_non_root_and_ships_the_default_config() {
    let text = read(&deploy("Dockerfile"));
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let instruction = |l: &&str, name: &str| {
        l.split_whitespace()
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case(name))
    };
    let froms: Vec<&&str> = lines.iter().filter(|l| instruction(l, "FROM")).collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    let last_from = froms.last().unwrap();
    assert!(
        lines.iter().any(|l| instruction(l, "USER")) || last_from.contains("nonroot"),
        "runs as non-root"
    );
    assert!(
        lines.iter().any(|l| l.contains("config/default.toml")),
        "ships config/default.toml"
    );
    assert!(
        lines
            .iter()
            .any(|l| instruction(l, "COPY") && l.ends_with("/etc/portcullis/config.toml")),
        "config copied to /etc/portcullis/config.toml"
    );
    assert!(text.contains("cargo build --release --locked"));
    assert!(lines
        .iter()
        .any(|l| instruction(l, "EXPOSE") && l.contains("3128") && l.contains("9090")));
    assert!(lines
        .iter()
        .any(|l| instruction(l, "ENTRYPOINT") && l.contains("/usr/local/bin/portcullis")));

    // The image's config: the files the builder concatenates into /out/config.toml (the
    // embedded default first), which the build itself then checks.
    let instructions = dockerfile_instructions(&text);
    let build = instructions
        .iter()
        .find(|i| i.starts_with("RUN ") && i.contains("> /out/config.toml"))
        .expect("a RUN writes /out/config.toml");
    let step = build
        .split("&&")
        .map(str::trim)
        .find(|s| s.ends_with("> /out/config.toml"))
        .unwrap();
    let inputs: Vec<&str> = step
        .strip_prefix("RUN ")
        .unwrap_or(step)
        .trim_end_matches("> /out/config.toml")
        .split_whitespace()
        .collect();
    assert_eq!(inputs.first(), Some(&"cat"), "{step}");
    assert_eq!(
        inputs.get(1),
        Some(&"config/default.toml"),
        "the image's config starts from the embedded default: {step}"
    );
    assert!(
        build.contains("portcullis check -c /out/config.toml"),
        "the build checks the image's config: {build}"
    );
    let image_config: String = inputs[1..].iter().map(|f| read(&repo().join(f))).collect();

    // Its CA paths point into the writable state directory the image declares as a VOLUME (the
    // config's own folder, /etc/portcullis, is read-only).
    let volume = instructions
        .iter()
        .find_map(|i| i.strip_prefix("VOLUME "))
        .expect("a VOLUME for the state directory")
        .trim_matches(|c| matches!(c, '[' | ']' | '"' | ' '))
        .to_owned();
    let parsed = config::parse(
        &image_config,
        Origin::File("/etc/portcullis/config.toml".into()),
        Path::new("/etc/portcullis"),
        false,
    )
    .unwrap_or_else(|e| panic!("the image's config: {e}"));
    for (key, path) in [
        ("tls.ca_cert", &parsed.tls.ca_cert),
        ("tls.ca_key", &parsed.tls.ca_key),
    ] {
        assert!(
            path.starts_with(&volume),
            "{key} {} not in {volume}",
            path.display()
        );
    }

    // It passes `check` with the environment the image sets (as `docker run IMAGE check` would).
    let env = dockerfile_env(&instructions);
    assert!(
        env.iter()
            .any(|(name, _)| name == "PORTCULLIS_LISTEN__PROXY"),
        "the image binds the proxy beyond loopback: {env:?}"
    );
    // Environment variables override every mounted config, so the image must leave the CA to
    // the config file (the Kubernetes manifests mount a shared CA and point their config at it).
    assert!(
        !env.iter()
            .any(|(name, _)| name.starts_with("PORTCULLIS_TLS__")),
        "the image's environment would override the CA of mounted configs: {env:?}"
    );
    check_config("the image's config", &image_config, &env);
}

/// The instructions of a Dockerfile: comments dropped, continuation lines (`\`) joined.
fn dockerfile_instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part.trim_end());
                current.push(' ');
            }
            None => {
                current.push_str(line);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

/// The configuration variables (`PORTCULLIS_<SECTION>__<KEY>`) the Dockerfile's `ENV` sets.
fn dockerfile_env(instructions: &[String]) -> Vec<(String, String)> {
    instructions
        .iter()
        .filter_map(|i| i.strip_prefix("ENV "))
        .flat_map(str::split_whitespace)
        .filter_map(|pair| pair.split_once('='))
        .filter(|(name, _)| name.starts_with(config::ENV_PREFIX) && name.contains("__"))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

#[test]
fn systemd_unit_reloads_drains_and_is_hardened() {
    let text = read(&deploy("systemd/portcullis.service"));
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    for wanted in [
        "ExecStart=",
        "ExecReload=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=portcullis",
        "Type=simple",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(wanted)),
            "unit lacks {wanted}"
        );
    }
    let stop: i64 = lines
        .iter()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec")
        .trim_end_matches('s')
        .parse()
        .unwrap();
    // The unit runs an operator's config: its drain deadline is the built-in default unless that
    // config sets another.
    let grace = i64::try_from(builtin().limits.shutdown_grace_seconds).unwrap();
    assert!(
        stop > grace,
        "TimeoutStopSec {stop} <= shutdown_grace_seconds {grace}"
    );
}
