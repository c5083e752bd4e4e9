//! What launchers tell a process through its environment: the coordinator's address and a
//! rank, in the variables torchrun, Kubeflow's PyTorchJob, Kubernetes Indexed Jobs, Slurm and
//! MPI set. A pure function of the variables, so it is tested without touching the process's
//! own environment.

/// The hints found, each with the variable it came from (for the log).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterEnv {
    /// `http://MASTER_ADDR:MASTER_PORT` (port 7070 when only the address is set).
    pub coordinator: Option<(String, &'static str)>,
    /// The process's global rank.
    pub rank: Option<(u32, &'static str)>,
    /// Its rank on this node: which GPU `--device cuda` means.
    pub local_rank: Option<(u32, &'static str)>,
    /// How many processes the launcher started.
    pub world_size: Option<(u32, &'static str)>,
}

/// Global rank variables, most specific first.
const RANK_VARS: [&str; 5] = ["RANK", "SLURM_PROCID", "JOB_COMPLETION_INDEX", "OMPI_COMM_WORLD_RANK", "PMI_RANK"];
const LOCAL_RANK_VARS: [&str; 3] = ["LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK"];
const WORLD_SIZE_VARS: [&str; 4] = ["WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"];

/// The coordinator's port when `MASTER_ADDR` comes without `MASTER_PORT`.
pub const DEFAULT_PORT: u16 = 7070;

impl ClusterEnv {
    /// Read the hints through `var` (`std::env::var` in the binary). A variable that is set but
    /// not a number is an error naming it, not a silent fallback.
    pub fn read(var: impl Fn(&str) -> Option<String>) -> anyhow::Result<ClusterEnv> {
        let number = |names: &[&'static str]| -> anyhow::Result<Option<(u32, &'static str)>> {
            for &name in names {
                if let Some(v) = var(name).filter(|v| !v.trim().is_empty()) {
                    let n = v.trim().parse::<u32>().map_err(|_| {
                        anyhow::anyhow!("{name}={v:?} is not a non-negative integer; unset it or fix the launcher")
                    })?;
                    return Ok(Some((n, name)));
                }
            }
            Ok(None)
        };
        let coordinator = match var("MASTER_ADDR").filter(|a| !a.trim().is_empty()) {
            None => None,
            Some(addr) => {
                let port = match var("MASTER_PORT").filter(|p| !p.trim().is_empty()) {
                    Some(p) => p.trim().parse::<u16>().map_err(|_| {
                        anyhow::anyhow!("MASTER_PORT={p:?} is not a port number; unset it or fix the launcher")
                    })?,
                    None => DEFAULT_PORT,
                };
                let host = addr.trim();
                // An IPv6 address needs brackets in a URL.
                let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_owned() };
                Some((format!("{host}:{port}"), "MASTER_ADDR"))
            }
        };
        Ok(ClusterEnv {
            coordinator,
            rank: number(&RANK_VARS)?,
            local_rank: number(&LOCAL_RANK_VARS)?,
            world_size: number(&WORLD_SIZE_VARS)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(vars: &[(&str, &str)]) -> anyhow::Result<ClusterEnv> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        ClusterEnv::read(|k| map.get(k).cloned())
    }

    #[test]
    fn torchrun_slurm_and_indexed_jobs() {
        let torchrun = read(&[("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "29500"), ("RANK", "3"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "8")]).unwrap();
        assert_eq!(torchrun.coordinator, Some(("10.0.0.1:29500".into(), "MASTER_ADDR")));
        assert_eq!((torchrun.rank, torchrun.local_rank, torchrun.world_size), (Some((3, "RANK")), Some((1, "LOCAL_RANK")), Some((8, "WORLD_SIZE"))));
        let slurm = read(&[("SLURM_PROCID", "5"), ("SLURM_LOCALID", "1"), ("SLURM_NTASKS", "16")]).unwrap();
        assert_eq!((slurm.rank, slurm.local_rank, slurm.world_size), (Some((5, "SLURM_PROCID")), Some((1, "SLURM_LOCALID")), Some((16, "SLURM_NTASKS"))));
        assert_eq!(slurm.coordinator, None);
        let k8s = read(&[("JOB_COMPLETION_INDEX", "2"), ("MASTER_ADDR", "fd00::1")]).unwrap();
        assert_eq!(k8s.rank, Some((2, "JOB_COMPLETION_INDEX")));
        assert_eq!(k8s.coordinator, Some(("[fd00::1]:7070".into(), "MASTER_ADDR")));
        // RANK wins over Slurm's when both are set (torchrun inside an allocation).
        assert_eq!(read(&[("RANK", "1"), ("SLURM_PROCID", "0")]).unwrap().rank, Some((1, "RANK")));
        assert_eq!(read(&[]).unwrap(), ClusterEnv::default());
    }

    #[test]
    fn garbage_is_named() {
        let e = read(&[("RANK", "three")]).unwrap_err().to_string();
        assert!(e.contains("RANK=\"three\""), "{e}");
        let e = read(&[("MASTER_ADDR", "h"), ("MASTER_PORT", "99999")]).unwrap_err().to_string();
        assert!(e.contains("MASTER_PORT"), "{e}");
    }
}
