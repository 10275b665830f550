//! `--sim-vfio` argument parsing.

use crate::error::{Error, Result};
use crate::options::{KeyValues, OptionError};
use crate::vfio::validate_id;

/// Largest accepted device state (16 GiB).
pub const MAX_STATE_SIZE: u64 = 16 << 30;
/// Largest accepted rate (MiB/s); higher values are meaningless here.
pub const MAX_RATE_MIBS: f64 = 1_000_000.0;
/// Default DMA engine rate (MiB/s of pages written).
pub const DEFAULT_DMA_RATE_MIBS: f64 = 64.0;

/// What the device's DMA logging does (`dma-log=`).
///
/// Invariant: none beyond the variants' meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DmaLogMode {
    /// Logging works as the kernel uAPI says (`on`, the default).
    #[default]
    On,
    /// Test knob: logging is advertised and START/REPORT succeed, but no
    /// page is ever recorded (`off`): a migration then misses DMA writes.
    Off,
    /// The device cannot log its DMA (`none`): `DmaLog::Unsupported`.
    None,
}

/// Parsed `--sim-vfio` argument.
///
/// Invariants: `1 <= state_size <= MAX_STATE_SIZE`; `precopy_size <=
/// state_size`; rates are finite, `>= 0` and `<= MAX_RATE_MIBS` (0 means no
/// dirtying for `dirty_rate`, unlimited for the others); `id` is valid.
#[derive(Debug, Clone, PartialEq)]
pub struct SimVfioConfig {
    /// Device id.
    pub id: String,
    /// Bytes of device state.
    pub state_size: u64,
    /// Bytes of the state (a prefix) that can be pre-copied; 0 = no PRE_COPY.
    pub precopy_size: u64,
    /// MiB/s of state rewritten while the device runs (0 = none).
    pub dirty_rate: f64,
    /// MiB/s at which state is produced for saving (0 = unlimited).
    pub save_rate: f64,
    /// MiB/s at which state is consumed when loading (0 = unlimited).
    pub load_rate: f64,
    /// Fault injection: the save stream fails after this many bytes.
    pub fail_save_after: Option<u64>,
    /// Fault injection: the destination refuses its data.
    pub fail_load: bool,
    /// MiB/s of pages the DMA engine writes (0 = unlimited).
    pub dma_rate: f64,
    /// DMA logging behaviour.
    pub dma_log: DmaLogMode,
}

impl SimVfioConfig {
    /// A config with the given id and sizes and no rates or faults.
    pub fn new(id: &str, state_size: u64, precopy_size: u64) -> Self {
        SimVfioConfig {
            id: id.to_string(),
            state_size,
            precopy_size,
            dirty_rate: 0.0,
            save_rate: 0.0,
            load_rate: 0.0,
            fail_save_after: None,
            fail_load: false,
            dma_rate: DEFAULT_DMA_RATE_MIBS,
            dma_log: DmaLogMode::On,
        }
    }

    /// Checks the invariants (for configs built by hand).
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Error::InvalidArg {
            arg: format!("--sim-vfio id={}", self.id),
            reason,
        };
        validate_id(&self.id, &self.id)?;
        if self.state_size == 0 || self.state_size > MAX_STATE_SIZE {
            return Err(bad(format!(
                "state must be 1 byte to {MAX_STATE_SIZE} bytes"
            )));
        }
        if self.precopy_size > self.state_size {
            return Err(bad("precopy must not exceed state".into()));
        }
        for (n, r) in [
            ("dirty-rate", self.dirty_rate),
            ("save-rate", self.save_rate),
            ("load-rate", self.load_rate),
            ("dma-rate", self.dma_rate),
        ] {
            if !r.is_finite() || !(0.0..=MAX_RATE_MIBS).contains(&r) {
                return Err(bad(format!(
                    "{n} must be between 0 and {MAX_RATE_MIBS} MiB/s"
                )));
            }
        }
        Ok(())
    }
}

fn parse_rate(s: &str) -> Option<f64> {
    let r: f64 = s.trim().parse().ok()?;
    (r.is_finite() && (0.0..=MAX_RATE_MIBS).contains(&r)).then_some(r)
}

/// Keys of `--sim-vfio`, in the order `ferry --help` documents them.
pub const KEYS: &[&str] = &[
    "id",
    "state",
    "precopy",
    "dirty-rate",
    "save-rate",
    "load-rate",
    "fail-save-after",
    "fail-load",
    "dma-rate",
    "dma-log",
];

