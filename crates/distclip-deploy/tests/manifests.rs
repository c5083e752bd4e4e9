//! The operator files in `deploy/`, checked without a cluster, Docker or Slurm:
//!
//! - every Kubernetes object under `deploy/k8s/` against the official JSON schemas of
//!   Kubernetes [`K8S_VERSION`] in their strict form (an unknown field is an error), bundled in
//!   `deploy/k8s/schemas/`; a kind without a bundled schema is an error too;
//! - `deploy/docker/compose.yaml` against the Compose specification's schema;
//! - the references between the objects (selectors, Secrets, ConfigMaps, claims, ports), the
//!   run configuration they ship (loaded with `distclip-config`), and every `distclip` flag the
//!   manifests, the Compose file and the Slurm script pass, against the flags the CLI declares.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Value, json};

/// The Kubernetes version whose schemas are bundled (`deploy/k8s/schemas/<version>/`).
const K8S_VERSION: &str = "v1.33.0";

/// The `$id` under which the schemas' `$ref`s find the shared definitions.
const DEFINITIONS_URI: &str = "https://kubernetes.io/api/_definitions.json";

/// The checkout, read when the test runs: a compile-time path would point at whichever clone
/// first built this test in a shared target directory.
fn repo() -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join("../..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every non-empty YAML document of `text`, merge keys (`<<: *anchor`) applied, as JSON.
fn yaml_documents(text: &str, name: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .enumerate()
        .map(|(i, doc)| {
            let mut v = serde_norway::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{name}: YAML document {}: {e}", i + 1));
            v.apply_merge()
                .unwrap_or_else(|e| panic!("{name}: YAML document {}: {e}", i + 1));
            serde_json::to_value(v)
                .unwrap_or_else(|e| panic!("{name}: YAML document {}: {e}", i + 1))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The Kubernetes manifests: `deploy/k8s/*.yaml` but the kustomization, by file name.
fn manifest_files() -> Vec<PathBuf> {
    let dir = repo().join("deploy/k8s");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    files
}

/// `(file name, object)` for every object of every manifest.
fn objects() -> Vec<(String, Value)> {
    manifest_files()
        .iter()
        .flat_map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            yaml_documents(&read(p), &name)
                .into_iter()
                .map(move |o| (name.clone(), o))
        })
        .collect()
}

fn str_of<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// The schemas of one Kubernetes version, as kubernetes-validate lays them out.
struct KubeSchemas {
    dir: PathBuf,
    definitions: Value,
}

impl KubeSchemas {
    fn load() -> Self {
        let dir = repo().join("deploy/k8s/schemas").join(K8S_VERSION);
        let definitions = read_json(&dir.join("_definitions.json"));
        assert_eq!(
            definitions["$id"], DEFINITIONS_URI,
            "the definitions' $id moved"
        );
        Self { dir, definitions }
    }

    /// kubernetes-validate's file name: `<kind>-<group without domain>-<version>.json`.
    fn file_name(kind: &str, api_version: &str) -> String {
        let api = match api_version.split_once('/') {
            Some((group, version)) => {
                format!("{}-{version}", group.split('.').next().unwrap_or(group))
            }
            None => api_version.to_owned(),
        };
        format!("{}-{api}.json", kind.to_lowercase())
    }

    /// The errors of one object: empty when it is valid. A kind or apiVersion without a
    /// bundled schema is one error that names it.
    fn errors(&self, object: &Value) -> Vec<String> {
        let (kind, api_version) = (str_of(object, "/kind"), str_of(object, "/apiVersion"));
        if kind.is_empty() || api_version.is_empty() {
            return vec!["no kind or apiVersion".into()];
        }
        let path = self.dir.join(Self::file_name(kind, api_version));
        if !path.exists() {
            return vec![format!(
                "no schema for kind {kind} ({api_version}) in deploy/k8s/schemas/{K8S_VERSION}/ \
                 (expected {}): add it with deploy/k8s/schemas/refresh.py",
                path.file_name().unwrap().to_string_lossy()
            )];
        }
        let schema = read_json(&path);
        let registry = jsonschema::Registry::new()
            .add(DEFINITIONS_URI, self.definitions.clone())
            .and_then(|b| b.prepare())
            .expect("the bundled definitions form a registry");
        let validator = jsonschema::options()
            .offline()
            .with_registry(&registry)
            .build(&schema)
            .unwrap_or_else(|e| panic!("{}: not a usable schema: {e}", path.display()));
        validator
            .iter_errors(object)
            .map(|e| format!("at {}: {e}", e.instance_path()))
            .collect()
    }
}

/// What one manifest of the real set is, for the failure messages.
fn describe(file: &str, object: &Value) -> String {
    format!(
        "{file}: {} {}",
        str_of(object, "/kind"),
        str_of(object, "/metadata/name")
    )
}

#[test]
fn every_kubernetes_object_matches_the_strict_schema_of_its_kind() {
    let schemas = KubeSchemas::load();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for (file, object) in objects() {
        let errors = schemas.errors(&object);
        if errors.is_empty() {
            *counts
                .entry(str_of(&object, "/kind").to_owned())
                .or_default() += 1;
        } else {
            failures.push(format!(
                "{}:\n    {}",
                describe(&file, &object),
                errors.join("\n    ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "manifests that Kubernetes {K8S_VERSION} would refuse:\n{}",
        failures.join("\n")
    );
    let expected = [
        ("ConfigMap", 1),
        ("Deployment", 1),
        ("Job", 1),
        ("PersistentVolumeClaim", 1),
        ("Secret", 1),
        ("Service", 2),
    ];
    let expected: BTreeMap<String, usize> = expected
        .iter()
        .map(|(k, n)| ((*k).to_owned(), *n))
        .collect();
    assert_eq!(counts, expected, "objects validated, by kind");
}

/// The coordinator Deployment as shipped, to break in the tests below.
fn shipped_deployment() -> Value {
    objects()
        .into_iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == "Deployment")
        .expect("a Deployment in deploy/k8s")
}

#[test]
fn the_validator_refuses_a_broken_deployment() {
    let schemas = KubeSchemas::load();
    let good = shipped_deployment();
    assert_eq!(schemas.errors(&good), Vec::<String>::new());

    let broken = |f: &dyn Fn(&mut Value)| {
        let mut d = good.clone();
        f(&mut d);
        schemas.errors(&d)
    };
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "a string for an integer",
            broken(&|d| d["spec"]["replicas"] = json!("one")),
            "/spec/replicas",
        ),
        (
            "a typo'd field deep in the pod spec",
            broken(&|d| {
                d["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = json!("Always")
            }),
            "imagePullPolcy",
        ),
        (
            "an unknown field at the top",
            broken(&|d| d["specification"] = json!({})),
            "specification",
        ),
        (
            "a probe without its port",
            broken(&|d| {
                d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]
                    .as_object_mut()
                    .unwrap()
                    .remove("port");
            }),
            "port",
        ),
        (
            "a wrong apiVersion",
            broken(&|d| d["apiVersion"] = json!("apps/v1beta9")),
            "apps/v1beta9",
        ),
        (
            "an unknown kind",
            broken(&|d| d["kind"] = json!("Deploymnet")),
            "Deploymnet",
        ),
    ];
    for (what, errors, mention) in cases {
        assert!(!errors.is_empty(), "{what}: accepted");
        assert!(
            errors.iter().any(|e| e.contains(mention)),
            "{what}: the errors do not mention {mention:?}: {errors:?}"
        );
    }
}

#[test]
fn the_kustomization_lists_every_manifest_once() {
    let dir = repo().join("deploy/k8s");
    let k = &yaml_documents(&read(&dir.join("kustomization.yaml")), "kustomization.yaml")[0];
    assert_eq!(k["kind"], "Kustomization");
    let listed: Vec<&str> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let unique: BTreeSet<&str> = listed.iter().copied().collect();
    assert_eq!(
        unique.len(),
        listed.len(),
        "a resource listed twice: {listed:?}"
    );
    let files: BTreeSet<String> = manifest_files()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let listed: BTreeSet<String> = unique.into_iter().map(str::to_owned).collect();
    assert_eq!(
        listed, files,
        "kustomization.yaml resources vs the manifests in deploy/k8s"
    );
    // The image the kustomization sets is the one the pods name.
    let image = str_of(k, "/images/0/name");
    for (file, o) in objects() {
        for c in pod_containers(&o) {
            assert_eq!(
                str_of(c, "/image"),
                image,
                "{}: container image",
                describe(&file, &o)
            );
        }
    }
}

/// The containers and init containers of a workload's pod template.
fn pod_containers(o: &Value) -> Vec<&Value> {
    [
        "/spec/template/spec/containers",
        "/spec/template/spec/initContainers",
    ]
    .iter()
    .filter_map(|p| o.pointer(p).and_then(Value::as_array))
    .flatten()
    .collect()
}

fn find<'a>(objects: &'a [(String, Value)], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

fn named<'a>(objects: &'a [(String, Value)], kind: &str, component: &str) -> &'a Value {
    objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| {
            o["kind"] == kind
                && str_of(o, "/metadata/labels/app.kubernetes.io~1component") == component
        })
        .unwrap_or_else(|| panic!("no {kind} with component {component}"))
}

