//! PCI wiring of a VM ([`wiring`]): MSI delivery through KVM ([`msi`]), the
//! exit dispatch of the vCPU threads ([`io`]), DMA mapping of guest RAM
//! ([`dma`]), KVM slots for mapped BARs ([`bars`]) and the checks of
//! migrated PCI states ([`state`]).
pub mod bars;
pub mod dma;
pub mod io;
pub mod msi;
pub mod state;
pub mod wiring;

#[cfg(test)]
mod msi_kvm_tests;
#[cfg(test)]
mod wiring_tests;
