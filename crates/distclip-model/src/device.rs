//! Device selection from the command-line spelling: `flex` (pure Rust, default), `cpu`
//! (libtorch CPU) and `cuda:N` (libtorch CUDA). The libtorch devices exist only in builds with
//! the `tch` feature; asking for them otherwise is an error that says how to build.

use burn::tensor::Device;

use crate::ModelError;

/// Whether this build links libtorch.
pub const HAS_TCH: bool = cfg!(feature = "tch");

/// Parse `flex`, `cpu`, `cuda` or `cuda:N` into a Burn device.
pub fn parse_device(spec: &str) -> Result<Device, ModelError> {
    let spec = spec.trim();
    if spec == "flex" {
        return Ok(Device::flex());
    }
    let cuda_index = if spec == "cuda" {
        Some(0)
    } else if let Some(i) = spec.strip_prefix("cuda:") {
        Some(i.parse::<usize>().map_err(|_| {
            ModelError::Device(format!("{spec:?}: the CUDA index must be a number, e.g. cuda:0"))
        })?)
    } else {
        None
    };
    if spec != "cpu" && cuda_index.is_none() {
        return Err(ModelError::Device(format!(
            "unknown device {spec:?}; use flex, cpu (libtorch) or cuda:N (libtorch)"
        )));
    }
    libtorch_device(spec, cuda_index)
}

// burn-tch is marked deprecated upstream, but it is the only GPU backend that builds offline
// (the CubeCL backends download LLVM at build time); see the README's Backends section.
#[cfg(feature = "tch")]
#[allow(deprecated)]
fn libtorch_device(_spec: &str, cuda_index: Option<usize>) -> Result<Device, ModelError> {
    Ok(match cuda_index {
        Some(i) => Device::libtorch_cuda(i),
        None => Device::libtorch(),
    })
}

#[cfg(not(feature = "tch"))]
fn libtorch_device(spec: &str, _cuda_index: Option<usize>) -> Result<Device, ModelError> {
    Err(ModelError::Device(format!(
        "device {spec:?} needs the libtorch backend, which this build does not include; \
         rebuild with `cargo build --release --features tch` (see README: libtorch from \
         `pip install torch==2.9.0`, LIBTORCH_USE_PYTORCH=1), or use --device flex"
    )))
}

/// Size libtorch's intra-op thread pool (a no-op in builds without `tch`).
pub fn set_libtorch_threads(threads: usize) {
    #[cfg(feature = "tch")]
    tch::set_num_threads(threads as i32);
    #[cfg(not(feature = "tch"))]
    let _ = threads;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flex_always_parses() {
        assert!(parse_device("flex").is_ok());
    }

    #[test]
    fn unknown_devices_are_named_in_the_error() {
        let err = parse_device("tpu:0").unwrap_err().to_string();
        assert!(err.contains("tpu:0") && err.contains("flex"), "{err}");
        let err = parse_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("cuda:0"), "{err}");
    }

    #[cfg(not(feature = "tch"))]
    #[test]
    fn libtorch_devices_say_which_feature_to_build() {
        for d in ["cpu", "cuda:0"] {
            let err = parse_device(d).unwrap_err().to_string();
            assert!(err.contains("--features tch"), "{err}");
        }
    }
}