/// The `distclip` arguments of a container: the subcommand and `--flag` names.
fn container_flags(c: &Value) -> (String, Vec<String>) {
    let args: Vec<&str> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    (args[0].to_owned(), flags_in(&args[1..]))
}

fn flags_in(args: &[&str]) -> Vec<String> {
    args.iter()
        .filter_map(|a| a.strip_prefix("--"))
        .map(|f| f.split('=').next().unwrap().to_owned())
        .collect()
}

#[test]
fn the_objects_refer_to_each_other_correctly() {
    let objects = objects();
    let workloads: Vec<&Value> = objects
        .iter()
        .map(|(_, o)| o)
        .filter(|o| o["kind"] == "Deployment" || o["kind"] == "Job")
        .collect();

    // Every Service selects the pods of exactly one workload, on ports those pods declare.
    for (file, svc) in objects.iter().filter(|(_, o)| o["kind"] == "Service") {
        let selector = svc["spec"]["selector"].as_object().expect("a selector");
        let selected: Vec<&&Value> = workloads
            .iter()
            .filter(|w| {
                selector
                    .iter()
                    .all(|(k, v)| w["spec"]["template"]["metadata"]["labels"][k] == *v)
            })
            .collect();
        assert_eq!(
            selected.len(),
            1,
            "{}: selects {} workloads",
            describe(file, svc),
            selected.len()
        );
        let ports: BTreeSet<&str> = pod_containers(selected[0])
            .iter()
            .flat_map(|c| c["ports"].as_array().into_iter().flatten())
            .map(|p| str_of(p, "/name"))
            .collect();
        for p in svc["spec"]["ports"].as_array().unwrap() {
            assert!(
                ports.contains(str_of(p, "/targetPort")),
                "{}: targetPort {} is not a pod port",
                describe(file, svc),
                p["targetPort"]
            );
        }
    }

    for w in &workloads {
        let name = str_of(w, "/metadata/name");
        // Selector and template agree (the API server refuses the object otherwise).
        if let Some(m) = w
            .pointer("/spec/selector/matchLabels")
            .and_then(Value::as_object)
        {
            for (k, v) in m {
                assert_eq!(
                    &w["spec"]["template"]["metadata"]["labels"][k], v,
                    "{name}: selector {k}"
                );
            }
        }
        let spec = &w["spec"]["template"]["spec"];
        for v in spec["volumes"].as_array().into_iter().flatten() {
            if let Some(claim) = v
                .pointer("/persistentVolumeClaim/claimName")
                .and_then(Value::as_str)
            {
                assert!(
                    find(&objects, "PersistentVolumeClaim", claim).is_some(),
                    "{name}: claim {claim} is not shipped"
                );
            }
            if let Some(cm) = v.pointer("/configMap/name").and_then(Value::as_str) {
                let cm = find(&objects, "ConfigMap", cm)
                    .unwrap_or_else(|| panic!("{name}: ConfigMap {cm} is not shipped"));
                for item in v["configMap"]["items"].as_array().into_iter().flatten() {
                    assert!(
                        cm["data"].get(str_of(item, "/key")).is_some(),
                        "{name}: ConfigMap key {}",
                        item["key"]
                    );
                }
            }
        }
        for c in pod_containers(w) {
            for e in c["env"].as_array().into_iter().flatten() {
                for (kind, at, data) in [
                    ("Secret", "/valueFrom/secretKeyRef", "stringData"),
                    ("ConfigMap", "/valueFrom/configMapKeyRef", "data"),
                ] {
                    if let Some(r) = e.pointer(at) {
                        let o = find(&objects, kind, str_of(r, "/name")).unwrap_or_else(|| {
                            panic!(
                                "{name}: env {} names a {kind} that is not shipped",
                                e["name"]
                            )
                        });
                        assert!(
                            o[data].get(str_of(r, "/key")).is_some(),
                            "{name}: env {}: no key {}",
                            e["name"],
                            r["key"]
                        );
                    }
                }
            }
            let ports: BTreeSet<i64> = c["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["containerPort"].as_i64())
                .collect();
            for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                if let Some(port) = c
                    .pointer(&format!("/{probe}/grpc/port"))
                    .and_then(Value::as_i64)
                {
                    assert!(
                        ports.contains(&port),
                        "{name}: {probe} on port {port}, which the container does not declare"
                    );
                }
            }
            // The token travels in the environment, never on a command line.
            for a in c["args"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(c["command"].as_array().into_iter().flatten())
            {
                let a = a.as_str().unwrap();
                assert!(
                    !a.starts_with("--token") || a.starts_with("--token-file"),
                    "{name}: {a} on a command line"
                );
            }
        }
    }

    // The coordinator: one pod at a time on the run directory, probes on its gRPC port.
    let coordinator = named(&objects, "Deployment", "coordinator");
    assert_eq!(coordinator["spec"]["replicas"], 1);
    assert_eq!(coordinator["spec"]["strategy"]["type"], "Recreate");
    let c = &coordinator["spec"]["template"]["spec"]["containers"][0];
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["grpc"]["port"], 7070, "coordinator {probe}");
    }
    let annotations = &coordinator["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "7071");
    let coordinator_service = named(&objects, "Service", "coordinator");

    // The workers: an Indexed Job, all indexes at once, one GPU each, reaching the
    // coordinator through its Service, addressable through a headless Service.
    let job = named(&objects, "Job", "worker");
    assert_eq!(job["spec"]["completionMode"], "Indexed");
    assert_eq!(
        job["spec"]["parallelism"], job["spec"]["completions"],
        "an elastic Indexed Job scales both together"
    );
    assert_eq!(job["spec"]["template"]["spec"]["restartPolicy"], "Never");
    let w = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(w["resources"]["limits"]["nvidia.com/gpu"], 1);
    assert_eq!(w["readinessProbe"]["grpc"]["port"], 7080);
    let env: BTreeMap<&str, &Value> = w["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (str_of(e, "/name"), e))
        .collect();
    let url = format!(
        "http://{}:{}",
        str_of(coordinator_service, "/metadata/name"),
        coordinator_service["spec"]["ports"][0]["port"]
    );
    assert_eq!(env["DISTCLIP_COORDINATOR"]["value"], url.as_str());
    assert!(env.contains_key("DISTCLIP_TOKEN") && env.contains_key("POD_IP"));
    let headless = named(&objects, "Service", "worker");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(
        job["spec"]["template"]["spec"]["subdomain"],
        headless["metadata"]["name"]
    );

    // The run configuration loads, and the run can start with the Job's workers.
    let config_map = objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == "ConfigMap")
        .unwrap();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("distclip-deploy");
    std::fs::create_dir_all(&dir).unwrap();
    let toml_path = dir.join("run.toml");
    std::fs::write(&toml_path, str_of(config_map, "/data/run.toml")).unwrap();
    let data = format!("data.train={:?}", str_of(config_map, "/data/data"));
    let config = distclip_config::RunConfig::load(Some(&toml_path), &[data])
        .unwrap_or_else(|e| panic!("the ConfigMap's run.toml: {e}"));
    let workers = job["spec"]["parallelism"].as_u64().unwrap() as usize;
    assert!(
        config.cluster.min_workers <= workers,
        "cluster.min_workers = {} but the Job runs {workers} workers: the run would never start",
        config.cluster.min_workers
    );
}

