//! x86-64 boot support for Ferry: guest memory layout, kernel/initramfs
//! loading, boot information (zero page or PVH `hvm_start_info`), firmware
//! tables (e820, MP table, ACPI) and the architectural vCPU state at entry.
//!
//! Everything here is a pure function over guest memory and plain values:
//! nothing opens `/dev/kvm`, so every structure is unit-testable.
//!
//! Typical use by the VMM, in this order:
//! 1. allocate guest RAM as [`layout::ram_regions`] describes;
//! 2. [`load_kernel`], then optionally [`load_initramfs`] with the returned
//!    `kernel_end`;
//! 3. [`configure_system`] (returns the boot-info address);
//! 4. per vCPU: [`cpuid::filter_cpuid`], [`msr::boot_msr_entries`],
//!    [`regs::setup_fpu`], [`regs::setup_regs`], [`regs::setup_sregs`].
//!
//! A migration destination first checks the incoming guest's CPUID against
//! its own with [`cpuid_compat::missing_features`].
#![cfg(target_arch = "x86_64")]
#![deny(missing_docs)]

pub mod acpi;
mod boot;
mod bytes;
pub mod cpuid;
pub mod cpuid_compat;
pub mod e820;
pub mod gdt;
pub mod layout;
mod loader;
pub mod mptable;
pub mod msr;
pub mod pci;
pub mod regs;
pub mod reset;

#[cfg(test)]
mod test_utils;

pub use boot::{configure_system, BootSetup};
pub use loader::{load_initramfs, load_kernel, InitrdInfo, KernelLoad};

use vm_memory::GuestMemoryError;

// All address arithmetic below converts guest sizes (u64) to host sizes
// (usize) losslessly; this crate only targets 64-bit hosts.
const _: () = assert!(std::mem::size_of::<usize>() == 8);

/// The boot protocol the guest kernel is entered with.
///
/// Decided once by [`load_kernel`] from the image format and then threaded
/// unchanged through [`configure_system`] and [`regs`]: the three must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BootProtocol {
    /// Xen PVH direct boot of an ELF `vmlinux`: 32-bit protected mode without
    /// paging, `ebx` = guest-physical address of `hvm_start_info`.
    Pvh,
    /// Linux 64-bit boot protocol of a bzImage: long mode with identity
    /// paging, `rsi` = guest-physical address of `boot_params` (zero page).
    Linux64,
}

