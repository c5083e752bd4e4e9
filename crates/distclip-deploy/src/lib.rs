//! Checks of the operator files in `deploy/` (no code ships from this crate).
//!
//! `tests/manifests.rs` reads every YAML document under `deploy/k8s/` and validates each
//! Kubernetes object against the official JSON schemas of a pinned Kubernetes version
//! (`deploy/k8s/schemas/`, strict: an unknown field, a wrong type or a kind without a bundled
//! schema is an error), validates `deploy/docker/compose.yaml` against the Compose
//! specification's schema, checks the references between the objects (Services select pods,
//! Secrets, ConfigMaps and claims exist, probes name declared ports), loads the run
//! configuration the manifests ship with `distclip-config`, and checks that every `distclip`
//! flag the manifests, the Compose file and the Slurm script use is one the CLI declares.