/// The `--long` flags a subcommand accepts, read from the CLI's sources: a field after
/// `#[arg(long...)]` is `--field-name`, or the name `long = "..."` gives. `files` are under
/// `crates/distclip-cli/src/commands/`; the global flags of `main.rs` are always included.
/// Flattened argument groups are listed as files of their own.
fn cli_flags(files: &[&str]) -> BTreeSet<String> {
    let src = repo().join("crates/distclip-cli/src");
    let mut paths = vec![src.join("main.rs")];
    paths.extend(files.iter().map(|f| src.join("commands").join(f)));
    let mut flags = BTreeSet::new();
    for path in paths {
        let mut pending = false;
        for line in read(&path).lines() {
            let line = line.trim();
            if line.starts_with("#[arg(") && line.contains("long") {
                if let Some(rest) = line.split("long = \"").nth(1) {
                    flags.insert(rest.split('"').next().unwrap().to_owned());
                } else {
                    pending = true;
                }
                continue;
            }
            if pending && !line.starts_with("#[") && !line.starts_with("///") {
                let field = line
                    .trim_start_matches("pub(crate) ")
                    .trim_start_matches("pub ");
                let ident: String = field
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    field[ident.len()..].trim_start().starts_with(':'),
                    "{}: cannot read the field {line:?}",
                    path.display()
                );
                flags.insert(ident.replace('_', "-"));
                pending = false;
            }
        }
    }
    assert!(
        flags.len() > 3,
        "read almost no flags from the CLI: {flags:?}"
    );
    flags
}

