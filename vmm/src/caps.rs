//! Probing of optional vCPU state (XSAVE/XSAVE2, XCRs, nested state, TSC
//! control) and of the MSRs that can be saved, plus the compatibility check
//! a destination runs against a source's choices.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Cap, Kvm, KvmNestedStateBuffer, VcpuFd};
use log::debug;
use serde::{Deserialize, Serialize};

/// Size of the legacy `struct kvm_xsave` region.
pub const LEGACY_XSAVE_SIZE: usize = 4096;

/// Optional vCPU state this host can save and restore, as probed once per VM.
///
/// Invariant: a field is true (or `Some`) only if the matching KVM call
/// succeeded on a fresh vCPU of this host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostCaps {
    /// KVM_GET/SET_XSAVE; `xsave_size` bytes (> 4096 means KVM_GET_XSAVE2).
    pub xsave: bool,
    /// Bytes of XSAVE state.
    pub xsave_size: usize,
    /// KVM_GET/SET_XCRS.
    pub xcrs: bool,
    /// KVM_GET/SET_NESTED_STATE.
    pub nested: bool,
    /// KVM_SET_TSC_KHZ available.
    pub tsc_control: bool,
    /// Guest TSC frequency, if KVM reports it.
    pub tsc_khz: Option<u32>,
    /// KVM_GET/SET_DEBUGREGS.
    pub debugregs: bool,
    /// KVM_CLEAR_DIRTY_LOG in use (manual dirty-log protection).
    pub manual_protect: bool,
}

impl HostCaps {
    /// Probes what `vcpu` (a fresh vCPU of a VM of `kvm`) supports.
    pub fn probe(kvm: &Kvm, vcpu: &VcpuFd) -> HostCaps {
        let mut c = HostCaps::default();
        if kvm.check_extension(Cap::Xsave) {
            let x2 = kvm.check_extension_int(Cap::Xsave2);
            c.xsave_size = if x2 > LEGACY_XSAVE_SIZE as i32 {
                x2 as usize
            } else {
                LEGACY_XSAVE_SIZE
            };
            c.xsave = if c.xsave_size > LEGACY_XSAVE_SIZE {
                crate::state::get_xsave(vcpu, c.xsave_size).is_ok()
            } else {
                vcpu.get_xsave().is_ok()
            };
            if !c.xsave {
                c.xsave_size = 0;
            }
        }
        c.xcrs = kvm.check_extension(Cap::Xcrs) && vcpu.get_xcrs().is_ok();
        if kvm.check_extension_int(Cap::NestedState) > 0 {
            let mut buf = KvmNestedStateBuffer::empty();
            match vcpu.nested_state(&mut buf) {
                Ok(_) => c.nested = true,
                Err(e) => debug!("KVM_GET_NESTED_STATE unusable on this host: {e}; not saved"),
            }
        }
        c.tsc_control = kvm.check_extension(Cap::TscControl);
        c.tsc_khz = vcpu.get_tsc_khz().ok();
        c.debugregs = kvm.check_extension(Cap::Debugregs) && vcpu.get_debug_regs().is_ok();
        c
    }

    /// Whether a destination with these caps (`self`) can restore state
    /// saved with `src`'s choices. Returns the reason when it cannot.
    pub fn can_restore(&self, src: &HostCaps) -> Result<(), String> {
        if src.xsave {
            if !self.xsave {
                return Err(
                    "the source saves XSAVE state but this host has no KVM_CAP_XSAVE".into(),
                );
            }
            if src.xsave_size > self.xsave_size {
                return Err(format!(
                    "the source's XSAVE state is {} bytes, this host supports {}",
                    src.xsave_size, self.xsave_size
                ));
            }
        }
        if src.xcrs && !self.xcrs {
            return Err("the source saves XCRs but this host has no KVM_CAP_XCRS".into());
        }
        if src.nested && !self.nested {
            return Err(
                "the source saves nested virtualization state but this host cannot restore it"
                    .into(),
            );
        }
        if src.debugregs && !self.debugregs {
            return Err(
                "the source saves debug registers but this host cannot restore them".into(),
            );
        }
        Ok(())
    }
}

/// MSR indices that KVM lists and that `KVM_GET_MSRS` accepts on `vcpu`.
pub fn probe_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Vec<u32> {
    let list = match kvm.get_msr_index_list() {
        Ok(l) => l,
        Err(e) => {
            debug!("KVM_GET_MSR_INDEX_LIST failed: {e}; saving no MSR");
            return Vec::new();
        }
    };
    let mut ok = Vec::new();
    for &index in list.as_slice() {
        let Ok(mut msrs) = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }]) else {
            continue;
        };
        if matches!(vcpu.get_msrs(&mut msrs), Ok(1)) {
            ok.push(index);
        }
    }
    debug!(
        "{} of {} listed MSRs are readable",
        ok.len(),
        list.as_slice().len()
    );
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compat_rules() {
        let full = HostCaps {
            xsave: true,
            xsave_size: 4096,
            xcrs: true,
            nested: true,
            debugregs: true,
            ..Default::default()
        };
        let none = HostCaps::default();
        assert!(full.can_restore(&full).is_ok());
        assert!(full.can_restore(&none).is_ok());
        assert!(none.can_restore(&full).is_err());
        let no_nested = HostCaps {
            nested: false,
            ..full.clone()
        };
        assert!(no_nested.can_restore(&full).unwrap_err().contains("nested"));
        assert!(full.can_restore(&no_nested).is_ok());
        let big = HostCaps {
            xsave_size: 11008,
            ..full.clone()
        };
        assert!(full.can_restore(&big).is_err());
        assert!(big.can_restore(&full).is_ok());
    }
}
