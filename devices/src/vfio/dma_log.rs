//! VFIO device DMA logging (`VFIO_DEVICE_FEATURE_DMA_LOGGING_*`) over the
//! raw feature call of [`RawMigOps`]: argument checks, then the exact uAPI
//! bytes of [`super::uapi`].

use std::ops::Range;

use migration::DmaLog;

use super::uapi::{self, DmaLoggingRanges, DMA_LOGGING_MAX_RANGES};
use super::RawMigOps;

/// PROBE of SET DMA_LOGGING_START: `Supported` iff the kernel accepts it.
pub fn probe(ops: &dyn RawMigOps) -> DmaLog {
    let mut arg = uapi::dma_logging_probe_arg();
    match ops.device_feature(&mut arg) {
        Ok(()) => DmaLog::Supported,
        Err(e) => {
            log::debug!("DMA logging probe: {e}");
            DmaLog::Unsupported
        }
    }
}

/// Checks and issues START for `ranges` at `page_size`; returns the page
/// size the kernel picked (written back into the argument).
pub fn start(ops: &dyn RawMigOps, ranges: &[Range<u64>], page_size: u64) -> Result<u64, String> {
    if !page_size.is_power_of_two() {
        return Err(format!(
            "DMA logging page size {page_size} is not a power of two"
        ));
    }
    if ranges.is_empty() || ranges.len() > DMA_LOGGING_MAX_RANGES {
        return Err(format!(
            "DMA logging needs 1 to {DMA_LOGGING_MAX_RANGES} ranges, not {}",
            ranges.len()
        ));
    }
    let mut pairs = Vec::with_capacity(ranges.len());
    for r in ranges {
        let len = r.end.checked_sub(r.start).filter(|l| *l > 0);
        match len {
            Some(l) if r.start.is_multiple_of(page_size) && l.is_multiple_of(page_size) => {
                pairs.push((r.start, l))
            }
            _ => {
                return Err(format!(
                    "DMA logging range {:#x}..{:#x} is empty or not aligned to {page_size}",
                    r.start, r.end
                ))
            }
        }
    }
    let words = DmaLoggingRanges::new(&pairs);
    let mut arg = uapi::dma_logging_start_arg(page_size, &words);
    ops.device_feature(&mut arg)
        .map_err(|e| format!("VFIO_DEVICE_FEATURE_DMA_LOGGING_START: {e}"))?;
    // `words` lived across the ioctl (its address is in `arg`).
    drop(words);
    match uapi::dma_logging_start_page_size(&arg) {
        Some(p) if p.is_power_of_two() => Ok(p),
        p => Err(format!("DMA logging: kernel chose a bad page size {p:?}")),
    }
}

/// Checks and issues REPORT of `[iova, iova + length)` into `bitmap` (bits
/// are only ever set, so earlier bits are kept).
pub fn report(
    ops: &dyn RawMigOps,
    iova: u64,
    length: u64,
    page_size: u64,
    bitmap: &mut [u64],
) -> Result<(), String> {
    if !page_size.is_power_of_two() || length == 0 || iova.checked_add(length).is_none() {
        return Err(format!(
            "bad DMA logging report {iova:#x}+{length:#x} at page size {page_size}"
        ));
    }
    let pages = length.div_ceil(page_size);
    if (bitmap.len() as u64).saturating_mul(64) < pages {
        return Err(format!(
            "DMA logging bitmap of {} words is too small for {pages} pages",
            bitmap.len()
        ));
    }
    let mut arg = uapi::dma_logging_report_arg(iova, length, page_size, bitmap);
    ops.device_feature(&mut arg)
        .map_err(|e| format!("VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT: {e}"))
}

