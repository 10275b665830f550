//! Deterministic fuzzing of the parsers: random and mutated headers, range
//! tables and SETUP payloads never panic, and whatever is accepted is within
//! bounds (every accepted range lies inside guest RAM).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::api::DeviceStateMode;
use crate::traits::{MigCaps, PAGE_SIZE};
use crate::wire::*;

fn regions() -> Vec<(u64, u64)> {
    vec![(0, 64 << 20), (4 << 30, 32 << 20)]
}

fn valid_headers() -> Vec<[u8; HEADER_LEN]> {
    let s = 0xfeed_u128;
    let mut ram = Header::new(Kind::Ram, s).args(3, 0, 0);
    ram.count = 2;
    ram.len = 32 + 4096;
    vec![
        Header::new(Kind::Hello, s).args(ROLE_DATA, 1, 4).encode(),
        Header::new(Kind::Sync, s).args(1, 0, 0).encode(),
        Header::new(Kind::Device, s)
            .args(0, 5, 1)
            .with_len(100)
            .encode(),
        Header::new(Kind::Device, s).args(0, 6, 3).encode(),
        Header::new(Kind::Error, s).with_len(20).encode(),
        Header::new(Kind::State, s)
            .args(4, 1, 99)
            .with_len(1000)
            .encode(),
        ram.encode(),
    ]
}

fn mutate(rng: &mut StdRng, b: &mut [u8]) {
    for _ in 0..rng.gen_range(1..4) {
        let i = rng.gen_range(0..b.len());
        match rng.gen_range(0..4) {
            0 => b[i] = rng.gen(),
            1 => b[i] ^= 1 << rng.gen_range(0..8),
            2 => b[i] = 0xff,
            _ => b[i] = 0,
        }
    }
}

fn check_header(h: &Header) {
    match h.kind {
        Kind::Ram | Kind::Pages => {
            assert!(h.count >= 1 && h.count <= MAX_RANGES);
            assert!(h.ram_data_len() <= MAX_PACKET_PAGES * PAGE_SIZE);
            assert_eq!(h.ram_data_len() % PAGE_SIZE, 0);
        }
        Kind::Device => {
            assert!(h.len <= MAX_DEVICE_CHUNK);
            assert!(DevItemKind::from_u64(h.c).is_some());
        }
        Kind::Setup => assert!(h.len <= MAX_SETUP_LEN),
        Kind::State => assert!(h.len <= MAX_STATE_LEN),
        Kind::Error | Kind::Abort => assert!(h.len <= MAX_MESSAGE_LEN),
        Kind::Postcopy | Kind::ResumeAck => assert!(h.len <= crate::wire::MAX_BITMAP_LEN),
        Kind::PageRequest => {
            assert!(h.b >= 1 && h.b <= crate::wire::MAX_REQUEST_PAGES);
            assert_eq!(h.a % PAGE_SIZE, 0);
        }
        _ => assert_eq!(h.len, 0),
    }
}

#[test]
fn header_parser_never_panics() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let valid = valid_headers();
    let mut accepted = 0;
    for i in 0..100_000 {
        let mut b = [0u8; HEADER_LEN];
        if i % 2 == 0 {
            rng.fill(&mut b[..]);
            if i % 4 == 0 {
                b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
                b[4..6].copy_from_slice(&VERSION.to_le_bytes());
                b[6] = rng.gen_range(0..24);
                b[7] = 0;
            }
        } else {
            b = valid[i % valid.len()];
            mutate(&mut rng, &mut b);
        }
        if let Ok(h) = Header::decode(&b) {
            accepted += 1;
            check_header(&h);
            assert_eq!(Header::decode(&h.encode()), Ok(h));
        }
        // The typed decoder accepts exactly what the raw one accepts, and
        // its frames round-trip.
        assert_eq!(Header::decode(&b).is_ok(), Frame::decode(&b).is_ok());
        if let Ok(env) = Frame::decode(&b) {
            assert_eq!(
                Frame::decode(&env.frame.encode_v(env.session, env.version)),
                Ok(env)
            );
            assert_eq!(env.frame.kind(), Header::decode(&b).unwrap().kind);
        }
    }
    assert!(
        accepted > 1000,
        "mutations should often stay valid ({accepted})"
    );
}