fn subcommand_flags(subcommand: &str) -> BTreeSet<String> {
    match subcommand {
        "coordinator" => cli_flags(&["coordinator.rs", "run_args.rs", "security.rs"]),
        "worker" => cli_flags(&["worker.rs", "security.rs"]),
        "synth" => cli_flags(&["synth.rs"]),
        other => panic!("a subcommand the deploy files should not run: {other}"),
    }
}

fn assert_known_flags(context: &str, subcommand: &str, flags: &[String]) {
    let known = subcommand_flags(subcommand);
    let unknown: Vec<&String> = flags.iter().filter(|f| !known.contains(*f)).collect();
    assert!(
        unknown.is_empty(),
        "{context}: `distclip {subcommand}` has no flag {unknown:?} (it has {known:?})"
    );
    assert!(
        !flags.iter().any(|f| f == "token"),
        "{context}: --token puts the token on a command line"
    );
}

#[test]
fn the_kubernetes_pods_use_only_flags_the_cli_has() {
    let objects = objects();
    for (component, subcommand) in [("coordinator", "coordinator"), ("worker", "worker")] {
        let kind = if component == "worker" {
            "Job"
        } else {
            "Deployment"
        };
        let w = named(&objects, kind, component);
        let c = &w["spec"]["template"]["spec"]["containers"][0];
        let (sub, flags) = container_flags(c);
        assert_eq!(sub, subcommand);
        assert_known_flags(&format!("k8s {component}"), subcommand, &flags);
    }
}

