//! Checks of the PCI layer states a migration carries in the VM state,
//! before any is handed to a function.

use devices::pci::{PciFunctionState, CONFIG_SPACE_SIZE, NUM_BARS};

/// Most MSI-X vectors a function can have (table size field + 1).
pub const MAX_MSIX_VECTORS: usize = 2048;
/// Longest device id accepted in a state.
pub const MAX_ID_LEN: usize = 64;

/// Checks that `states` are the PCI layers of the functions `ids` (same
/// order) and that each is well formed: config space at most
/// [`CONFIG_SPACE_SIZE`] bytes, [`NUM_BARS`] BARs, at most
/// [`MAX_MSIX_VECTORS`] MSI-X entries with a matching pending array.
pub fn validate(states: &[PciFunctionState], ids: &[&str]) -> Result<(), String> {
    if states.len() != ids.len() {
        return Err(format!(
            "{} PCI function states for {} PCI functions",
            states.len(),
            ids.len()
        ));
    }
    for (s, id) in states.iter().zip(ids) {
        if s.id.len() > MAX_ID_LEN || s.id != *id {
            let shown: String = s.id.chars().take(MAX_ID_LEN).collect();
            return Err(format!(
                "PCI function state for {shown:?} where this VM has '{id}'"
            ));
        }
        if s.config.len() > CONFIG_SPACE_SIZE {
            return Err(format!(
                "PCI function '{id}': {} bytes of config space (at most {CONFIG_SPACE_SIZE})",
                s.config.len()
            ));
        }
        if s.bars.len() != NUM_BARS {
            return Err(format!(
                "PCI function '{id}': {} BARs (expected {NUM_BARS})",
                s.bars.len()
            ));
        }
        if let Some(m) = &s.msix {
            if m.entries.len() > MAX_MSIX_VECTORS || m.pba.len() != m.entries.len().div_ceil(64) {
                return Err(format!(
                    "PCI function '{id}': MSI-X state with {} entries and {} pending words",
                    m.entries.len(),
                    m.pba.len()
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::pci::{MsixEntry, MsixState};

    fn good(id: &str) -> PciFunctionState {
        PciFunctionState {
            id: id.into(),
            config: vec![0; 256],
            bars: vec![0; NUM_BARS],
            msix: Some(MsixState {
                enabled: true,
                function_masked: false,
                entries: vec![MsixEntry::default(); 1],
                pba: vec![0],
            }),
        }
    }

    #[test]
    fn accepts_good_refuses_bad() {
        assert!(validate(&[good("host"), good("d0")], &["host", "d0"]).is_ok());
        assert!(validate(&[good("d0")], &["host", "d0"]).is_err());
        assert!(validate(&[good("d1"), good("d0")], &["host", "d0"]).is_err());
        let mut s = good("d0");
        s.config = vec![0; CONFIG_SPACE_SIZE + 1];
        assert!(validate(&[s], &["d0"]).is_err());
        let mut s = good("d0");
        s.bars.pop();
        assert!(validate(&[s], &["d0"]).is_err());
        let mut s = good("d0");
        s.msix.as_mut().unwrap().pba.clear();
        assert!(validate(&[s], &["d0"]).is_err());
        let mut s = good("d0");
        let m = s.msix.as_mut().unwrap();
        m.entries = vec![MsixEntry::default(); MAX_MSIX_VECTORS + 1];
        m.pba = vec![0; m.entries.len().div_ceil(64)];
        assert!(validate(&[s], &["d0"]).is_err());
        let mut s = good("x");
        s.id = "x".repeat(1000);
        assert!(validate(&[s], &["x"]).is_err());
    }
}