/// Issues STOP.
pub fn stop(ops: &dyn RawMigOps) -> Result<(), String> {
    let mut arg = uapi::dma_logging_stop_arg();
    ops.device_feature(&mut arg)
        .map_err(|e| format!("VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP: {e}"))
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use std::sync::{Arc, Mutex};

    use migration::{DmaLog, MigratableDevice};

    use crate::vfio::fake::{DmaModel, FakeMig};
    use crate::vfio::uapi::{FEATURE_GET, FEATURE_PROBE, FEATURE_SET};
    use crate::vfio::KernelVfioDevice;

    fn dev(model: Option<DmaModel>) -> (KernelVfioDevice, Arc<FakeMig>) {
        let f = Arc::new(FakeMig {
            dma: model.map(Mutex::new),
        });
        (
            KernelVfioDevice::with_ops("dl", Box::new(f.clone())).unwrap(),
            f,
        )
    }

    fn calls(f: &FakeMig) -> Vec<(u32, u32)> {
        f.dma.as_ref().unwrap().lock().unwrap().calls.clone()
    }

    #[test]
    fn probe_decides_supported_or_not() {
        let (d, f) = dev(Some(DmaModel::default()));
        assert_eq!(d.dma_log(), DmaLog::Supported);
        assert_eq!(calls(&f), vec![(8, FEATURE_PROBE | FEATURE_SET | 6)]);
        let (d, _) = dev(None);
        assert_eq!(d.dma_log(), DmaLog::Unsupported);
        let e = d.dma_log_start(&[0..4096], 4096).unwrap_err().to_string();
        assert!(e.contains("dl") && e.contains("DMA_LOGGING_START"), "{e}");
        d.dma_log_stop().unwrap();
    }

    #[test]
    fn start_report_stop_flow() {
        let (d, f) = dev(Some(DmaModel::default()));
        let m = f.dma.as_ref().unwrap();
        d.dma_log_start(&[0..0x10_0000, 0x1_0000_0000..0x1_0020_0000], 4096)
            .unwrap();
        assert_eq!(
            m.lock().unwrap().started,
            Some((4096, vec![(0, 0x10_0000), (0x1_0000_0000, 0x20_0000)]))
        );
        assert!(d.dma_log_start(&[0..4096], 4096).is_err(), "second start");
        {
            let mut m = m.lock().unwrap();
            for a in [0x0, 0x5000, 0x5fff, 0x3f000, 0x40000, 0x1_0000_1000] {
                m.dirty.insert(a);
            }
        }
        let mut bm = vec![0u64; 4];
        bm[3] = 1 << 63; // kept: the report only sets bits
        d.dma_log_report(0, 0x10_0000, 4096, &mut bm).unwrap();
        assert_eq!(bm[0], 1 | 1 << 5 | 1 << 63);
        assert_eq!(bm[1], 1);
        assert_eq!(bm[3], 1 << 63);
        // Cleared in the device: the same report is empty now.
        let mut again = vec![0u64; 4];
        d.dma_log_report(0, 0x10_0000, 4096, &mut again).unwrap();
        assert_eq!(again, vec![0; 4]);
        let mut hi = vec![0u64; 8];
        d.dma_log_report(0x1_0000_0000, 0x20_0000, 4096, &mut hi)
            .unwrap();
        assert_eq!(hi[0], 2);
        // A too-small bitmap or a bad page size never reaches the kernel.
        let n = calls(&f).len();
        assert!(d
            .dma_log_report(0, 0x10_0000, 4096, &mut [0u64; 3])
            .is_err());
        assert!(d.dma_log_report(0, 0x10_0000, 3000, &mut bm).is_err());
        assert!(d.dma_log_report(u64::MAX, 2, 4096, &mut bm).is_err());
        assert_eq!(calls(&f).len(), n);
        d.dma_log_stop().unwrap();
        d.dma_log_stop().unwrap();
        assert!(m.lock().unwrap().started.is_none());
        assert!(d.dma_log_report(0, 4096, 4096, &mut bm).is_err());
        let c = calls(&f);
        assert_eq!(c[1], (32, FEATURE_SET | 6));
        assert_eq!(c[2], (40, FEATURE_GET | 8));
        assert_eq!(c.last(), Some(&(8, FEATURE_SET | 7)), "one STOP");
        assert_eq!(c.iter().filter(|x| x.1 == FEATURE_SET | 7).count(), 1);
    }

    #[test]
    fn start_arguments_are_checked_and_page_size_read_back() {
        let (d, f) = dev(Some(DmaModel {
            pick_page: Some(2 << 20),
            ..Default::default()
        }));
        for (r, p) in [
            (vec![], 4096),
            (vec![0..4096], 3000),
            (vec![0x800..0x1800], 4096),
            (vec![4096..4096], 4096),
            (vec![0..4096; 257], 4096),
        ] {
            assert!(d.dma_log_start(&r, p).is_err(), "{r:?} {p}");
        }
        assert_eq!(calls(&f).len(), 1, "only the probe reached the kernel");
        d.dma_log_start(&[0..0x40_0000], 4096).unwrap();
        let m = f.dma.as_ref().unwrap();
        assert_eq!(m.lock().unwrap().started.as_ref().unwrap().0, 2 << 20);
        // Reports may use any page size (the kernel converts).
        m.lock().unwrap().dirty.insert(0x20_0000);
        let mut bm = [0u64; 16];
        d.dma_log_report(0, 0x40_0000, 4096, &mut bm).unwrap();
        assert_eq!(bm[8], 1);
    }
}