#[test]
fn the_compose_file_matches_the_compose_specification() {
    let path = repo().join("deploy/docker/compose.yaml");
    let docs = yaml_documents(&read(&path), "compose.yaml");
    assert_eq!(docs.len(), 1);
    let compose = &docs[0];
    let schema = read_json(&repo().join("deploy/docker/schema/compose-spec.json"));
    let validator = jsonschema::options()
        .offline()
        .build(&schema)
        .expect("the Compose schema builds");
    let errors: Vec<String> = validator
        .iter_errors(compose)
        .map(|e| format!("at {}: {e}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "compose.yaml against the Compose specification:\n{}",
        errors.join("\n")
    );
    // ... and the schema bites.
    let mut typo = compose.clone();
    typo["services"]["coordinator"]["comand"] = json!(["coordinator"]);
    assert!(
        !validator.is_valid(&typo),
        "a typo'd service key was accepted"
    );

    let services = compose["services"].as_object().unwrap();
    let command = |name: &str| -> Vec<&str> {
        services[name]["command"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: a command list"))
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect()
    };
    let workers: Vec<&String> = services
        .keys()
        .filter(|k| k.starts_with("worker"))
        .collect();
    assert!(workers.len() >= 2, "at least two workers: {workers:?}");
    for (name, service) in services {
        let args = command(name);
        assert_known_flags(&format!("compose {name}"), args[0], &flags_in(&args[1..]));
        assert!(
            service["environment"]["DISTCLIP_TOKEN"]
                .as_str()
                .is_some_and(|t| t.contains("${DISTCLIP_TOKEN")),
            "{name}: the token from the environment"
        );
    }
    let value_of = |args: &[&str], flag: &str| -> String {
        args.iter()
            .position(|a| *a == flag)
            .map(|i| args[i + 1].to_owned())
            .unwrap_or_default()
    };
    let coordinator = command("coordinator");
    assert_eq!(
        value_of(&coordinator, "--min-workers"),
        workers.len().to_string()
    );
    for w in &workers {
        let args = command(w);
        assert_eq!(
            value_of(&args, "--advertise"),
            format!("{w}:7080"),
            "{w} advertises its own service name"
        );
        assert_eq!(value_of(&args, "--coordinator"), "http://coordinator:7070");
    }
    // The coordinator trains on what the synth service writes.
    let synth = command("synth");
    assert!(
        value_of(&coordinator, "--data")
            .starts_with(&format!("{}/train/", value_of(&synth, "--out")))
    );
}

/// The Slurm script's `distclip` invocations: the flags it passes to each subcommand.
fn sbatch_invocations(text: &str) -> BTreeMap<&'static str, Vec<String>> {
    // Logical lines: backslash continuations joined, and an array literal's lines joined.
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        current.push(' ');
        current.push_str(line.trim_end_matches('\\'));
        let open = current.matches('(').count() > current.matches(')').count();
        if !line.ends_with('\\') && !open {
            lines.push(std::mem::take(&mut current));
        }
    }
    let mut out: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    for line in &lines {
        let words: Vec<&str> = line
            .split_whitespace()
            .map(|w| w.trim_matches(|c| c == '"' || c == '(' || c == ')'))
            .collect();
        let sub = if line.contains("\"$bin\" coordinator") {
            "coordinator"
        } else if line.trim_start().starts_with("worker_args")
            || line.contains("exec \"$0\" worker")
        {
            "worker"
        } else {
            continue;
        };
        out.entry(sub).or_default().extend(flags_in(&words));
    }
    out
}

