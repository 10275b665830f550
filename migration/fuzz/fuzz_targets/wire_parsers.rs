//! Feeds arbitrary bytes to every parser of network input: the frame
//! header, the RAM range table (against a fixed RAM layout) and SETUP.
//! Properties: no panic; accepted ranges lie inside guest RAM.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migration::wire::{decode_ranges, Frame, Header, Setup, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if data.len() >= HEADER_LEN {
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&data[..HEADER_LEN]);
        if let Ok(hdr) = Header::decode(&h) {
            assert_eq!(Header::decode(&hdr.encode()), Ok(hdr));
        }
        assert_eq!(Header::decode(&h).is_ok(), Frame::decode(&h).is_ok());
        if let Ok(env) = Frame::decode(&h) {
            assert_eq!(Frame::decode(&env.frame.encode(env.session)), Ok(env));
        }
    }
    let regions = [(0u64, 1u64 << 30), (4u64 << 30, 1u64 << 30)];
    let mut out = Vec::new();
    let split = data.len() / 16 * 16;
    let data_len = data.len() as u64 * 4096;
    if decode_ranges(&data[..split], data_len, &regions, &mut out).is_ok() {
        for r in &out {
            assert!((r.first_page + r.npages) * 4096 <= regions[r.region].1);
        }
    }
    let _ = Setup::decode(data);
});
