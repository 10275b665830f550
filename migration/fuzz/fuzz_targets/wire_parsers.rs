//! Feeds arbitrary bytes to every parser of network input: the frame
//! header, the RAM range table (against a fixed RAM layout) and SETUP.
//! Properties: no panic; accepted ranges lie inside guest RAM.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migration::wire::{decode_ranges, Header, Setup, HEADER_LEN};
use migration::RamRegion;

fuzz_target!(|data: &[u8]| {
    if data.len() >= HEADER_LEN {
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&data[..HEADER_LEN]);
        if let Ok(hdr) = Header::decode(&h) {
            assert_eq!(Header::decode(&hdr.encode()), Ok(hdr));
        }
    }
    let regions = [
        RamRegion { gpa: 0, size: 1 << 30, host_addr: 0x1000 },
        RamRegion { gpa: 4 << 30, size: 1 << 30, host_addr: 0x2000 },
    ];
    let mut out = Vec::new();
    let split = data.len() / 16 * 16;
    let data_len = data.len() as u64 * 4096;
    if decode_ranges(&data[..split], data_len, &regions, &mut out).is_ok() {
        for r in &out {
            assert!((r.first_page + r.npages) * 4096 <= regions[r.region].size);
        }
    }
    let _ = Setup::decode(data);
});