/// Everything that can go wrong while preparing a guest to boot.
///
/// Every variant describes bad *input* (kernel or initramfs file, command
/// line, vCPU count, memory size) or guest memory that does not cover the
/// layout; nothing in this crate panics on such input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// I/O error while reading the kernel image file.
    #[error("reading the kernel image: {0}")]
    KernelRead(#[source] std::io::Error),
    /// The kernel image is in none of the supported formats.
    #[error("kernel image is not an ELF with a PVH note nor a bzImage")]
    UnknownKernelFormat,
    /// An ELF image that is not a little-endian ELF64 for x86-64.
    #[error("ELF kernel image is not a little-endian ELF64 x86-64 executable")]
    UnsupportedElf,
    /// An ELF image without `XEN_ELFNOTE_PHYS32_ENTRY`: only PVH ELF is supported.
    #[error("ELF kernel image has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); only PVH ELF kernels are supported")]
    ElfWithoutPvhNote,
    /// The ELF has more program headers than [`layout::MAX_ELF_PHDRS`].
    #[error("ELF kernel image has {0} program headers (at most {max})", max = layout::MAX_ELF_PHDRS)]
    TooManyProgramHeaders(u16),
    /// A loadable ELF segment (`paddr`, `memsz`) lies outside
    /// `[HIMEM_START, end of low RAM)`.
    #[error("ELF segment at {paddr:#x} (+{memsz:#x}) lies outside low guest RAM above 1 MiB")]
    ElfSegmentOutOfRange {
        /// Physical load address of the segment.
        paddr: u64,
        /// In-memory size of the segment.
        memsz: u64,
    },
    /// The PVH entry point is not inside the loaded image.
    #[error("PVH entry point {0:#x} is outside the loaded kernel image")]
    PvhEntryOutOfRange(u64),
    /// A bzImage that cannot be entered with the 64-bit boot protocol.
    #[error("bzImage not bootable with the 64-bit boot protocol: {0}")]
    UnsupportedBzImage(&'static str),
    /// The kernel image does not fit in low guest RAM.
    #[error("kernel image ends at {end:#x}, past the end of low guest RAM {limit:#x}")]
    KernelTooLarge {
        /// First address past the kernel (including its decompression area).
        end: u64,
        /// First address past usable low RAM.
        limit: u64,
    },
    /// linux-loader rejected the image or failed to copy it.
    #[error("loading the kernel image: {0}")]
    KernelLoader(#[source] linux_loader::loader::Error),
    /// I/O error while reading the initramfs file.
    #[error("reading the initramfs: {0}")]
    InitrdRead(#[source] std::io::Error),
    /// An empty initramfs file.
    #[error("the initramfs file is empty")]
    InitrdEmpty,
    /// The initramfs does not fit between the kernel and the top of low RAM.
    #[error("initramfs of {size:#x} bytes does not fit: only {available:#x} bytes free between the kernel and the top of low RAM")]
    InitrdTooLarge {
        /// Size of the initramfs file.
        size: u64,
        /// Bytes available between the kernel end and the placement limit.
        available: u64,
    },
    /// The initramfs described in [`BootSetup`] is empty, not in low RAM,
    /// or beyond what the kernel's `initrd_addr_max` allows.
    #[error("initramfs at {addr:#x} (+{size:#x}) is not a valid placement")]
    InvalidInitrd {
        /// Start address given.
        addr: u64,
        /// Size given.
        size: u64,
    },
    /// The command line (without its NUL) is longer than the kernel accepts.
    #[error("kernel command line is {len} bytes, at most {max} are allowed")]
    CmdlineTooLong {
        /// Length of the command line.
        len: usize,
        /// Largest accepted length (excluding the NUL terminator).
        max: usize,
    },
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineHasNul,
    /// `num_cpus` is 0 or more than [`layout::MAX_SUPPORTED_CPUS`].
    #[error("invalid vCPU count {0}: must be 1..={max}", max = layout::MAX_SUPPORTED_CPUS)]
    InvalidCpuCount(u8),
    /// `mem_size` is too small to hold the boot layout, or too large.
    #[error("invalid guest memory size {0:#x}: must be in {min:#x}..={max:#x}", min = layout::MIN_MEM_SIZE, max = layout::MAX_MEM_SIZE)]
    InvalidMemSize(u64),
    /// The guest memory object does not cover the RAM that `mem_size` implies.
    #[error("guest memory does not cover RAM range {start:#x} (+{len:#x})")]
    MemoryNotCovered {
        /// Start of the uncovered range.
        start: u64,
        /// Length of the uncovered range.
        len: u64,
    },
    /// `BootProtocol::Linux64` was requested but the zero page holds no
    /// bzImage setup header (`load_kernel` did not load a bzImage).
    #[error("Linux 64-bit boot requested but no bzImage setup header was loaded")]
    MissingSetupHeader,
    /// A generated table does not fit its reserved guest-memory window.
    #[error("{what} needs {size:#x} bytes but only {max:#x} are reserved")]
    TableTooLarge {
        /// Which table.
        what: &'static str,
        /// Bytes needed.
        size: usize,
        /// Bytes reserved in the layout.
        max: usize,
    },
    /// Writing a boot structure into guest memory failed.
    #[error("writing {what} to guest memory: {source}")]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// Underlying guest memory error.
        #[source]
        source: GuestMemoryError,
    },
    /// Reading a boot structure back from guest memory failed.
    #[error("reading {what} from guest memory: {source}")]
    GuestRead {
        /// Which structure.
        what: &'static str,
        /// Underlying guest memory error.
        #[source]
        source: GuestMemoryError,
    },
    /// linux-loader's boot configurator failed to write boot parameters.
    #[error("writing boot parameters: {0}")]
    BootConfigurator(#[source] linux_loader::configurator::Error),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