#[test]
fn range_table_parser_rejects_out_of_range() {
    let mut rng = StdRng::seed_from_u64(42);
    let regs = regions();
    let mut out = Vec::new();
    let mut accepted = 0;
    for _ in 0..100_000 {
        let n = rng.gen_range(0..6);
        let mut t = Vec::new();
        let mut data_pages = 0u64;
        for _ in 0..n {
            let gpa = match rng.gen_range(0..4) {
                0 => rng.gen::<u64>(),
                1 => rng.gen_range(0..(70u64 << 20)) & !0xfff,
                2 => (4u64 << 30) + (rng.gen_range(0..(40u64 << 20)) & !0xfff),
                _ => u64::MAX - 4095,
            };
            let npages = match rng.gen_range(0..3) {
                0 => rng.gen::<u32>(),
                _ => rng.gen_range(0..300),
            };
            let flags = if rng.gen_bool(0.1) {
                rng.gen()
            } else {
                rng.gen_range(0..2)
            };
            if flags == 0 {
                data_pages += npages as u64;
            }
            RangeEntry { gpa, npages, flags }.encode_into(&mut t);
        }
        if rng.gen_bool(0.05) && !t.is_empty() {
            let i = rng.gen_range(0..t.len());
            t[i] = rng.gen();
        }
        let data_len = if rng.gen_bool(0.8) {
            data_pages.wrapping_mul(PAGE_SIZE)
        } else {
            rng.gen()
        };
        if decode_ranges(&t, data_len, &regs, &mut out).is_ok() {
            accepted += 1;
            let mut total = 0;
            for r in &out {
                let reg = regs[r.region];
                assert!(r.npages >= 1);
                assert!((r.first_page + r.npages) * PAGE_SIZE <= reg.1, "{r:?}");
                total += r.npages;
            }
            assert!(total <= MAX_PACKET_PAGES);
        }
    }
    assert!(accepted > 100, "{accepted}");
}

#[test]
fn setup_parser_never_panics() {
    let mut rng = StdRng::seed_from_u64(7);
    let good = Setup {
        config: vec![1, 2, 3],
        regions: vec![(0, 1 << 20), (1 << 32, 2 << 20)],
        devices: vec![DeviceDesc {
            id: "gpu0".into(),
            caps: MigCaps {
                stop_copy: true,
                p2p: true,
                pre_copy: true,
            },
        }],
        chunk_bytes: 1 << 20,
        device_mode: DeviceStateMode::Main,
        features: 0,
        handover: false,
    };
    let enc = good.encode();
    assert_eq!(Setup::decode(&enc).unwrap(), good);
    // The feature word: absent when 0 (the bytes of earlier builds), a
    // known bit round-trips, an unknown one is refused by name.
    let z = Setup {
        features: crate::wire::SETUP_FEATURE_ZSTD,
        ..good.clone()
    };
    let zenc = z.encode();
    assert_eq!(zenc.len(), enc.len() + 4);
    assert_eq!(&zenc[..enc.len()], &enc[..]);
    assert_eq!(Setup::decode(&zenc).unwrap(), z);
    let unknown = Setup {
        features: 1 << 7,
        ..good.clone()
    };
    let e = Setup::decode(&unknown.encode()).unwrap_err().to_string();
    assert!(e.contains("features 0x80"), "{e}");
    let mut extra = zenc.clone();
    extra.push(0);
    assert!(Setup::decode(&extra).is_err());
    for i in 0..50_000 {
        let mut b = if i % 3 == 0 {
            (0..rng.gen_range(0..200))
                .map(|_| rng.gen())
                .collect::<Vec<u8>>()
        } else {
            enc.clone()
        };
        if !b.is_empty() {
            mutate(&mut rng, &mut b);
        }
        if i % 5 == 0 {
            b.truncate(rng.gen_range(0..=b.len()));
        }
        if let Ok(s) = Setup::decode(&b) {
            assert!(s.config.len() as u64 <= MAX_CONFIG_LEN);
            assert!(s.chunk_bytes >= 1 && s.chunk_bytes <= MAX_DEVICE_CHUNK);
            assert!(s.devices.len() <= MAX_DEVICES as usize);
        }
    }
}
