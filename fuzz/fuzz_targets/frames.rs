//! Whatever a peer sends on a data channel (TCP frames or a gRPC chunk) is parsed or refused,
//! never a panic, a huge allocation or a stall: `distclip_comm::parse_untrusted`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    distclip_comm::parse_untrusted(data, 1 << 16);
});
