//! Long-running jobs of the VMM, each on its own worker thread. Today there
//! is one kind: the migration job ([`migration`]), with its adapters to the
//! migration crate's traits ([`adapters`]) and the guest description a
//! migration carries, with the destination's checks of it ([`guest_config`]).

pub mod adapters;
pub mod guest_config;
pub mod migration;