#[test]
fn the_slurm_script_uses_only_flags_the_cli_has() {
    let path = repo().join("deploy/slurm/distclip.sbatch");
    let text = read(&path);
    let invocations = sbatch_invocations(&text);
    for sub in ["coordinator", "worker"] {
        let flags = invocations
            .get(sub)
            .unwrap_or_else(|| panic!("no `distclip {sub}` in {}", path.display()));
        assert!(
            flags.iter().any(|f| f == "token-file"),
            "distclip {sub} without --token-file"
        );
        assert_known_flags(&format!("slurm {sub}"), sub, flags);
    }
    assert!(text.contains("scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1"));

    // The syntax, with bash itself; shellcheck where it is installed.
    let bash = std::process::Command::new("bash")
        .arg("-n")
        .arg(&path)
        .output()
        .expect("running bash -n");
    assert!(
        bash.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&bash.stderr)
    );
    match std::process::Command::new("shellcheck").arg(&path).output() {
        Ok(out) => assert!(
            out.status.success(),
            "shellcheck:\n{}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(_) => eprintln!("shellcheck not installed: skipped"),
    }
}

/// Whether a `.dockerignore` line excludes `path` (relative, `/`-separated). Only the forms
/// the ignore files use are understood: `dir`, `**/name` and `**/*.ext`.
fn docker_ignores(pattern: &str, path: &str) -> bool {
    if let Some(ext) = pattern.strip_prefix("**/*.") {
        path.ends_with(&format!(".{ext}"))
    } else if let Some(name) = pattern.strip_prefix("**/") {
        path.split('/').any(|c| c == name)
    } else {
        assert!(
            !pattern.contains(['*', '?', '[', '!']),
            "extend docker_ignores for {pattern:?}"
        );
        path == pattern || path.starts_with(&format!("{pattern}/"))
    }
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "target") {
                files_under(&p, out);
            }
        } else {
            out.push(p);
        }
    }
}