/// Parses `id=NAME,state=SIZE[,precopy=SIZE][,dirty-rate=MBPS]
/// [,save-rate=MBPS][,load-rate=MBPS][,fail-save-after=SIZE][,fail-load=1]
/// [,dma-rate=MBPS][,dma-log=on|off|none]`
/// (grammar of lists and sizes: [`crate::options`]).
pub fn parse_sim_vfio_arg(s: &str) -> Result<SimVfioConfig> {
    let bad = |reason: String| Error::InvalidArg {
        arg: s.to_string(),
        reason,
    };
    if s.len() > 4096 {
        return Err(bad("too long".into()));
    }
    let opt = |e: OptionError| bad(e.to_string());
    let kv = KeyValues::parse(s, KEYS, None).map_err(opt)?;
    let rate_or = |k: &str, default: f64| -> Result<f64> {
        match kv.get(k) {
            None => Ok(default),
            Some(v) => parse_rate(v)
                .ok_or_else(|| bad(format!("{k}: bad rate `{v}` (MiB/s, 0 to {MAX_RATE_MIBS})"))),
        }
    };
    let rate = |k: &str| rate_or(k, 0.0);
    let dma_log = match kv.get("dma-log").map(str::trim) {
        None | Some("on") => DmaLogMode::On,
        Some("off") => DmaLogMode::Off,
        Some("none") => DmaLogMode::None,
        Some(v) => return Err(bad(format!("dma-log: `{v}` is not on, off or none"))),
    };
    let id = kv.required("id").map_err(opt)?;
    let state_size = kv.size("state").map_err(opt)?;
    let cfg = SimVfioConfig {
        id: id.to_string(),
        state_size: 0,
        precopy_size: kv.size("precopy").map_err(opt)?.unwrap_or(0),
        dirty_rate: rate("dirty-rate")?,
        save_rate: rate("save-rate")?,
        load_rate: rate("load-rate")?,
        fail_save_after: kv.size("fail-save-after").map_err(opt)?,
        fail_load: kv.flag("fail-load").map_err(opt)?.unwrap_or(false),
        dma_rate: rate_or("dma-rate", DEFAULT_DMA_RATE_MIBS)?,
        dma_log,
    };
    validate_id(s, &cfg.id)?;
    let state_size = state_size.ok_or_else(|| bad("missing state=".into()))?;
    let cfg = SimVfioConfig { state_size, ..cfg };
    if cfg.state_size == 0 || cfg.state_size > MAX_STATE_SIZE {
        return Err(bad(format!(
            "state must be 1 byte to 16G, got {}",
            cfg.state_size
        )));
    }
    if cfg.precopy_size > cfg.state_size {
        return Err(bad("precopy must not exceed state".into()));
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_the_shared_grammar() {
        for (s, v) in [
            ("4096", 4096),
            ("32M", 32 << 20),
            ("1G", 1 << 30),
            ("1g", 1 << 30),
            ("8KiB", 8 << 10),
            ("2MB", 2 << 20),
        ] {
            let c = parse_sim_vfio_arg(&format!("id=a,state={s}")).unwrap();
            assert_eq!(c.state_size, v, "{s}");
        }
        for bad in [
            "",
            "M",
            "-1",
            "1.5M",
            "1X",
            "99999999999999999999G",
            "1 M",
            "lots",
        ] {
            assert!(
                parse_sim_vfio_arg(&format!("id=a,state={bad}")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn full_arg() {
        let c = parse_sim_vfio_arg(
            "id=gpu0,state=64M,precopy=48M,dirty-rate=10.5,save-rate=100,load-rate=0,fail-save-after=1M,fail-load=1",
        )
        .unwrap();
        assert_eq!(c.id, "gpu0");
        assert_eq!(c.state_size, 64 << 20);
        assert_eq!(c.precopy_size, 48 << 20);
        assert_eq!(c.dirty_rate, 10.5);
        assert_eq!(c.save_rate, 100.0);
        assert_eq!(c.load_rate, 0.0);
        assert_eq!(c.fail_save_after, Some(1 << 20));
        assert!(c.fail_load);
        assert_eq!(c.dma_rate, DEFAULT_DMA_RATE_MIBS);
        assert_eq!(c.dma_log, DmaLogMode::On);
        c.validate().unwrap();
        let c = parse_sim_vfio_arg("id=a,state=1M,dma-rate=0,dma-log=off").unwrap();
        assert_eq!((c.dma_rate, c.dma_log), (0.0, DmaLogMode::Off));
        let c = parse_sim_vfio_arg("id=a,state=1M,dma-rate=2.5,dma-log=none").unwrap();
        assert_eq!((c.dma_rate, c.dma_log), (2.5, DmaLogMode::None));
        let c = parse_sim_vfio_arg("id=a,state=1M,dma-log=on").unwrap();
        assert_eq!(c.dma_log, DmaLogMode::On);
        let d = parse_sim_vfio_arg("state=4096,id=a").unwrap();
        assert_eq!(d, SimVfioConfig::new("a", 4096, 0));
    }

    #[test]
    fn rejects() {
        for bad in [
            "id=a",
            "state=1M",
            "id=a,state=0",
            "id=a,state=17G",
            "id=a,state=1M,precopy=2M",
            "id=a,state=1M,dirty-rate=-1",
            "id=a,state=1M,save-rate=nan",
            "id=a,state=1M,load-rate=inf",
            "id=a,state=1M,fail-load=2",
            "id=a,state=1M,bogus=1",
            "id=a,state=1M,state=2M",
            "id=,state=1M",
            "id=a b,state=1M",
            "id=a,state=1M,",
            "id=a,state=1M,,precopy=0",
            "id=a,state=1M,id=b",
            "id=a,state=1M,fail-save-after=",
            "id=a,state=1M,dma-rate=-1",
            "id=a,state=1M,dma-rate=x",
            "id=a,state=1M,dma-log=1",
            "id=a,state=1M,dma-log=maybe",
            "id=a,state=1M,dma-log=",
            "ID=a,state=1M",
            "",
        ] {
            assert!(parse_sim_vfio_arg(bad).is_err(), "{bad} accepted");
        }
        let mut c = SimVfioConfig::new("x", 10, 11);
        assert!(c.validate().is_err());
        c.precopy_size = 10;
        assert!(c.validate().is_ok());
        c.save_rate = f64::NAN;
        assert!(c.validate().is_err());
    }
}
