//! Whatever workers send the coordinator, decoded as gRPC decodes it and fed to the run's state
//! machine in any order and timing, is answered or refused, never a panic:
//! `distclip_coordinator::machine::drive_untrusted`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    distclip_coordinator::machine::drive_untrusted(data);
});