#[test]
fn the_images_get_every_file_the_build_needs() {
    let root = repo();
    // What `cargo build --locked --bin distclip` reads: the workspace manifests and lock file,
    // every crate, the protos, and the test targets crates/distclip-cli/Cargo.toml names.
    let mut needed = Vec::new();
    for dir in ["crates", "proto", "tests/common"] {
        files_under(&root.join(dir), &mut needed);
    }
    for e in std::fs::read_dir(root.join("tests")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|e| e == "rs") {
            needed.push(p);
        }
    }
    let needed: Vec<String> = needed
        .iter()
        .map(|p| {
            p.strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/")
        })
        .chain(["Cargo.toml".to_owned(), "Cargo.lock".to_owned()])
        .filter(|p| !p.ends_with(".pyc") && !p.contains("__pycache__"))
        .collect();
    assert!(needed.len() > 50, "found too few sources: {}", needed.len());
    for dockerfile in ["Dockerfile", "Dockerfile.cuda"] {
        let dir = root.join("deploy/docker");
        let text = read(&dir.join(dockerfile));
        let ignore = read(&dir.join(format!("{dockerfile}.dockerignore")));
        let patterns: Vec<&str> = ignore
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let lost: Vec<&String> = needed
            .iter()
            .filter(|p| patterns.iter().any(|pat| docker_ignores(pat, p)))
            .collect();
        assert!(
            lost.is_empty(),
            "{dockerfile}.dockerignore leaves out files the build needs: {lost:?}"
        );
        for must in [".git", "target", "fuzz"] {
            assert!(
                patterns.contains(&must),
                "{dockerfile}.dockerignore: {must} is large and not needed"
            );
        }
        // The runtime stage: non-root, the three ports, distclip behind an init.
        let runtime = text.rsplit("\nFROM ").next().unwrap();
        assert!(
            runtime.contains("\nUSER 10001:10001\n"),
            "{dockerfile}: runs as root"
        );
        assert!(
            runtime.contains("\nEXPOSE 7070 7071 7080\n"),
            "{dockerfile}: ports"
        );
        assert!(
            runtime.contains("\nENTRYPOINT [\"/usr/bin/tini\", \"--\", \"distclip\"]\n"),
            "{dockerfile}: entrypoint"
        );
        assert!(
            text.contains("cargo build --release --locked --bin distclip"),
            "{dockerfile}: the build"
        );
    }
    assert!(
        read(&root.join("deploy/docker/Dockerfile.cuda")).contains("--features distclip-cli/tch")
    );
}
